"""How fast the tool itself is → TOOLSPEED.md.

1. `vcon_fx.transform` on a BERT-base-sized model (transformers `BertModel(BertConfig())`,
   random, 110M parameters) against one forward + backward of that model, same process, same
   inputs (batch 8, seq 128), timed interleaved. Target: transform < 2 × forward+backward.
   transform runs with the default config (`svd="auto"`: the randomized SVD at rank 64) and
   with `svd="exact"`; a table times both SVD routes on one layer and says what the randomized
   one costs in accuracy.
2. `vcon-fx inspect torchvision:resnet50`: the `vcon_fx.plan` call (LowRankConfig(ratio=0.25),
   the CLI default), 1×3×224×224. Target: < 1 s. Also the whole CLI command, for reference.
3. Calibration on the same BERT-base: `transform` with `calibration=` (128 samples, the default)
   for each data-aware start against the plain start of the same method, same process: the
   statistics pass and the data-aware init timed apart, and the memory the statistics take.

Both are broken down by phase (wall time of capture, normalize, find_sites, select, plan,
duplicate, SVD, …, by wrapping the library's own functions) and profiled with cProfile.

    .venv/bin/python benchmarks/toolspeed.py                 # → benchmarks/TOOLSPEED.md
    .venv/bin/python benchmarks/toolspeed.py --tiny --out /tmp/t.md   # smoke test (tiny MLP, resnet18 32×32)
    .venv/bin/python benchmarks/toolspeed.py --parts calibration   # only part 3, spliced into TOOLSPEED.md
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import logging
import pstats
import re
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


# the two SVD routes' phase labels: their call counts say which route each layer took
_EXACT = "    exact route (float64 Gram + eigh)"
_RANDOMIZED = "    randomized route"


class Phases:
    """Wall time spent inside chosen library functions (patched for the duration of a `with`)."""

    # (module, attribute, label), a nested phase right after the one it runs inside; the api
    # module binds some names at import, so patch them there
    TARGETS = [
        ("vcon_fx.graph.pipeline", "capture_graph", "capture (torch.fx / torch.export)"),
        ("vcon_fx.graph.capture_fx", "trace_with_fx", "  torch.fx trace + check run"),
        ("vcon_fx.graph.capture_export", "trace_with_export", "  torch.export"),
        ("vcon_fx.graph.pipeline", "normalize", "normalize"),
        ("vcon_fx.graph.pipeline", "find_sites", "find_sites (a forward with hooks)"),
        ("vcon_fx.graph.pipeline", "select", "select"),
        ("vcon_fx.methods.lowrank", "choose_rank", "method.plan: choose_rank"),
        ("vcon_fx.graph.pipeline", "duplicate", "duplicate"),
        ("vcon_fx.methods.lowrank", "truncated_svd", "  truncated SVD"),
        ("vcon_fx.methods.svd", "exact_svd", _EXACT),
        ("vcon_fx.methods.svd", "randomized_svd", _RANDOMIZED),
    ]
    COPY = "copy.deepcopy (model copies)"

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
        api = importlib.import_module("vcon_fx.graph.pipeline")
        deepcopy = api.copy.deepcopy
        copy_mod = api.copy

        class _Copy:  # api.py calls copy.deepcopy: time it without touching the global copy module
            def __getattr__(self, name):
                return getattr(copy_mod, name)

        shim = _Copy()
        shim.deepcopy = self._wrap(deepcopy, self.COPY)
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
    # the TARGETS order, so an indented phase sits under the one it runs inside
    order = [Phases.COPY] + [label for _m, _a, label in Phases.TARGETS]
    rows = [[label, phases.calls[label], f"{phases.totals[label]:.2f}", f"{100 * phases.totals[label] / total:.0f}%"]
            for label in order if label in phases.totals]
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
    configs = {"transform": vcon_fx.LowRankConfig(rank=args.rank),  # the default: svd="auto"
               'transform, svd="exact"': vcon_fx.LowRankConfig(rank=args.rank, svd="exact")}
    params = sum(p.numel() for p in model.parameters())

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)
        (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float().pow(2).mean().backward()

    def transform(config=configs["transform"]):
        return vcon_fx.transform(model, config, example_kwargs=kwargs, seq_inputs=seq_inputs)

    fwd_bwd()  # warm-up (allocations, MKL/oneDNN initialisation)
    phases = Phases()
    t = time.perf_counter()
    with phases.active():
        transform()  # the first transform is also the phase breakdown
    first = time.perf_counter() - t
    candidates = {"forward+backward": fwd_bwd, **{name: (lambda c=c: transform(c)) for name, c in configs.items()}}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            t = time.perf_counter()
            fn()  # the result is dropped at once: one model copy alive at a time
            times[name].append(time.perf_counter() - t)
    fb = times["forward+backward"]
    ratios = {name: [a / b for a, b in zip(ts, fb)] for name, ts in times.items()}
    rows = [[name, f"{statistics.median(times[name]):.2f}", f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})"]
            for name, r in ratios.items()]
    ratio = statistics.median(ratios["transform"])
    exact = statistics.median(ratios['transform, svd="exact"'])
    routes = ", ".join(f"{phases.calls[label]} {label.strip().split(' ')[0]}" for label in (_EXACT, _RANDOMIZED))
    prof_text, prof_wall = cprofile_top(transform) if not args.tiny else ("(skipped in --tiny)", 0.0)
    svd = svd_table(args)
    return f"""## 1. transform on BERT-base ({params / 1e6:.0f}M params, random) vs one forward+backward

