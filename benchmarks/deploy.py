"""Deployed speed, size and fidelity of vcon-fx compressed models in onnxruntime (CPU) → DEPLOY.md.

For each model: the dense ONNX export; low-rank at several ranks (for resnet50 also with
`rank_multiple=16`, CLI `--rank-multiple 16`); int8 (method `quant`, bits=8, vanished → exported
→ `compress_onnx_weights`, once weight-only and once with `kernel="dynamic"`, CLI
`--dynamic-int8`); low-rank + int8 (`compose`, both kernels); structured pruning when the method
offers it; and the baseline a user would otherwise pick, onnxruntime's own `quantize_dynamic` of
the dense ONNX. Every model goes through the public pipeline (transform → set_beta(0) → vanish →
export_onnx), at β = 0 without fine-tuning, captured the library's default way (capture "auto").
Every session, dense included, is opened with `vcon_fx.bench.worker.session_config(path)`, the entries
`vcon-fx bench` would use for that file.

Latency is a ratio against the dense model, measured in one process with every session
interleaved round by round (the machine is shared; see common.py). The FLOP ratio is
Σ FLOPs after / Σ FLOPs before over every Linear/Conv of the model (the compressed layers from
the vcon plan, the rest counted dense by torch's FlopCounterMode); attention matmuls (QKᵀ, AV),
norms, activations and embeddings are not counted in it (a second column includes attention).
onnxruntime's profiler splits each model's time into matmul/conv ops ("GEMM") and the rest,
which says why a latency ratio lands where it does.

    .venv/bin/python benchmarks/deploy.py                       # MiniLM, resnet50, vit_b_16 → benchmarks/DEPLOY.md
    .venv/bin/python benchmarks/deploy.py --models resnet50 --out /tmp/d.md
    .venv/bin/python benchmarks/deploy.py --tiny --out /tmp/d.md   # smoke test (tiny MLP and CNN, 2 rounds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (GEMM_OPS, command_line, cosine, fmt_ratio, interleave, machine, machine_line,  # noqa: E402
                    markdown_table, ort_op_profiles, ort_session, ratio_of, write_text_atomic)

HERE = Path(__file__).resolve().parent
log = logging.getLogger("deploy")


# ── models ──────────────────────────────────────────────────────────────────────────────────


@dataclass
class Loaded:
    module: object
    args: tuple
    kwargs: dict
    seq_inputs: tuple
    feeds: Callable[[int], dict]  # batch → onnxruntime feeds (same for every variant)
    what: str


@dataclass
class Spec:
    name: str
    load: Callable[[], Loaded]
    batches: tuple[int, ...]
    lowrank: list  # [(label, LowRankConfig)]
    compose_rank: object  # the LowRankConfig used with int8
    prune_blocks: tuple = ()  # --blocks for structured pruning (block granularity); () = not tried
    compose: bool = True


def _text_feeds(vocab: int, seq: int) -> Callable[[int], dict]:
    def feeds(batch: int) -> dict:
        rng = np.random.default_rng(0)
        lo, hi = (1000, vocab - 1000) if vocab > 4000 else (1, vocab)  # real word pieces, not [unused]
        return {"input_ids": rng.integers(lo, hi, (batch, seq)).astype(np.int64),
                "attention_mask": np.ones((batch, seq), np.int64),
                "token_type_ids": np.zeros((batch, seq), np.int64)}
    return feeds


def _image_feeds(size: int) -> Callable[[int], dict]:
    def feeds(batch: int) -> dict:
        return {"x": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}
    return feeds


def load_minilm(seq: int = 128) -> Loaded:
    from vcon_fx.sources.load import load_model, minilm_path

    # batch 2 in the example inputs: torch.export specializes a size-1 dim, and the ONNX
    # model must take batch 1 and 8
    lm = load_model(str(minilm_path()), seq_len=seq, batch_size=2)
    vocab = lm.module.config.vocab_size
    return Loaded(lm.module, tuple(lm.example_args), dict(lm.example_kwargs or {}), tuple(lm.seq_inputs),
                  _text_feeds(vocab, seq), f"all-MiniLM-L6-v2 (pretrained, {_params(lm.module)}), seq {seq}")


def load_tiny_mlp() -> Loaded:
    import torch
    from torch import nn

    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128),
                           nn.ReLU(), nn.Linear(128, 10)).eval()

    def feeds(batch: int) -> dict:
        return {"input": np.random.default_rng(0).standard_normal((batch, 32)).astype(np.float32)}

    return Loaded(module, (torch.randn(2, 32),), {}, (), feeds, f"tiny MLP (random, {_params(module)})")


def load_tiny_cnn() -> Loaded:
    """Convolutions only: the smoke test's path through session_config and a dropped dynamic row."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    # stem and head stay dense by default: the two convolutions between them are compressed
    module = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                           nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                           nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                           nn.Conv2d(32, 16, 1)).eval()

    def feeds(batch: int) -> dict:
        return {"input": np.random.default_rng(0).standard_normal((batch, 3, 16, 16)).astype(np.float32)}

    return Loaded(module, (torch.randn(2, 3, 16, 16),), {}, (), feeds, f"tiny CNN (random, {_params(module)}), 16×16")


