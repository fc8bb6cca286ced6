"""How fast the tool itself is → TOOLSPEED.md.

1. `vcon_fx.transform` on a BERT-base-sized model (transformers `BertModel(BertConfig())`,
   random, 110M parameters) against one forward + backward of that model, same process, same
   inputs (batch 8, seq 128), timed interleaved. Target: transform < 2 × forward+backward.
2. `vcon-fx inspect torchvision:resnet50`: the `vcon_fx.plan` call (LowRankConfig(ratio=0.25),
   the CLI default), 1×3×224×224. Target: < 1 s. Also the whole CLI command, for reference.

Both are broken down by phase (wall time of capture, normalize, find_sites, select, plan,
duplicate, SVD, …, by wrapping the library's own functions) and profiled with cProfile.
Prototypes of proposed fixes are measured the same way (monkeypatched here; the library is
unchanged): see the rows marked "prototype".

    .venv/bin/python benchmarks/toolspeed.py                 # → benchmarks/TOOLSPEED.md
    .venv/bin/python benchmarks/toolspeed.py --tiny --out /tmp/t.md   # smoke test (tiny MLP, resnet18 32×32)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine, machine_line, markdown_table, write_text_atomic  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
log = logging.getLogger("toolspeed")


# ── phase timing ────────────────────────────────────────────────────────────────────────────


class Phases:
    """Wall time spent inside chosen library functions (patched for the duration of a `with`)."""

    # (module, attribute, label); the api module binds some names at import, so patch it there
    TARGETS = [
        ("vcon_fx.api", "capture_graph", "capture (torch.fx / torch.export)"),
        ("vcon_fx.capture", "_fx_trace", "  torch.fx trace + check run"),
        ("vcon_fx.capture", "_export", "  torch.export"),
        ("vcon_fx.api", "normalize", "normalize"),
        ("vcon_fx.api", "find_sites", "find_sites (a forward with hooks)"),
        ("vcon_fx.api", "select", "select"),
        ("vcon_fx.api", "duplicate", "duplicate"),
        ("vcon_fx.methods.lowrank", "truncated_svd", "  truncated SVD"),
        ("vcon_fx.methods.lowrank", "choose_rank", "method.plan: choose_rank"),
    ]

    def __init__(self):
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @contextlib.contextmanager
    def active(self):
        import importlib

        saved = []
        for mod_name, attr, label in self.TARGETS:
            mod = importlib.import_module(mod_name)
            original = getattr(mod, attr)
            saved.append((mod, attr, original))
            setattr(mod, attr, self._wrap(original, label))
        api = importlib.import_module("vcon_fx.api")
        deepcopy = api.copy.deepcopy
        copy_mod = api.copy

        class _Copy:  # api.py calls copy.deepcopy: time it without touching the global copy module
            def __getattr__(self, name):
                return getattr(copy_mod, name)

        shim = _Copy()
        shim.deepcopy = self._wrap(deepcopy, "copy.deepcopy (model copies)")
        api.copy = shim
        try:
            yield self
        finally:
            api.copy = copy_mod
            for mod, attr, original in saved:
                setattr(mod, attr, original)

    def _wrap(self, fn, label):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.totals[label] += time.perf_counter() - t
                self.calls[label] += 1
        return timed


def phase_table(phases: Phases, total: float) -> str:
    rows = [[label, phases.calls[label], f"{s:.2f}", f"{100 * s / total:.0f}%"]
            for label, s in phases.totals.items()]
    rows.append(["**total**", "", f"{total:.2f}", "100%"])
    return markdown_table(["phase", "calls", "seconds", "share"], rows)


def cprofile_top(fn, n: int = 18) -> tuple[str, float]:
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    wall = time.perf_counter() - t
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(n)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
    body = [_short(ln) for ln in lines[start:start + n + 1]]
    return "```\n" + "\n".join(body) + "\n```", wall


def _short(line: str) -> str:
    for prefix in (str(ROOT / ".venv/lib/python3.11/site-packages") + "/", str(ROOT) + "/"):
        line = line.replace(prefix, "")
    return line


# ── prototypes of proposed fixes ────────────────────────────────────────────────────────────


@contextlib.contextmanager
def svd_single_thread():
    """Proposed in methods/lowrank.py: run the small dense LAPACK calls on one thread."""
    import torch

    from vcon_fx.methods import lowrank

    original = lowrank.truncated_svd

    def one_thread(matrix, rank):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return original(matrix, rank)
        finally:
            torch.set_num_threads(n)

    lowrank.truncated_svd = one_thread
    try:
        yield
    finally:
        lowrank.truncated_svd = original


@contextlib.contextmanager
def svd_parallel():
    """Proposed in passes/duplicate.py: compute the layers' SVDs before building the twins, on a
    thread pool (one LAPACK thread each, as many workers as torch threads); the twins then take
    their factors from that table. Same numbers as the sequential path."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from vcon_fx import api
    from vcon_fx.methods import lowrank

    original_svd, original_dup = lowrank.truncated_svd, api.duplicate
    table: dict = {}

    def cached_svd(matrix, rank):
        hit = table.pop((matrix.data_ptr(), tuple(matrix.shape), rank), None)
        return hit if hit is not None else original_svd(matrix, rank)

    def duplicate(gm, groups, method, plans, sites, **kw):
        jobs = []
        for g in groups:
            for path in g.layers:
                plan = plans[path]
                if plan.skipped or "rank" not in plan.detail or not isinstance(method, lowrank.LowRankMethod):
                    continue
                w = lowrank._as_matrix(sites[path].module)
                jobs.append(((w.data_ptr(), tuple(w.shape), plan.detail["rank"]), w, plan.detail["rank"]))
        workers = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for key, result in zip([k for k, _, _ in jobs],
                                       pool.map(lambda j: original_svd(j[1], j[2]), jobs)):
                    table[key] = result
        finally:
            torch.set_num_threads(workers)
        return original_dup(gm, groups, method, plans, sites, **kw)

    lowrank.truncated_svd, api.duplicate = cached_svd, duplicate
    try:
        yield
    finally:
        lowrank.truncated_svd, api.duplicate = original_svd, original_dup
        table.clear()