Inputs: batch {batch}, seq {seq} (input_ids, attention_mask, token_type_ids), the same tensors
for both; `LowRankConfig(rank={args.rank})` over every Linear but the pooler (72 layers of
768×768 / 768×3072), with the default `svd="auto"` (randomized when the rank is at most a
quarter of the layer's smaller side, and that side ≥ 256; this run's layers: {routes}) and with
`svd="exact"`. forward+backward: train mode, `last_hidden_state.pow(2).mean().backward()`.
torch threads: {torch.get_num_threads()}. {args.rounds} interleaved rounds (forward+backward,
transform, transform with svd="exact"); ratios are per-round, median (min–max).

{markdown_table(["what", "seconds (median)", "÷ forward+backward"], rows)}

Target transform < 2 × forward+backward: **{'MET' if ratio < 2 else 'MISSED'}** ({ratio:.2f}× with the
default config); with `svd="exact"` {exact:.2f}× ({'MET' if exact < 2 else 'MISSED'}).

Where the time goes (first transform, default config, {first:.1f} s, phases timed by wrapping
the library's functions; indented phases are inside the one above):

{phase_table(phases, first)}

cProfile of one transform ({prof_wall:.1f} s under the profiler), top by own time:

{prof_text}

{svd}
"""


def _median_s(fn, matrix, rank: int, threads: int, runs: int = 3) -> float:
    """Median wall time of fn(matrix, rank) on `threads` torch threads, after one warm-up call."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fn(matrix, rank)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn(matrix, rank)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return statistics.median(times)


def _relative_error(matrix, a, b) -> float:
    """‖W − A·B‖_F / ‖W‖_F, in float64."""
    w = matrix.double()
    return float((w - a.double() @ b.double()).norm() / w.norm())


def svd_table(args) -> str:
    """Truncated SVD of one BERT-base-sized layer: the library's two routes, their time per thread
    count and the randomized route's reconstruction error above the exact optimum."""
    import torch

    from vcon_fx.methods.svd import exact_svd, randomized_svd, use_randomized

    n = 768 if not args.tiny else 64
    torch.manual_seed(0)
    mats = {f"{n}×{n}": torch.randn(n, n), f"{4 * n}×{n}": torch.randn(4 * n, n)}
    routes = {"exact_svd": exact_svd, "randomized_svd": randomized_svd}
    default = torch.get_num_threads()
    threads = sorted({default, 1}, reverse=True)  # MKL's threads can cost more than they gain here
    rows = []
    for name, w in mats.items():
        ms = {(r, k): 1e3 * _median_s(fn, w, args.rank, k) for r, fn in routes.items() for k in threads}
        err = {r: _relative_error(w, *fn(w, args.rank)) for r, fn in routes.items()}
        excess = err["randomized_svd"] / max(err["exact_svd"], 1e-30) - 1
        auto = "randomized" if use_randomized(tuple(w.shape), args.rank) else "exact"
        rows.append([name, *(f"{ms[r, k]:.0f}" for r in routes for k in threads),
                     f"{ms['exact_svd', default] / ms['randomized_svd', default]:.1f}×",
                     f"{err['exact_svd']:.4f}", f"{100 * excess:+.2f}%", auto])
    heads = ["layer", *(f"{r} ms, {k} thread(s)" for r in routes for k in threads),
             f"exact ÷ randomized time ({default} thread(s))", "exact relative error ‖W−AB‖/‖W‖",
             "randomized error above exact", 'svd="auto" takes']
    return (f"Truncated SVD of one layer (rank {args.rank}, random Gaussian weights: a flat spectrum, the "
            "randomized route's hardest case), `vcon_fx.methods.svd` `exact_svd` (float64 Gram matrix + eigh) "
            "and `randomized_svd` (sketch + power iterations), median of 3 after a warm-up:\n\n"
            + markdown_table(heads, rows))


def inspect_part(args) -> str:
    import torch

    import vcon_fx
    from vcon_fx.sources.load import load_model

    name = "resnet50" if not args.tiny else "resnet18"
    shape = (1, 3, 224, 224) if not args.tiny else (1, 3, 32, 32)
    t = time.perf_counter()
    lm = load_model(f"torchvision:{name}", input_shape=shape)
    load_s = time.perf_counter() - t
    config = vcon_fx.LowRankConfig(ratio=0.25)

    def plan():
        return vcon_fx.plan(lm.module, config, example_inputs=lm.example_args)

    def forward():
        with torch.no_grad():
            lm.module(*lm.example_args)

    plan()  # warm-up
    phases = Phases()
    t = time.perf_counter()
    with phases.active():
        plan()
    first = time.perf_counter() - t
    candidates = {"forward (no grad)": forward, "plan": plan}
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(args.rounds * 2):
        for k, fn in candidates.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    rows = [[k, f"{statistics.median(v):.3f}", f"{min(v):.3f}"] for k, v in times.items()]
    plan_s = statistics.median(times["plan"])
    prof_text, prof_wall = cprofile_top(plan, 14)
    cli = cli_time(name, args)
    return f"""## 2. `vcon-fx inspect torchvision:{name}` (the `vcon_fx.plan` call)

`vcon_fx.plan(model, LowRankConfig(ratio=0.25), example_inputs=(x,))`, x = {list(shape)}, the
model already loaded (load_model: {load_s:.2f} s, not counted). torch threads: {torch.get_num_threads()}.
{args.rounds * 2} interleaved rounds.

{markdown_table(["what", "seconds (median)", "best"], rows)}

Target plan < 1 s: **{'MET' if plan_s < 1 else 'MISSED'}** ({plan_s:.2f} s, median; {plan_s / statistics.median(times["forward (no grad)"]):.1f}× one forward).

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


# ── 3. calibration and the data-aware starts ──────────────────────────────────────────────


class CalibrationPhases(Phases):
    """The calibration pass and each data-aware init, timed inside transform."""

    TARGETS = [
        ("vcon_fx.graph.calibrate", "gather_statistics", "statistics pass"),
        ("vcon_fx.methods.lowrank", "whitened_factors", "whitening"),
        ("vcon_fx.methods.lowrank", "truncated_svd", "truncated SVD"),
        ("vcon_fx.methods.prune", "feature_norms", "Wanda norms"),
        ("vcon_fx.methods.prune", "sparsegpt_prune", "SparseGPT"),
        ("vcon_fx.methods.quant_start", "clip_search_scales", "clip search"),
        ("vcon_fx.methods.quant_start", "gptq_quantize", "GPTQ"),
    ]
    INITS = ("whitening", "truncated SVD", "Wanda norms", "SparseGPT", "clip search", "GPTQ")


def _bert_setup(args):
    """(model, example kwargs, seq_inputs, calibration kwargs, what) for part 1's model, or the tiny encoder."""
    import torch
    from transformers import BertConfig, BertModel

    gen = torch.Generator().manual_seed(1)
    if args.tiny:
        model, seq = _tiny_encoder(), 16
        example = {"hidden": torch.randn(2, seq, 64)}
        return model, example, ("hidden",), {"hidden": torch.randn(args.calibration_samples, seq, 64, generator=gen)}, \
            "the tiny encoder (3 Linear layers)"
    model, seq = BertModel(BertConfig()), 128
    ids = lambda n: torch.randint(0, model.config.vocab_size, (n, seq), generator=gen)  # noqa: E731
    example = {"input_ids": ids(8), "attention_mask": torch.ones(8, seq, dtype=torch.long),
               "token_type_ids": torch.zeros(8, seq, dtype=torch.long)}
    n = args.calibration_samples
    calibration = {"input_ids": ids(n), "attention_mask": torch.ones(n, seq, dtype=torch.long),
                   "token_type_ids": torch.zeros(n, seq, dtype=torch.long)}
    return model, example, tuple(example), calibration, "BERT-base (random), 72 Linear layers of 768×768 / 768×3072"


def _calibration_cases(args):
    """(method, start, config, data-aware?) rows: each method's plain start first, its ratios' baseline."""
    import vcon_fx

    rank = args.rank
    return [
        ("low-rank, rank %d" % rank, "plain SVD", vcon_fx.LowRankConfig(rank=rank), False),
        ("low-rank, rank %d" % rank, "activation-aware (diagonal)", vcon_fx.LowRankConfig(rank=rank, activation_aware=True), True),
        ("low-rank, rank %d" % rank, "whitened (SVD-LLM)", vcon_fx.LowRankConfig(rank=rank), True),
        ("prune 50 %", "magnitude", vcon_fx.PruneConfig(sparsity=0.5), False),
        ("prune 50 %", "Wanda", vcon_fx.PruneConfig(sparsity=0.5), True),
        ("prune 50 %", "Wanda + SparseGPT", vcon_fx.PruneConfig(sparsity=0.5, sparsegpt=True), True),
        ("quant 4 bits", "max-abs (round to nearest)", vcon_fx.QuantConfig(bits=4), False),
        ("quant 4 bits", "clip search, input-weighted", vcon_fx.QuantConfig(bits=4, clip_search=True), True),
        ("quant 4 bits", "GPTQ", vcon_fx.QuantConfig(bits=4), True),
    ]


def calibration_part(args) -> str:
    """Part 3: the statistics pass and each data-aware start against the plain one, same model, same process."""
    import torch

    import vcon_fx
    from vcon_fx.graph.statistics import statistics_bytes

    started = time.perf_counter()
    model, example, seq_inputs, calibration, what = _bert_setup(args)
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][1:-1]  # the default: no stem, no head

    def fwd_bwd():
        model.train()
        model.zero_grad(set_to_none=True)
        out = model(**example)
        (out if isinstance(out, torch.Tensor) else out.last_hidden_state).float().pow(2).mean().backward()

    fwd_bwd()
    t = time.perf_counter()
    fwd_bwd()
    unit = time.perf_counter() - t
    vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=args.rank), example_kwargs=example, seq_inputs=seq_inputs)
    rows, plain_s = [], {}  # ↑ a warm-up: the first capture in a process pays for imports and caches
    for method, start, config, data_aware in _calibration_cases(args):
        phases = CalibrationPhases()
        t = time.perf_counter()
        with phases.active():
            vcon_fx.transform(model, config, example_kwargs=example, seq_inputs=seq_inputs,
                              calibration=calibration if data_aware else None)
        total = time.perf_counter() - t
        plain_s.setdefault(method, total)
        stats_s = phases.totals.get("statistics pass", 0.0)
        init_s = sum(phases.totals.get(k, 0.0) for k in CalibrationPhases.INITS)
        memory = statistics_bytes(layers, gram=config.calibrated(data_aware).needs_gram) if data_aware else 0
        rows.append([method, start, f"{total:.2f}", f"{stats_s:.2f}" if data_aware else "—", f"{init_s:.2f}",
                     f"{total / plain_s[method]:.2f}×", f"{total / unit:.1f}×",
                     f"{memory / 1e6:.0f} MB" if memory >= 1e6 else (f"{memory / 1e3:.0f} kB" if memory else "—")])
        log.info("calibration part: %s / %s %.1f s", method, start, total)
    minutes = (time.perf_counter() - started) / 60
    return f"""## 3. Calibration and the data-aware starts on {what}

Made by `{command_line()}` in {minutes:.1f} min (this section alone; the others by the command at the top).
`vcon_fx.transform(model, config, example_kwargs=…, calibration=…)` with {args.calibration_samples} calibration
samples (the library's default is 128) of random inputs shaped like the example's, read in batches of 16,
against the same transform without calibration data (the plain start of the same method), one run
each in this process. forward+backward: part 1's unit, {unit:.2f} s here. "statistics pass" is the
streaming pass (`graph/statistics.py`: per-feature second moments, plus XᵀX for whitening, SparseGPT
and GPTQ); "init" is the time inside the start's own functions (whitening's Cholesky + SVD, the
truncated SVD, Wanda's norms, SparseGPT's and GPTQ's sweeps, the clip search); the rest is capture,
the other twins' construction and copies, as in part 1. "statistics" is what they hold at once
(`statistics_bytes`; XᵀX: in_features² × 8 bytes per layer). torch threads: {torch.get_num_threads()}.

{markdown_table(["method", "start", "transform s", "statistics pass s", "init s", "÷ plain start",
                 "÷ forward+backward", "statistics"], rows)}
"""