def load_torchvision(name: str, size: int = 224, batch: int = 1) -> Callable[[], Loaded]:
    def load() -> Loaded:
        import torch
        from vcon_fx.sources.load import load_model

        torch.manual_seed(0)
        lm = load_model(f"torchvision:{name}", input_shape=(batch, 3, size, size))
        head = getattr(getattr(lm.module, "heads", None), "head", None)
        if head is not None:  # torchvision's ViT starts its head at zero: every output would be 0
            torch.nn.init.normal_(head.weight, std=0.02)
        return Loaded(lm.module, tuple(lm.example_args), dict(lm.example_kwargs or {}), tuple(lm.seq_inputs),
                      _image_feeds(size), f"torchvision {name} (random weights, {_params(lm.module)}), {size}×{size}")
    return load


def _params(module) -> str:
    n = sum(p.numel() for p in module.parameters())
    return f"{n / 1e6:.1f}M params"


def specs(tiny: bool) -> dict[str, Spec]:
    from vcon_fx import LowRankConfig

    if tiny:
        return {"tiny_mlp": Spec("tiny_mlp", load_tiny_mlp, (1, 2), [("rank 16", LowRankConfig(rank=16))],
                                 LowRankConfig(rank=16), compose=False),
                "tiny_cnn": Spec("tiny_cnn", load_tiny_cnn, (1,), [("rank 8", LowRankConfig(rank=8))],
                                 LowRankConfig(rank=8), compose=False)}
    return {
        "minilm": Spec("minilm", load_minilm, (1, 8),
                       [("rank 128", LowRankConfig(rank=128)), ("rank 64", LowRankConfig(rank=64)),
                        ("rank 32", LowRankConfig(rank=32))], LowRankConfig(rank=64),
                       prune_blocks=("encoder.layer.*.intermediate+output",)),
        # ratio/energy ranks (25, 28, …) miss onnxruntime's NCHWc conv kernels (blocks of 16
        # channels): the --rank-multiple 16 rows measure the library's rounding against them
        "resnet50": Spec("resnet50", load_torchvision("resnet50"), (1,),
                         [("ratio 0.5", LowRankConfig(ratio=0.5)), ("ratio 0.25", LowRankConfig(ratio=0.25)),
                          ("ratio 0.5, --rank-multiple 16", LowRankConfig(ratio=0.5, rank_multiple=16)),
                          ("ratio 0.25, --rank-multiple 16", LowRankConfig(ratio=0.25, rank_multiple=16))],
                         LowRankConfig(ratio=0.25), prune_blocks=("layer*.*",)),
        # Capture "auto" opens nn.MultiheadAttention (torch.export) so its projections are
        # compressed too. Batch 2 in the example: export specializes a size-1 batch.
        "vit_b_16": Spec("vit_b_16", load_torchvision("vit_b_16", batch=2), (1,),
                         [("rank 256", LowRankConfig(rank=256)), ("rank 128", LowRankConfig(rank=128))],
                         LowRankConfig(rank=128), prune_blocks=("encoder.layers.*.mlp",)),
    }


# ── FLOPs ───────────────────────────────────────────────────────────────────────────────────

_LAYER_OPS = ("mm", "addmm", "convolution", "_convolution", "linear")