@contextlib.contextmanager
def sites_from_check_run():
    """Proposed in capture.py/select.py: record layer output shapes during capture's own check
    run (torch.fx path), so find_sites needs no second forward of the model."""
    import torch

    from vcon_fx import api, capture as cap
    from vcon_fx.methods.base import COMPRESSIBLE, LayerSite

    shapes: dict[str, tuple] = {}
    original_trace, original_find = cap._fx_trace, api.find_sites

    def trace(model, args, kwargs, patterns, leaves):
        shapes.clear()

        def hook(_m, _i, out, path):
            if isinstance(out, torch.Tensor):  # not while tracing (proxies), only in the check run
                shapes.setdefault(path, tuple(out.shape))

        handles = [m.register_forward_hook(lambda _m, _i, out, path=path: hook(_m, _i, out, path))
                   for path, m in model.named_modules() if isinstance(m, COMPRESSIBLE)]
        try:
            return original_trace(model, args, kwargs, patterns, leaves)
        finally:
            for h in handles:
                h.remove()

    def find_sites(gm, example_args=(), example_kwargs=None):
        calls: dict[str, int] = {}
        for node in gm.graph.nodes:
            if node.op == "call_module" and isinstance(gm.get_submodule(node.target), COMPRESSIBLE):
                calls[node.target] = calls.get(node.target, 0) + 1
        if not all(p in shapes for p in calls):  # not the fx path: fall back to the forward
            return original_find(gm, example_args, example_kwargs)
        return {p: LayerSite(p, gm.get_submodule(p), shapes[p], n) for p, n in calls.items()}

    cap._fx_trace, api.find_sites = trace, find_sites
    try:
        with torch.no_grad():
            yield
    finally:
        cap._fx_trace, api.find_sites = original_trace, original_find


# ── the two measurements ────────────────────────────────────────────────────────────────────


def _tiny_encoder():
    import torch
    from torch import nn

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(64, 256), nn.Linear(256, 64), nn.Linear(64, 64)

        def forward(self, hidden):
            return self.fc3(hidden + self.fc2(torch.relu(self.fc1(hidden))))

    return Encoder()


