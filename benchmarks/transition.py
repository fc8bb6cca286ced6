"""Training cost over the VCON transition: step time and peak memory → TRANSITION.md.

One training step (forward + backward + Adam step) of the blended model at β = 1, 0.5 and 0,
against the dense model and the compressed-only (vanished) model, for a small BERT encoder
built from a config and resnet18 at 64×64, compressed with low-rank.

- Step time: every configuration lives in one process and is timed interleaved, round by
  round (the machine is shared; see common.py); ratios are medians over rounds.
- Peak memory: each configuration runs alone in a fresh subprocess. CPU: the resident-set
  high-water mark (VmHWM) over the measured steps, reset after warm-up (so it is the steady
  state: weights, gradients, Adam states and activations), and its rise over the resident set
  before those steps. CUDA: torch.cuda.max_memory_allocated over the measured steps.
- "β = 0 after the transition" configurations first take steps at β = 0.5, so the dense
  branch has gradients and Adam state, then switch to β = 0. With the default
  `zero_grad(set_to_none=True)` the dense parameters get no gradient at β = 0 and Adam skips
  them; with `set_to_none=False` their zeroed gradients stay and Adam keeps updating them.

    .venv/bin/python benchmarks/transition.py                    # CPU → benchmarks/TRANSITION.md
    .venv/bin/python benchmarks/transition.py --device cuda --out TRANSITION_cuda.md
    .venv/bin/python benchmarks/transition.py --tiny --out /tmp/t.md     # smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import logging
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, interleave, machine, machine_line, markdown_table, write_text_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
log = logging.getLogger("transition")

# name → (label, β schedule before measuring, β measured, freeze_dense, set_to_none)
CONFIGS = {
    "dense": ("dense model (the original module)", None, None, False, True),
    "dense_graph": ("dense, captured graph (what transform starts from)", None, None, False, True),
    "beta1": ("blended, β = 1", None, 1.0, False, True),
    "beta05": ("blended, β = 0.5", None, 0.5, False, True),
    "beta0": ("blended, β = 0 after β = 0.5 steps", 0.5, 0.0, False, True),
    "beta0_keepgrad": ("blended, β = 0 after β = 0.5 steps, zero_grad(set_to_none=False)", 0.5, 0.0, False, False),
    "frozen05": ("blended, freeze_dense, β = 0.5", None, 0.5, True, True),
    "frozen0": ("blended, freeze_dense, β = 0 after β = 0.5 steps", 0.5, 0.0, True, True),
    "compressed": ("compressed only (vanished)", None, None, False, True),
}


# ── models ──────────────────────────────────────────────────────────────────────────────────


def make_model(name: str, tiny: bool, device: str, batch: int | None):
    """(module, example args, example kwargs, seq_inputs, loss function, LowRankConfig, description).

    The module and every tensor live on `device` already: capture and transform run there, so
    constants a graph bakes in are on the right device.
    """
    import torch

    torch.manual_seed(0)
    module, args, kwargs, seq_inputs, loss, config, desc = _make_model(name, tiny, batch)
    return module.to(device), _to(args, device), _to(kwargs, device), seq_inputs, loss(device), config, desc


def _make_model(name: str, tiny: bool, batch: int | None):
    import torch
    from torch import nn

    from vcon_fx import LowRankConfig

    if name == "bert":
        from transformers import BertConfig, BertModel

        size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if tiny else \
            dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
        cfg = BertConfig(vocab_size=1000 if tiny else 30522, max_position_embeddings=512, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0, **size)
        module = BertModel(cfg, add_pooling_layer=False)
        b, s = (batch or (2 if tiny else 8)), (16 if tiny else 128)
        kwargs = {"input_ids": torch.randint(0, cfg.vocab_size, (b, s)),
                  "attention_mask": torch.ones(b, s, dtype=torch.long),
                  "token_type_ids": torch.zeros(b, s, dtype=torch.long)}
        target = torch.randn(b, s, cfg.hidden_size)

        def loss(device):
            t = target.to(device)
            return lambda out: nn.functional.mse_loss(_first_tensor(out), t)

        desc = (f"BERT encoder from config (hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
                f"FFN {cfg.intermediate_size}, dropout 0), batch {b}, seq {s}, MSE to a random target")
        return module, (), kwargs, ("input_ids", "attention_mask", "token_type_ids"), loss, \
            LowRankConfig(ratio=0.25), desc
    if name == "mlp":  # the smoke test's model: torch.fx capture, milliseconds per step
        module = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128),
                               nn.ReLU(), nn.Linear(128, 10))
        b = batch or 16
        x, labels = torch.randn(b, 32), torch.randint(0, 10, (b,))

        def loss(device):
            y = labels.to(device)
            return lambda out: nn.functional.cross_entropy(out, y)

        return module, (x,), {}, (), loss, LowRankConfig(ratio=0.25), f"MLP 32→128→128→128→10, batch {b}"
    if name == "resnet18":
        from torchvision.models import resnet18

        module = resnet18(num_classes=10 if tiny else 1000)
        b, hw = (batch or (4 if tiny else 32)), (32 if tiny else 64)
        x = torch.randn(b, 3, hw, hw)
        labels = torch.randint(0, 10 if tiny else 1000, (b,))

        def loss(device):
            y = labels.to(device)
            return lambda out: nn.functional.cross_entropy(out, y)

        desc = f"torchvision resnet18 (random), batch {b}, {hw}×{hw}, cross-entropy, train mode (batch norm updates)"
        return module, (x,), {}, (), loss, LowRankConfig(ratio=0.25), desc
    raise SystemExit(f"unknown model {name!r}")


def _first_tensor(out):
    import torch
    from torch.utils import _pytree as pytree

    return next(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _to(obj, device):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(v, device) for v in obj)
    return obj


class Runner:
    """One configuration: a model, its Adam optimizer and a `step()`."""

    def __init__(self, key: str, parts, device: str, captured=None):
        import torch

        import vcon_fx

        module, args, kwargs, seq_inputs, loss, lowrank, _ = parts
        self.key = key
        label, before, beta, freeze, set_to_none = CONFIGS[key]
        self.label, self.set_to_none, self.loss = label, set_to_none, loss
        self.args, self.kwargs = args, kwargs
        if key == "dense":
            model = module
        elif key == "dense_graph":
            import copy

            from vcon_fx.graph.capture import capture

            model = copy.deepcopy(captured) if captured is not None else \
                capture(module, args, kwargs, seq_inputs=seq_inputs).gm
        else:
            source = captured if captured is not None else module
            model = vcon_fx.transform(source, lowrank, example_inputs=args, example_kwargs=kwargs,
                                      seq_inputs=seq_inputs, freeze_dense=freeze)
            if key == "compressed":
                vcon_fx.set_beta(model, 0.0)
                model = vcon_fx.vanish(model)
        self.model = model.to(device).train()
        self.blends = [m for m in self.model.modules() if isinstance(m, vcon_fx.Blend)]
        self.dense_params = [p for b in self.blends for p in b.dense.parameters()]
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)
        self.device = device
        self.before, self.beta = before, beta
        self.warm = False

    def warmup(self, steps: int = 2) -> None:
        """Take the steps that precede the measured state (β = 0.5 first for 'after the transition')."""
        import vcon_fx

        if self.before is not None:
            vcon_fx.set_beta(self.model, self.before)
            for _ in range(steps):
                self.step()
        if self.beta is not None:
            vcon_fx.set_beta(self.model, self.beta)
        for _ in range(steps):
            self.step()
        self.warm = True

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=self.set_to_none)
        loss = self.loss(self.model(*self.args, **self.kwargs))
        loss.backward()
        self.opt.step()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def facts(self) -> dict:
        """Parameter, gradient and optimizer-state sizes (MB), and whether dense params hold gradients."""
        def mb(tensors):
            return sum(t.numel() * t.element_size() for t in tensors) / 2**20

        params = [p for p in self.model.parameters()]
        grads = [p.grad for p in params if p.grad is not None]
        state = [t for s in self.opt.state.values() for t in s.values() if hasattr(t, "numel") and t.dim() > 0]
        dense_ids = {id(p) for p in self.dense_params}
        dense_state = [t for p, s in self.opt.state.items() if id(p) in dense_ids
                       for t in s.values() if hasattr(t, "numel") and t.dim() > 0]
        return {
            "params_mb": mb(params), "grads_mb": mb(grads), "adam_state_mb": mb(state),
            "dense_params": len(self.dense_params),
            "dense_grad_none": all(p.grad is None for p in self.dense_params) if self.dense_params else None,
            "dense_grad_mb": mb([p.grad for p in self.dense_params if p.grad is not None]),
            "dense_adam_state_mb": mb(dense_state),
            "dense_requires_grad": any(p.requires_grad for p in self.dense_params) if self.dense_params else None,
        }


# ── memory worker (one configuration per fresh process) ────────────────────────────────────


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so set-up garbage is not resident
    except OSError:
        pass


def worker(request: dict) -> dict:
    import torch

    torch.set_num_threads(request["threads"])
    device = request["device"]
    parts = make_model(request["model"], request["tiny"], device, request.get("batch"))
    runner = Runner(request["config"], parts, device)
    del parts
    runner.warmup()
    _release_heap()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    else:
        base = (_status_kb("VmRSS") or 0) / 1024
        reset = True
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        except OSError:
            reset = False
    for _ in range(request["steps"]):
        runner.step()
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "torch.cuda.max_memory_allocated"
    else:
        peak = (_status_kb("VmHWM") or 0) / 1024
        kind = "VmHWM (reset after warm-up)" if reset else "VmHWM (not resettable: includes set-up)"
    return {"peak_mb": peak, "base_mb": base, "rise_mb": peak - base, "kind": kind, **runner.facts()}


def measure_memory(model: str, config: str, args) -> dict:
    request = {"model": model, "config": config, "device": args.device, "tiny": args.tiny, "threads": args.threads,
               "steps": args.mem_steps, "batch": args.batch}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(request)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"worker failed ({proc.returncode}): {tail[:300]}"}
    return json.loads(lines[-1])


# ── timing (every configuration in one process, interleaved) ───────────────────────────────


def measure_time(model: str, args) -> tuple[dict, str, dict]:
    import torch

    from vcon_fx.graph.capture import capture

    parts = make_model(model, args.tiny, args.device, args.batch)
    module, a, kw, seq_inputs = parts[:4]
    # capture once, transform many times (capture is transform's first step, identical each time)
    captured = capture(module, a, kw, seq_inputs=seq_inputs).gm
    runners = {}
    for key in args.configs:
        fresh = make_model(model, args.tiny, args.device, args.batch)  # same seed: same weights
        runners[key] = Runner(key, fresh, args.device, captured=None if key == "dense" else captured)
        runners[key].warmup()
    facts = {k: r.facts() for k, r in runners.items()}
    times = interleave({k: r.step for k, r in runners.items()}, rounds=args.rounds, iters=args.iters, warmup=0,
                       budget_s=args.budget)
    del runners
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return times, parts[-1], facts


def ratio(times: dict, a: str, b: str | tuple) -> dict:
    """Per-round ratio a / b (b may be a pair: their sum), median and spread."""
    bs = b if isinstance(b, tuple) else (b,)
    per = [times[a][i] / sum(times[k][i] for k in bs) for i in range(len(times[a]))]
    return {"ratio": statistics.median(per), "lo": min(per), "hi": max(per)}


def fmt(r: dict) -> str:
    return f"{r['ratio']:.2f} ({r['lo']:.2f}–{r['hi']:.2f})"


def section(model: str, times: dict, desc: str, facts: dict, mem: dict, args) -> str:
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    rows = []
    for key in times:
        m = mem.get(key, {})
        f = facts[key]
        rows.append([
            CONFIGS[key][0], f"{ms[key]:.1f}", fmt(ratio(times, key, "dense")) if "dense" in times else "—",
            fmt(ratio(times, key, "compressed")) if "compressed" in times else "—",
            fmt(ratio(times, key, ("dense", "compressed"))) if {"dense", "compressed"} <= set(times) else "—",
            f"{m['peak_mb']:.0f}" if "peak_mb" in m else m.get("error", "—"),
            f"{m['rise_mb']:.0f}" if "rise_mb" in m else "—",
            f"{f['params_mb']:.1f} / {f['grads_mb']:.1f} / {f['adam_state_mb']:.1f}",
            "—" if f["dense_grad_none"] is None else ("None" if f["dense_grad_none"] else f"{f['dense_grad_mb']:.1f} MB"),
        ])
    table = markdown_table(
        ["configuration", "step ms (median)", "÷ dense", "÷ compressed", "÷ (dense + compressed)",
         "peak MB", "peak rise MB", "params / grads / Adam state MB", "dense .grad"], rows)
    kind = next((m["kind"] for m in mem.values() if "kind" in m), "not measured")
    checks = []
    if {"dense", "compressed"} <= set(times):
        for key in ("beta05", "frozen05"):
            if key in times:
                r = ratio(times, key, ("dense", "compressed"))
                checks.append(f"- {CONFIGS[key][0]}: step = {r['ratio']:.2f} × (dense + compressed): "
                              f"{'MET' if r['ratio'] <= 1.1 else 'MISSED'} (≤ 1.10)")
    if "compressed" in times:
        for key in ("beta0", "beta0_keepgrad", "frozen0"):
            if key in times:
                r = ratio(times, key, "compressed")
                checks.append(f"- {CONFIGS[key][0]}: step = {r['ratio']:.2f} × compressed: "
                              f"{'MET' if r['ratio'] <= 1.05 else 'MISSED'} (≤ 1.05)")
    if "frozen05" in facts:
        f = facts["frozen05"]
        checks.append(f"- freeze_dense: dense params requires_grad={f['dense_requires_grad']}, .grad is None: "
                      f"{f['dense_grad_none']}; Adam state for dense params {f['dense_adam_state_mb']:.1f} MB")
    if "beta05" in mem and "frozen05" in mem and "peak_mb" in mem["beta05"] and "peak_mb" in mem["frozen05"]:
        d = mem["beta05"]["peak_mb"] - mem["frozen05"]["peak_mb"]
        checks.append(f"- memory saved by freeze_dense at β = 0.5: {d:.0f} MB of peak "
                      f"({mem['beta05']['peak_mb']:.0f} → {mem['frozen05']['peak_mb']:.0f} MB)")
    if "beta0" in facts:
        f = facts["beta0"]
        checks.append(f"- after the transition (β = 0, set_to_none=True): dense .grad is None: {f['dense_grad_none']}; "
                      f"their Adam state ({f['dense_adam_state_mb']:.1f} MB) stays allocated until vanish")
    if "beta0_keepgrad" in facts:
        f = facts["beta0_keepgrad"]
        checks.append(f"- with set_to_none=False: dense grads stay allocated ({f['dense_grad_mb']:.1f} MB of zeros) and "
                      "Adam keeps updating the dense weights from their momentum (time in the row above)")
    rounds = len(next(iter(times.values())))
    return (f"### {model}: {desc}\n\n{table}\n\nStep time: {rounds} interleaved rounds × {args.iters} steps. "
            f"Ratios: median over rounds (min–max). Memory: {kind}, {args.mem_steps} measured steps after "
            f"warm-up, one fresh process per configuration.\n\n" + "\n".join(checks) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,resnet18")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=str(HERE / "TRANSITION.md"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--budget", type=float, default=240.0, help="seconds of step timing per model")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory processes")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--tiny", action="store_true", help="tiny models, 1 round: a smoke test")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("vcon_fx", "torch", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.worker:
        sys.stdout.write(json.dumps(worker(json.loads(args.worker))) + "\n")
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.tiny:
        args.rounds, args.iters, args.mem_steps = 2, 1, 1
        if args.models == parser.get_default("models"):
            args.models = "mlp"
    torch.set_num_threads(args.threads)
    args.configs = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    info = machine()
    started = time.perf_counter()
    sections = []
    for model in args.models.split(","):
        t = time.perf_counter()
        times, desc, facts = measure_time(model, args)
        log.info("%s: timing done in %.0f s", model, time.perf_counter() - t)
        mem = {}
        if not args.no_memory:
            mem_configs = args.configs if not args.tiny else [c for c in args.configs if c == "frozen0"]
            for key in mem_configs:
                mem[key] = measure_memory(model, key, args)
                log.info("%s %s: %s", model, key, {k: v for k, v in mem[key].items() if k in ("peak_mb", "error")})
        sections.append(section(model, times, desc, facts, mem, args))
        # written after every model, so a run cut short keeps what it measured
        write_text_atomic(args.out, _head(args, info, time.perf_counter() - started) + "\n".join(sections)
                          + ("" if args.tiny else FINDINGS))
    log.info("wrote %s (%.0f s)", args.out, time.perf_counter() - started)
    return 0


FINDINGS = """
## Findings