def dense_flops(loaded: Loaded) -> tuple[float, float]:
    """(Linear/Conv FLOPs, attention-matmul FLOPs) of one dense forward on the example inputs.

    Counted with gradients enabled: torch's no-grad fast paths (nn.MultiheadAttention's
    native kernel) are invisible to FlopCounterMode.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.enable_grad():
        loaded.module(*loaded.args, **loaded.kwargs)
    layers = attention = 0.0
    for op, n in counter.get_flop_counts()["Global"].items():
        name = str(op).split(".")[1] if "." in str(op) else str(op)
        if name in _LAYER_OPS:
            layers += n
        else:  # bmm, baddbmm, scaled-dot-product attention
            attention += n
    return layers, attention


def flop_ratios(plans: dict, layers: float, attention: float) -> tuple[float, float]:
    """(linear/conv FLOP ratio, ratio with attention matmuls counted too), whole model."""
    saved = sum(p.flops_before - p.flops_after for p in plans.values() if not p.skipped)
    return (layers - saved) / layers, (layers + attention - saved) / (layers + attention)


# ── building the variants ──────────────────────────────────────────────────────────────────


@dataclass
class Variant:
    label: str
    kind: str  # dense | lowrank | int8 | lowrank+int8 | ort | prune
    path: Path | None
    flops: tuple[float, float] | None = None
    note: str = ""
    export_s: float = 0.0
    error: str | None = None
    ranks: str = ""
    options: dict | None = None  # onnxruntime session config entries (vcon_fx.bench.worker.session_config)


# compress_onnx_weights kernels → (label suffix, file suffix); "dynamic" is `export --dynamic-int8`
KERNELS = {"weight-only": ("", ""), "dynamic": (", --dynamic-int8", "_dynamic")}

# why vcon_fx.bench.worker.session_config asks for an entry (said next to the row that got it)
_WHY_OPTION = {"session.disable_quant_qdq": "weight-only int8 Conv weights, so onnxruntime constant-folds their "
                                            "DequantizeLinear at load: float kernels, the file stays int8"}


def _add_note(v: Variant, text: str) -> None:
    v.note = "; ".join(t for t in (v.note, text) if t)


def as_deployed(v: Variant) -> Variant:
    """Give the variant the session entries `vcon-fx bench` would open its file with, and say which."""
    from vcon_fx.bench.worker import session_config

    v.options = session_config(v.path)
    for key, value in v.options.items():
        _add_note(v, f"session option {key}={value} (vcon_fx.bench.worker.session_config: {_WHY_OPTION.get(key, 'library')})")
    return v


def build_vcon(gm, loaded: Loaded, config, path: Path, *, kernels: tuple[str, ...] = (),
               options: dict | None = None) -> dict:
    """transform → β = 0 → vanish → export_onnx (→ compress_onnx_weights once per kernel).

    Returns the plans, timings and files: {None: (path, None)} for a float export, else
    {kernel: (file, CompressReport)}, every kernel compressed from the same export (the same
    integers; only the kernels that run them differ).
    """
    import vcon_fx
    from vcon_fx.export.quantize import compress_onnx_weights

    t0 = time.perf_counter()
    vm = vcon_fx.transform(gm, config, example_inputs=loaded.args, example_kwargs=loaded.kwargs,
                           seq_inputs=loaded.seq_inputs, **(options or {}))
    plans = dict(vm.meta["vcon"].plans)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    del vm
    t1 = time.perf_counter()
    raw = path.with_suffix(".raw.onnx") if kernels else path
    vcon_fx.export_onnx(small, raw, loaded.args, example_kwargs=loaded.kwargs, seq_inputs=loaded.seq_inputs,
                        force=True)
    files: dict = {None: (path, None)}
    if kernels:
        files = {}
        for kernel in kernels:
            dst = path.with_name(path.stem + KERNELS[kernel][1] + ".onnx")
            files[kernel] = (dst, compress_onnx_weights(raw, dst, bits=8, kernel=kernel, force=True))
        raw.unlink()
    del small
    gc.collect()
    return {"plans": plans, "files": files, "transform_s": t1 - t0, "export_s": time.perf_counter() - t1}


def kernel_variants(base: Variant, files: dict) -> list[Variant]:
    """One row per built file; a dynamic kernel that found no matmul is dropped (same file as weight-only)."""
    rows: list[Variant] = []
    for kernel, (path, report) in files.items():
        if kernel == "dynamic" and report.dynamic_matmuls == 0:  # a CNN: every int8 weight feeds a Conv
            path.unlink()
            _add_note(rows[0], "no int8 MatMul/Gemm, so the dynamic kernel (--dynamic-int8) does not apply and "
                               "has no row: it rewrites only DequantizeLinear→MatMul/Gemm, convolutions stay "
                               "weight-only (onnxruntime has no fused DequantizeLinear→Conv)")
            continue
        v = replace(base, label=base.label + (KERNELS[kernel][0] if kernel else ""), path=path)
        if kernel == "dynamic":
            v.note = (f"{report.dynamic_matmuls} int8 matmul(s) run as com.microsoft DynamicQuantizeMatMul / "
                      "MatMulIntegerToFloat (activations quantized at run time)")
        rows.append(as_deployed(v))
    return rows


def ranks_summary(plans: dict) -> str:
    ranks = sorted({p.detail.get("rank") for p in plans.values() if not p.skipped and p.detail.get("rank")})
    skipped = sum(p.skipped for p in plans.values())
    text = (f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}…{ranks[-1]}") if ranks else ""
    return text + (f", {skipped} layer(s) kept dense" if skipped else "")


def vcon_jobs(spec: Spec) -> tuple[list, list[Variant]]:
    """(label, kind, config, int8, transform options) per vcon variant; rows for methods not on offer."""
    from vcon_fx.methods import ComposeConfig, PruneConfig, QuantConfig

    jobs = [(f"low-rank {label}", "lowrank", cfg, False, None) for label, cfg in spec.lowrank]
    jobs.append(("int8 (quant bits=8)", "int8", QuantConfig(bits=8), True, None))
    if spec.compose:
        rank_label = next(lbl for lbl, c in spec.lowrank if c == spec.compose_rank)
        jobs.append((f"low-rank {rank_label} + int8 (compose)", "lowrank+int8",
                     ComposeConfig((spec.compose_rank, QuantConfig(bits=8))), True, None))
    missing: list[Variant] = []
    if spec.prune_blocks:
        try:
            prune = PruneConfig(sparsity=0.5, structured=True)
            jobs.append((f"structured pruning 50% of channels, blocks {' '.join(spec.prune_blocks)}", "prune", prune,
                         False, {"granularity": "block", "blocks": spec.prune_blocks}))
        except Exception as exc:  # the method may not offer it (yet)
            missing.append(Variant("structured pruning", "prune", None, error=f"not available: {_one_line(exc)}"))
    return jobs, missing


def build_all(spec: Spec, loaded: Loaded, work: Path) -> tuple[list[Variant], str]:
    """Every variant's ONNX file, and a line saying how the vcon variants were captured."""
    import vcon_fx
    from vcon_fx.graph.capture import capture

    from onnxruntime.quantization import quantize_dynamic

    variants: list[Variant] = []
    t = time.perf_counter()
    dense_path = work / f"{spec.name}_dense.onnx"
    vcon_fx.export_onnx(loaded.module, dense_path, loaded.args, example_kwargs=loaded.kwargs,
                        seq_inputs=loaded.seq_inputs, force=True)
    variants.append(as_deployed(Variant("dense", "dense", dense_path, (1.0, 1.0), export_s=time.perf_counter() - t)))
    log.info("%s: dense exported in %.0f s", spec.name, time.perf_counter() - t)
    layers, attention = dense_flops(loaded)

    # Capture once (the library's default, "auto") and hand the GraphModule to every transform:
    # capture is transform's first step and the same for every config, so this only saves time.
    captured = capture(loaded.module, loaded.args, loaded.kwargs, seq_inputs=loaded.seq_inputs)
    gm = captured.gm
    capture_line = f"Captured with {captured.path} (capture \"auto\")" + \
        "".join(f"; {n}" for n in captured.notes) + "."
    log.info("%s: captured with %s", spec.name, captured.path)

    jobs, missing = vcon_jobs(spec)
    variants += missing
    for label, kind, cfg, int8, options in jobs:
        slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")[:60]
        path = work / f"{spec.name}_{slug}.onnx"
        try:
            made = build_vcon(gm, loaded, cfg, path, kernels=tuple(KERNELS) if int8 else (), options=options)
        except Exception as exc:  # one variant failing must not lose the others' numbers
            log.warning("%s %s failed: %s", spec.name, label, exc)
            variants.append(Variant(label, kind, None, error=_one_line(exc)))
            continue
        base = Variant(label, kind, None, flop_ratios(made["plans"], layers, attention), export_s=made["export_s"],
                       ranks=ranks_summary(made["plans"]) if "low-rank" in label else "")
        if kind == "prune":
            kept = [p for p in made["plans"].values() if not p.skipped]
            base.note = (f"{len(kept)} of {len(made['plans'])} layers pruned; the rest keep their channels "
                         "(see the plan)")
        variants += kernel_variants(base, made["files"])
        log.info("%s %s: transform %.0f s, export %.0f s", spec.name, label, made["transform_s"], made["export_s"])

    ort_path = work / f"{spec.name}_ort_dynamic.onnx"
    t = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quantize_dynamic(str(dense_path), str(ort_path))
        variants.append(as_deployed(Variant("onnxruntime quantize_dynamic (dense ONNX, defaults)", "ort", ort_path,
                                            (1.0, 1.0), export_s=time.perf_counter() - t)))
    except Exception as exc:
        variants.append(Variant("onnxruntime quantize_dynamic (dense ONNX, defaults)", "ort", None,
                                error=_one_line(exc)))
    del gm, captured
    gc.collect()
    return variants, capture_line