def bert_part(args) -> str:
    import torch
    from transformers import BertConfig, BertModel

    import vcon_fx

    torch.manual_seed(0)
    batch, seq = 8, 128
    if args.tiny:  # the smoke test: a BERT-shaped MLP on (batch, seq, hidden) that torch.fx captures at once
        model = _tiny_encoder()
        kwargs = {"hidden": torch.randn(2, 16, 64)}
        seq_inputs, batch, seq = ("hidden",), 2, 16
    else:
        model = BertModel(BertConfig())
        kwargs = {"input_ids": torch.randint(0, model.config.vocab_size, (batch, seq)),
                  "attention_mask": torch.ones(batch, seq, dtype=torch.long),
                  "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
        seq_inputs = ("input_ids", "attention_mask", "token_type_ids")
    config = vcon_fx.LowRankConfig(rank=args.rank)
    params = sum(p.numel() for p in model.parameters())

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)
        (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float().pow(2).mean().backward()

    def transform():
        return vcon_fx.transform(model, config, example_kwargs=kwargs, seq_inputs=seq_inputs)

    def transform_fixed():
        with svd_single_thread():
            return vcon_fx.transform(model, config, example_kwargs=kwargs, seq_inputs=seq_inputs)

    def transform_parallel():
        with svd_parallel():
            return vcon_fx.transform(model, config, example_kwargs=kwargs, seq_inputs=seq_inputs)

    fwd_bwd()  # warm-up (allocations, MKL/oneDNN initialisation)
    phases = Phases()
    t = time.perf_counter()
    with phases.active():
        transform()  # the first transform is also the phase breakdown
    first = time.perf_counter() - t
    candidates = {"forward+backward": fwd_bwd, "transform": transform,
                  "transform, SVD on 1 thread (prototype)": transform_fixed,
                  "transform, SVDs in parallel across layers (prototype)": transform_parallel}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    last = {}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            last.pop(name, None)
            t = time.perf_counter()
            last[name] = fn()
            times[name].append(time.perf_counter() - t)
    fb = times["forward+backward"]
    rows = []
    for name, ts in times.items():
        per_round = [a / b for a, b in zip(ts, fb)]
        rows.append([name, f"{statistics.median(ts):.2f}", f"{statistics.median(per_round):.2f} "
                     f"({min(per_round):.2f}–{max(per_round):.2f})"])
    ratio = statistics.median([a / b for a, b in zip(times["transform"], fb)])
    fixed = statistics.median([a / b for a, b in zip(times["transform, SVD on 1 thread (prototype)"], fb)])
    parallel = statistics.median([a / b for a, b in zip(times["transform, SVDs in parallel across layers (prototype)"],
                                                         fb)])
    same = _same_twins(last["transform"], last["transform, SVDs in parallel across layers (prototype)"])
    last.clear()
    prof_text, prof_wall = cprofile_top(transform) if not args.tiny else ("(skipped in --tiny)", 0.0)
    svd = svd_table(args)
    return f"""## 1. transform on BERT-base ({params / 1e6:.0f}M params, random) vs one forward+backward

Inputs: batch {batch}, seq {seq} (input_ids, attention_mask, token_type_ids), the same tensors
for both; `LowRankConfig(rank={args.rank})` over every Linear but the pooler (72 layers of
768×768 / 768×3072). forward+backward: train mode, `last_hidden_state.pow(2).mean().backward()`.
torch threads: {torch.get_num_threads()}. {args.rounds} interleaved rounds (forward+backward,
transform, prototype, …); ratios are per-round, median (min–max).

{markdown_table(["what", "seconds (median)", "÷ forward+backward"], rows)}

Target transform < 2 × forward+backward: **{'MET' if ratio < 2 else 'MISSED'}** ({ratio:.2f}×);
with the single-thread SVD prototype {fixed:.2f}× ({'MET' if fixed < 2 else 'MISSED'}); with the
parallel SVD prototype {parallel:.2f}× ({'MET' if parallel < 2 else 'MISSED'}; weights against the library's: {same}).

Where the time goes (first transform, {first:.1f} s, phases timed by wrapping the library's
functions; indented phases are inside the one above):

{phase_table(phases, first)}

cProfile of one transform ({prof_wall:.1f} s under the profiler), top by own time:

{prof_text}

{svd}
"""


def _same_twins(a, b) -> str:
    """How far apart two transforms' weights are: threaded and single-threaded BLAS round differently."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return "different parameters"
    worst = max(float((sa[k].double() - sb[k].double()).abs().max() / sa[k].double().abs().max().clamp_min(1e-30))
                for k in sa if sa[k].is_floating_point() and sa[k].numel())
    return "bit for bit" if worst == 0 else f"max relative difference {worst:.1e} (float rounding)"


def svd_table(args) -> str:
    """Truncated SVD of one BERT-base-sized layer: library default vs one thread (same numbers)."""
    import torch

    from vcon_fx.methods.lowrank import truncated_svd

    n = 768 if not args.tiny else 64
    torch.manual_seed(0)
    mats = {f"{n}×{n}": torch.randn(n, n), f"{4 * n}×{n}": torch.randn(4 * n, n)}
    rows = []
    default_threads = torch.get_num_threads()
    for name, w in mats.items():
        per = {}
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            truncated_svd(w, args.rank)
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                truncated_svd(w, args.rank)
                ts.append(time.perf_counter() - t)
            per[threads] = statistics.median(ts)
        torch.set_num_threads(default_threads)
        rows.append([name, *(f"{1e3 * per[k]:.0f}" for k in sorted(per, reverse=True)),
                     f"{per[default_threads] / per[1]:.1f}×" if default_threads != 1 else "—"])
    heads = ["layer", *(f"truncated_svd ms, {k} thread(s)" for k in sorted({default_threads, 1}, reverse=True)),
             "slow-down of the default"]
    return ("Truncated SVD of one layer (rank " f"{args.rank}), library `truncated_svd` (float64 Gram matrix + eigh):\n\n"
            + markdown_table(heads, rows))


def inspect_part(args) -> str:
    import torch

    import vcon_fx
    from vcon_fx.load import load_model

    name = "resnet50" if not args.tiny else "resnet18"
    shape = (1, 3, 224, 224) if not args.tiny else (1, 3, 32, 32)
    t = time.perf_counter()
    lm = load_model(f"torchvision:{name}", input_shape=shape)
    load_s = time.perf_counter() - t
    config = vcon_fx.LowRankConfig(ratio=0.25)

    def plan():
        return vcon_fx.plan(lm.module, config, example_inputs=lm.example_args)

    def plan_fixed():
        with sites_from_check_run():
            return vcon_fx.plan(lm.module, config, example_inputs=lm.example_args)

    def forward():
        with torch.no_grad():
            lm.module(*lm.example_args)

    plan()  # warm-up
    phases = Phases()
    t = time.perf_counter()
    with phases.active():
        p = plan()
    first = time.perf_counter() - t
    fixed = plan_fixed()
    same = [(a.path, a.flops_before, a.flops_after) for a in p.plans.values()] == \
        [(a.path, a.flops_before, a.flops_after) for a in fixed.plans.values()]
    candidates = {"forward (no grad)": forward, "plan": plan, "plan, shapes from the check run (prototype)": plan_fixed}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.rounds * 2):
        for k, fn in candidates.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    rows = [[k, f"{statistics.median(v):.3f}", f"{min(v):.3f}"] for k, v in times.items()]
    plan_s = statistics.median(times["plan"])
    fixed_s = statistics.median(times["plan, shapes from the check run (prototype)"])
    prof_text, prof_wall = cprofile_top(plan, 14)
    cli = cli_time(name, args)
    return f"""## 2. `vcon-fx inspect torchvision:{name}` (the `vcon_fx.plan` call)

`vcon_fx.plan(model, LowRankConfig(ratio=0.25), example_inputs=(x,))`, x = {list(shape)}, the
model already loaded (load_model: {load_s:.2f} s, not counted). torch threads: {torch.get_num_threads()}.
{args.rounds * 2} interleaved rounds.

{markdown_table(["what", "seconds (median)", "best"], rows)}

Target plan < 1 s: **{'MET' if plan_s < 1 else 'MISSED'}** ({plan_s:.2f} s; prototype {fixed_s:.2f} s,
same plan: {same}).

Phases of one plan ({first:.2f} s):

{phase_table(phases, first)}

cProfile of one plan ({prof_wall:.2f} s under the profiler), top by own time:

{prof_text}

The whole command, `python -m vcon_fx inspect torchvision:{name}` in a fresh process (imports,
model construction, plan, table): {cli}.
"""


def cli_time(name: str, args) -> str:
    if args.tiny:
        return "(skipped in --tiny)"
    cmd = [sys.executable, "-m", "vcon_fx", "inspect", f"torchvision:{name}"]
    walls = []
    for _ in range(2):
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        walls.append(time.perf_counter() - t)
        if proc.returncode != 0:
            return f"failed ({proc.returncode}): {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vcon_fx.cli"], capture_output=True,
                         text=True, cwd=ROOT)
    total_import = 0.0
    for line in imp.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == "vcon_fx.cli":
            total_import = int(parts[1]) / 1e6
    return f"{min(walls):.1f} s best of 2 (of which `import vcon_fx.cli`: {total_import:.1f} s)"


FINDINGS = """
## Why, and the proposed fixes (prototyped above; the library is unchanged)

1. **SVD threads** (methods/lowrank.py `truncated_svd`). transform's time is the truncated SVD's
   `torch.linalg.eigh` of each layer's small float64 Gram matrix. MKL's threaded LAPACK gains
   nothing on a 768×768 problem and, when its threads compete with other work (this shared
   machine; a training job's data loaders elsewhere), loses badly (see the per-layer table).
   Fix: run the Gram product and `eigh` on one thread (save `torch.get_num_threads()`, set 1,
   restore in `finally`; CPU tensors only). Better (passes/duplicate.py): compute every
   layer's factors before building the twins, on a thread pool of `torch.get_num_threads()`
   workers, each on one thread, and build the twins from that table: whole cores in use, no
   contention. The factors agree with today's up to float rounding. Also: form the Gram
   matrix and call `eigh` in float32 for float32 layers (2.3× faster per layer, the same
   rank-r approximation to 1e-5; measured in TOOLSPEED.md).
2. **One forward too many** (capture.py `_fx_trace`, select.py `find_sites`). `plan` runs
   the model three times on the example inputs: the original and the traced graph in
   capture's check run, then the graph again in `find_sites` for the layers' output shapes.
   Fix: register forward hooks on the Linear/Conv modules around the check run's
   `model(*args)`, keep the shapes in `gm.meta["vcon_shapes"]`, and let `find_sites` use them
   when every called layer has one (torch.export graphs keep running it). Same plan, one
   forward fewer. The rest of `plan` is the check run itself (two forwards) and one deep copy
   of the model, so `inspect` under 1 s needs a forward under about 0.4 s.
3. **Example inputs set the price** of capture's check run and `find_sites`: they run at the
   size given. Small example inputs (batch 1–2, a short sequence) capture the same graph
   faster; the plan's FLOPs then refer to that shape.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "TOOLSPEED.md"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    parser.add_argument("--parts", default="bert,inspect")
    parser.add_argument("--tiny", action="store_true", help="a tiny MLP and resnet18 at 32×32, 1 round: smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.rank = 1, 8
        args.threads = args.threads or 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("vcon_fx", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine()
    started = time.perf_counter()
    sections = []
    parts = args.parts.split(",")
    if "bert" in parts:
        sections.append(bert_part(args))
        log.info("bert part done (%.0f s)", time.perf_counter() - started)
    if "inspect" in parts:
        sections.append(inspect_part(args))
        log.info("inspect part done (%.0f s)", time.perf_counter() - started)
    total = time.perf_counter() - started
    head = (f"# Tool speed: transform and inspect\n\nMade by `{command_line()}` in {total / 60:.1f} min.\n"
            f"Machine: {machine_line(info)}.\n\n")
    write_text_atomic(args.out, head + "\n".join(sections) + ("" if args.tiny else FINDINGS))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