1. **Blending costs what its two branches cost.** At 0 < β < 1 a blended step stays below
   (dense step + compressed step) in every run (Targets above): Blend adds only the mix, and
   at β = 1 / β = 0 it skips the branch that does not contribute.
2. **After the transition the dense branch costs no time**: at β = 0 Blend skips it, and
   `set_beta` (so every BetaSchedule) drops the gradients of dense parameters the twin does not
   share, so optimizers skip them whatever `zero_grad` does (rows "β = 0 after β = 0.5 steps",
   with `set_to_none=True` and `False`; `dense .grad` column: None). Before that change,
   `zero_grad(set_to_none=False)` kept zero gradients that Adam kept stepping on with its
   momentum, 1.07–1.20 × the compressed step on CPU and 1.11–1.16 × on an H200 (session-1
   runs). The dense weights and their Adam state still cost **memory** until `vanish` (the
   "params / grads / Adam state" column): vanish, or re-create the optimizer, once β has reached 0.
3. **`freeze_dense=True` keeps no gradient and no Adam state for the dense branch**
   (`.grad is None`, 0 MB of state, lines under each table) and makes the transition cheaper
   (its β = 0.5 row, and its lower peak memory).
4. On a GPU at these small sizes the compressed model itself is slower than dense (more,
   thinner kernels; launch-bound): use larger batches, or CUDA graphs, to see its FLOP savings
   (the H200 run below).
"""


def _head(args, info: dict, total: float) -> str:
    return f"""# Training cost over the transition (β = 1 → 0)

Made by `{command_line()}` in {total / 60:.1f} min on {args.device} ({args.threads} torch thread(s) on CPU).
Machine: {machine_line(info)}.

Method: low-rank (`LowRankConfig(ratio=0.25)`), every Linear/Conv except the first and last,
layer granularity. One step = zero_grad + forward + loss + backward + Adam.step
(`torch.optim.Adam`, default foreach). Targets: blended step (0 < β < 1) ≤ 1.1 × (dense step +
compressed step); after β reaches 0, ≤ 1.05 × compressed step; with `freeze_dense=True` no
gradient is kept for the dense branch.

"""


if __name__ == "__main__":
    sys.exit(main())