# ── measuring ───────────────────────────────────────────────────────────────────────────────


def measure(spec: Spec, loaded: Loaded, variants: list[Variant], args, work: Path) -> dict:
    """Sessions for every built variant; fidelity, interleaved latency and an op profile per batch."""
    live = [v for v in variants if v.path is not None]
    sessions = {v.label: ort_session(v.path, args.threads, options=v.options) for v in live}
    out = {"batches": {}, "profile": {}, "profile_runs": args.profile_runs}
    for bi, batch in enumerate(spec.batches):
        feeds = loaded.feeds(batch)
        names = {i.name for i in sessions["dense"].get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        ref = sessions["dense"].run(None, feeds)[0]
        cos = {label: cosine(ref, s.run(None, feeds)[0]) for label, s in sessions.items()}
        fns = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
        t = time.perf_counter()
        times = interleave(fns, rounds=args.rounds, iters=args.iters, warmup=1, budget_s=args.bench_budget)
        ratios = {label: ratio_of(times, label, "dense") for label in sessions}
        log.info("%s batch %d: %d rounds in %.0f s", spec.name, batch, len(times["dense"]), time.perf_counter() - t)
        out["batches"][batch] = {"cos": cos, "ratios": ratios, "shape": {k: list(v.shape) for k, v in feeds.items()}}
        if bi == 0 and args.profile_runs:
            try:
                out["profile"] = ort_op_profiles({v.label: (v.path, v.options) for v in live}, feeds,
                                                 threads=args.threads, runs=args.profile_runs, workdir=str(work))
            except Exception as exc:  # profiling is an explanation, not a result
                log.warning("profiling %s failed: %s", spec.name, exc)
    del sessions
    gc.collect()
    return out


# ── report ──────────────────────────────────────────────────────────────────────────────────


def verdicts(spec: Spec, variants: list[Variant], res: dict) -> list[str]:
    """Target checks: low-rank latency ≤ 1.25 × FLOP ratio; int8 ≤ quantize_dynamic; nothing slower than dense."""
    lines = []
    ort_label = next((v.label for v in variants if v.kind == "ort" and v.path), None)
    for batch, b in res["batches"].items():
        r = b["ratios"]
        for v in variants:
            if v.path is None or v.kind == "dense":
                continue
            lat = r[v.label]["ratio"]
            if v.kind == "lowrank" and v.flops:
                limit = 1.25 * v.flops[0]
                ok = lat <= limit
                lines.append(f"- batch {batch}, {v.label}: latency {lat:.2f} vs FLOP ratio {v.flops[0]:.2f} "
                             f"→ {lat / v.flops[0]:.2f}× the FLOP ratio: {'MET' if ok else 'MISSED'} (≤ 1.25×)")
            if v.kind == "int8" and ort_label:
                ort = r[ort_label]["ratio"]
                # Two runs of the same kernels differ by the round-to-round spread: when the
                # ranges overlap, the honest verdict is parity, neither met nor missed.
                overlap = r[v.label]["lo"] <= r[ort_label]["hi"]
                verdict = "MET" if lat <= ort else ("PARITY (the round-to-round ranges overlap)" if overlap else "MISSED")
                lines.append(f"- batch {batch}, {v.label}: {lat:.2f} ({r[v.label]['lo']:.2f}–{r[v.label]['hi']:.2f}) "
                             f"vs quantize_dynamic {ort:.2f} ({r[ort_label]['lo']:.2f}–{r[ort_label]['hi']:.2f}), "
                             f"{lat / ort:.2f}×: {verdict} (≤ 1.0× quantize_dynamic)")
            if r[v.label]["lo"] > 1.0:  # slower in every round, not by a rounding of the median
                lines.append(f"- batch {batch}, {v.label}: SLOWER than dense ({lat:.3f}×, every round)")
    return lines


def profile_table(variants: list[Variant], prof: dict) -> str:
    rows = []
    dense = prof.get("dense")
    for v in variants:
        p = prof.get(v.label)
        if not p:
            continue
        top = ", ".join(f"{k} {ms:.1f}" for k, ms in list(p["by_op"].items())[:4])
        gemm_ratio = f"{p['gemm_ms'] / dense['gemm_ms']:.2f}" if dense and dense["gemm_ms"] else "—"
        amdahl = ""
        if dense and v.flops and dense["total_ms"]:
            share = dense["gemm_ms"] / dense["total_ms"]
            amdahl = f"{share * v.flops[0] + (1 - share):.2f}"
        rows.append([v.label, f"{p['total_ms']:.1f}", f"{p['gemm_ms']:.1f}",
                     f"{100 * (1 - p['gemm_ms'] / max(p['total_ms'], 1e-9)):.0f}%", gemm_ratio, amdahl, top])
    return markdown_table(["variant", "op time ms", "GEMM ms", "non-GEMM share", "GEMM time / dense GEMM",
                           "Amdahl bound (dense non-GEMM fixed, GEMM × FLOP ratio)", "top ops (ms)"], rows)


def model_section(spec: Spec, loaded: Loaded, variants: list[Variant], res: dict, threads: int,
                  capture_line: str) -> str:
    size_dense = variants[0].path.stat().st_size
    parts = [f"### {spec.name}: {loaded.what}\n"]
    batches = list(res["batches"])
    headers = ["variant", "ranks", "size MB", "size ratio", "FLOP ratio (Linear/Conv)", "FLOP ratio (+attention)"]
    for b in batches:
        headers += [f"latency ratio b{b} (spread)", f"cosine b{b}"]
    rows = []
    for v in variants:
        if v.path is None:
            rows.append([v.label, "", "", "", "", ""] + ["—", v.error or ""] * len(batches))
            continue
        size = v.path.stat().st_size
        row = [v.label, v.ranks, f"{size / 1e6:.1f}", f"{size / size_dense:.2f}",
               f"{v.flops[0]:.2f}" if v.flops else "", f"{v.flops[1]:.2f}" if v.flops else ""]
        for b in batches:
            row += [fmt_ratio(res["batches"][b]["ratios"][v.label]), f"{res['batches'][b]['cos'][v.label]:.4f}"]
        rows.append(row)
    parts.append(markdown_table(headers, rows))
    dense_ms = ", ".join(f"batch {b}: {res['batches'][b]['ratios']['dense']['base_ms']:.1f} ms" for b in batches)
    shapes = "; ".join(f"batch {b}: {res['batches'][b]['shape']}" for b in batches)
    parts.append(f"\nDense median latency ({threads} thread(s)): {dense_ms}. Inputs: {shapes}. {capture_line}\n")
    notes = [f"- {v.label}: {v.note}" for v in variants if v.note]
    if notes:
        parts.append("\n".join(notes) + "\n")
    if res.get("profile"):
        parts.append(f"onnxruntime profile (batch {batches[0]}, kernel time by op type, ms per run; each node's "
                     f"median over {res.get('profile_runs', 0)} profiled runs, interleaved; GEMM = "
                     f"{', '.join(sorted(o for o in GEMM_OPS if any(o in p['by_op'] for p in res['profile'].values())))}):\n")
        parts.append(profile_table(variants, res["profile"]))
        ops = {v.label: res["profile"][v.label]["ops"] for v in variants if v.label in res["profile"]}
        fused = {label: {k: n for k, n in o.items() if k in GEMM_OPS} for label, o in ops.items()}
        parts.append("\nMatmul/conv kernels after onnxruntime's graph optimizations:\n")
        parts.append("\n".join(f"- {label}: {json.dumps(f)}" for label, f in fused.items()) + "\n")
    parts.append("Targets:\n")
    parts.append("\n".join(verdicts(spec, variants, res)) + "\n")
    return "\n".join(parts)


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__).replace("|", "/")