def splice(existing: str, sections: list[str]) -> str:
    """`existing` with each of `sections` in place of its namesake ("## 3. …"), or before the findings (pure)."""
    parts = re.split(r"(?m)^(?=## )", existing)
    for section in sections:
        key = section.split(" ", 2)[1]  # "3."
        at = next((i for i, p in enumerate(parts) if p.startswith(f"## {key} ")), None)
        if at is None:
            at = next((i for i, p in enumerate(parts) if p.startswith("## Why")), len(parts))
            parts.insert(at, section.rstrip() + "\n\n")
        else:
            parts[at] = section.rstrip() + "\n\n"
    return "".join(parts)


FINDINGS = """
## Why, and what the library does about it

1. **The SVD set transform's price** (`vcon_fx/methods/svd.py`). With the exact route,
   transform's time is the `torch.linalg.eigh` of each layer's float64 Gram matrix: O(n³) in
   the layer's smaller side, whatever the rank. `LowRankConfig(svd="auto")`, the default, now
   takes a randomized range finder (a seeded Gaussian sketch of rank + 16 columns, a few power
   iterations, an exact SVD of the small projection) when the rank is at most a quarter of the
   smaller side and that side is ≥ 256: every BERT-base layer at rank 64. Table 1 compares
   transform with the default and with `svd="exact"` against the target; the per-layer table
   gives each route's time and what the randomized one costs, its reconstruction error above
   the exact optimum (on random weights, a flat spectrum, its hardest case; trained weights
   decay faster). `svd="exact"` (CLI `--svd exact`) keeps the optimum where it matters, e.g.
   when the model is used without fine-tuning.
2. **SVD threads.** MKL's threaded LAPACK gains little on problems this small and loses when its
   threads compete with other work (this shared machine; a training job's data loaders
   elsewhere): the per-layer table times both routes on the default thread count and on one.
   The library leaves torch's thread count alone; on a loaded machine, `torch.set_num_threads(1)`
   around transform is the caller's choice.
3. **One forward fewer** (capture.py `_fx_trace`, select.py `find_sites`). `plan` used to run
   the model three times on the example inputs: the original and the traced graph in capture's
   check run, then the graph again in `find_sites` for the layers' output shapes. The check run
   now records every Linear/Conv output shape (forward hooks on the traced graph's modules) in
   `gm.meta["vcon_shapes"]` with the inputs' signature, and `find_sites` takes them when the
   inputs match and every called layer has one (torch.export graphs and lifted functional
   layers still run the extra forward). What is left of `plan` is the check run itself (two
   forwards), one deep copy of the model and the per-layer checks (finite weights), so its
   time is about two forwards plus a little (the "× one forward" figure above).
4. **Example inputs set the price** of capture's check run and `find_sites`: they run at the
   size given. Small example inputs (batch 1–2, a short sequence) capture the same graph
   faster; the plan's FLOPs then refer to that shape.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "TOOLSPEED.md"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own default)")
    parser.add_argument("--parts", default="bert,inspect,calibration",
                        help="bert, inspect, calibration; a subset is spliced into an existing --out")
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--tiny", action="store_true", help="a tiny MLP and resnet18 at 32×32, 1 round: smoke test")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rounds, args.rank, args.calibration_samples = 1, 8, 32
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
    if "calibration" in parts:
        sections.append(calibration_part(args))
        log.info("calibration part done (%.0f s)", time.perf_counter() - started)
    total = time.perf_counter() - started
    head = (f"# Tool speed: transform and inspect\n\nMade by `{command_line()}` in {total / 60:.1f} min.\n"
            f"Machine: {machine_line(info)}.\n\n")
    if set(parts) != {"bert", "inspect", "calibration"} and Path(args.out).is_file() and not args.tiny:
        write_text_atomic(args.out, splice(Path(args.out).read_text(), sections))
    else:
        write_text_atomic(args.out, head + "\n".join(sections) + ("" if args.tiny else FINDINGS))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