# ── main ────────────────────────────────────────────────────────────────────────────────────


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated: minilm,resnet50,vit_b_16 (default: all)")
    parser.add_argument("--out", default=str(HERE / "DEPLOY.md"), help="the Markdown file to write")
    parser.add_argument("--workdir", default=None, help="where ONNX files go (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--iters", type=int, default=3, help="runs per variant per round")
    parser.add_argument("--bench-budget", type=float, default=60.0, help="seconds of timing per model and batch")
    parser.add_argument("--profile-runs", type=int, default=5,
                        help="runs under onnxruntime's profiler, median per op (0: none)")
    parser.add_argument("--tiny", action="store_true", help="tiny MLP and CNN, 2 rounds: a smoke test")
    parser.add_argument("--json", default=None, help="also save the rendered sections here (for --render-from)")
    parser.add_argument("--render-from", default=None,
                        help="rewrite --out from a --json file (the measured tables as they were, the current notes)")
    args = parser.parse_args(argv)
    if args.render_from:
        saved = json.loads(Path(args.render_from).read_text())
        text = render(saved["sections"], saved["info"], argparse.Namespace(**saved["args"]), saved["total"],
                      saved["command"])
        note = f"Tables as measured by that run; this file written from its saved sections by `{command_line()}`.\n"
        head, _, rest = text.partition("Machine: ")
        write_text_atomic(args.out, head + note + "Machine: " + rest)
        return 0
    if args.tiny:
        args.rounds, args.iters, args.profile_runs, args.bench_budget = 2, 1, 1, 5.0
    # WARNING for everything else: onnxruntime's quantizer logs every tensor at INFO on the root logger
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    import torch

    # Set-up (SVD, export) runs on one torch thread: on this shared 2-core machine MKL's
    # threaded LAPACK is several times slower than one thread (see TOOLSPEED.md).
    torch.set_num_threads(1)
    info = machine()
    all_specs = specs(args.tiny)
    names = args.models.split(",") if args.models else list(all_specs)
    unknown = [n for n in names if n not in all_specs]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(all_specs)}")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="vcon_deploy_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sections = []
    try:
        for name in names:
            spec = all_specs[name]
            t = time.perf_counter()
            try:
                loaded = spec.load()
                variants, capture_line = build_all(spec, loaded, work)
                res = measure(spec, loaded, variants, args, work)
                sections.append(model_section(spec, loaded, variants, res, args.threads, capture_line))
            except Exception as exc:  # report the failure in the table, keep the other models
                log.error("%s failed:\n%s", name, traceback.format_exc())
                sections.append(f"### {name}\n\nFAILED: {_one_line(exc)}\n")
            log.info("%s done in %.0f s", name, time.perf_counter() - t)
            for p in work.glob(f"{name}_*.onnx*"):
                p.unlink()
            gc.collect()
            if name != names[-1]:  # a run cut short keeps the models it measured
                write_text_atomic(args.out, render(sections, info | {"cpu_s": _cpu_s()}, args,
                                                   time.perf_counter() - started, command_line()))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    info["cpu_s"] = _cpu_s()
    text = render(sections, info, args, total, command_line())
    if args.json:
        write_text_atomic(args.json, json.dumps({"sections": sections, "info": info, "args": vars(args),
                                                 "total": total, "command": command_line()}))
    write_text_atomic(args.out, text)
    log.info("wrote %s (%.0f s)", args.out, total)
    return 0


def _cpu_s() -> float:
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def render(sections: list[str], info: dict, args, total: float, command: str) -> str:
    head = f"""# Deployment benchmark: compressed models in onnxruntime (CPU)

Made by `{command}` in {total / 60:.1f} min wall, {info['cpu_s'] / 60:.1f} min of CPU time
(the script runs on one core at a time: on an idle machine the wall time is about the CPU time).
Machine: {machine_line(info)}.

How to read it:
- Every compressed model comes from the public pipeline at β = 0 **without fine-tuning**
  (transform → set_beta(0) → vanish → export_onnx [→ compress_onnx_weights]): cosine to
  dense says how much the compression changes the outputs before any training recovers it. With
  random weights (resnet50, vit_b_16) this is a property of the random matrices (flat spectra:
  low rank hurts more than on trained weights).
- Latency ratio = compressed / dense median latency, onnxruntime CPU, {args.threads} intra-op
  thread(s), the same inputs; all variants of a model share one process and are timed
  interleaved, round by round ({args.rounds} rounds max × {args.iters} runs); the ratio is the
  median over rounds, in brackets the min–max over rounds. < 1 is faster.
- FLOP ratio (Linear/Conv) = Σ FLOPs after / Σ FLOPs before over every Linear and Conv of the
  model: compressed layers from the vcon plan, all other layers counted dense (FlopCounterMode).
  Attention matmuls (QKᵀ, AV), softmax, norms, activations, embeddings are NOT counted; the
  column "+attention" adds the attention matmuls (dense in every variant).
- Low-rank target: latency ratio ≤ 1.25 × FLOP ratio. int8 target: vcon int8 at least as fast
  as onnxruntime's `quantize_dynamic` of the dense model.
- int8 rows come from one vanished export each: "int8 (quant bits=8)" is
  `compress_onnx_weights(kernel="weight-only")` (DequantizeLinear in front of float ops), rows
  ending ", --dynamic-int8" are `kernel="dynamic"` (integer GEMMs, activations quantized at run
  time). Every session, dense included, is opened with `vcon_fx.bench.worker.session_config(path)`, the
  entries `vcon-fx bench` uses for that file; a row's note names any entry it got.

"""
    return head + "\n".join(sections) + "\n" + FINDINGS


FINDINGS = """## Findings (why the targets are met or missed, and what the library does about it)

Every row measures the library as it is, through its public calls; the numbers are in the tables
and profiles above.

1. **int8 weight-only runs at about float speed; `--dynamic-int8` runs integer GEMMs.** The
   vanished quant model exports int8 initializers + DequantizeLinear. onnxruntime fuses
   DequantizeLinear→MatMul into an 8-bit `MatMulNBits`, which on this CPU computes at about
   float speed (compare its GEMM time with dense in the profile tables), while
   `quantize_dynamic` gets `DynamicQuantizeMatMul` / `MatMulIntegerToFloat` (VNNI int8 GEMMs).
   `compress_onnx_weights(..., kernel="dynamic")` (`vcon_fx/export/dynamic_int8.py`; CLI
   `vcon-fx export --dynamic-int8`) rewrites every DequantizeLinear(int8, per-output-channel,
   zero point 0) → MatMul / Gemm(transB) (→ Add bias) into `com.microsoft.DynamicQuantizeMatMul`,
   with one `DynamicQuantizeLinear` shared by `MatMulIntegerToFloat`s when one input feeds
   several (Q/K/V): the same integer weights, activations quantized at run time, the kernels
   quantize_dynamic uses (the kernel lists above show what onnxruntime runs). It keeps per-channel
   weight scales where quantize_dynamic defaults to per-tensor ones: the cosine columns compare
   the two. Weight-only stays the default and the most faithful (outputs as in PyTorch); the
   dynamic kernel is the opt-in fast choice.
2. **int8 convolutions have no fused kernel.** onnxruntime does not fuse DequantizeLinear→Conv
   (only full QDQ with quantized activations becomes QLinearConv): by default it dequantizes
   every weight on every run and cannot fold the following BatchNormalization into a
   non-constant weight; quantize_dynamic turns convolutions into ConvInteger (see its row and
   profile). `vcon_fx.bench.worker.session_config` now recognises weight-only int8 Conv weights and
   returns `session.disable_quant_qdq=1`, which `make_session` and `vcon-fx bench` apply:
   onnxruntime then constant-folds those DequantizeLinear at load, so the convolutions run float
   kernels (BatchNormalization folded) while the file stays int8-sized. The int8 CNN rows above
   are opened with it (their notes say so); deploy such a model with the same session entry. The
   dynamic kernel rewrites matmuls only, so a model whose int8 weights all feed convolutions has
   no ", --dynamic-int8" row (its note says so). True int8 conv speed needs static QDQ with
   calibrated output scales (QLinearConv): future work.
3. **Low-rank convolutions at arbitrary ranks miss the fast kernels.** `ratio`/`energy` give
   ranks like 25 or 28: the factor convolutions then fall out of onnxruntime's NCHWc blocked
   kernels (channel counts that are multiples of the 16-float AVX-512 block) into plain Conv
   with reorders. `LowRankConfig(rank_multiple=16)` (CLI `--rank-multiple 16`) rounds every
   planned rank up to a multiple of 16 in `choose_rank`; the skip rule still refuses a rounded
   rank that saves nothing. The "--rank-multiple 16" rows against the plain ratio rows show the
   trade: a larger FLOP ratio (the extra rank) and the extra rank's fidelity, against the
   latency the blocked kernels buy (Targets: latency against FLOP ratio).
4. **Transformers at low rank: the fixed cost does not shrink.** The matmul kernels scale with
   the FLOP ratio (profile: "GEMM time / dense GEMM" against the FLOP ratio, within the
   profile's noise), but two costs the FLOP ratio leaves out stay: the non-matmul kernels
   (LayerNorm, GELU, softmax, adds, reshapes, embeddings) and onnxruntime's time outside the
   kernels (session and per-node overhead: the median latency minus the summed kernel time,
   which the rank does not change). So the latency ratio lands near the Amdahl bound column, and
   that bound rises above 1.25 × FLOP ratio once the rank is small; the Targets lines say which
   ranks and batches stay within it. No export change moves that bound; the plan could report
   it (`inspect`: expected latency ratio ≈ fixed share + (1 − fixed share) × FLOP ratio) so a
   rank can be chosen for a latency target.
5. **ViT: capture decides coverage.** torch.fx keeps `nn.MultiheadAttention` whole (a torch.nn
   leaf), so an fx capture compresses only the MLP Linears and leaves the attention projections
   (a third of the Linear FLOPs) dense. Capture "auto" (`vcon_fx/capture.py`) now looks for
   such weight-holding torch.nn blocks (MultiheadAttention, Transformer*Layer) in the fx graph
   and takes torch.export when it succeeds, which lifts the in/out projections into Linears;
   `--capture fx` keeps them whole. This benchmark captures every model the default way; the
   line under each model's table says which path was taken and why.
6. **Structured pruning** (block granularity) removes whole channels, so the pruned layers run
   the same dense kernels at smaller sizes; how closely its latency follows its FLOP ratio is in
   the Targets lines and profiles. On MiniLM only the MLP blocks are pruned, so its FLOP savings
   are the MLPs' alone.
"""


if __name__ == "__main__":
    sys.exit(main())
