"""The embedded demo: the whole pipeline on real handwritten digits, abrupt compression against VCON.

    vcon-fx demo [--out demo_out] [--fast] [--methods lowrank,prune,...] [--seed 0]

A tiny vision transformer (`demo.model.TinyViT`) is trained on scikit-learn's digits. Then,
for every registered method that has a demo setting, two runs start from that same dense model
with the same fine-tuning budget (steps, learning rate, batch size, seed, data order):

    abrupt:  transform → fine-tune with Q = 0 (β = 0 from the first step)
    VCON:    transform → fine-tune with β falling linearly 1 → 0 over Q = 20% of the steps

Both start from the same twins, built the way benchmarks/QUALITY.md measured best: data-aware
from 128 training images, and with the budget allocated per layer where the setting allows it.

The VCON model is vanished, exported to ONNX (weights of ≤ 4-bit methods repacked as INT4),
and checked in onnxruntime against PyTorch. The result is one row per method, a JSON file, and
a plot of test accuracy over the fine-tuning steps with β on a second axis.

Seeds are not chosen: whichever run wins is what the table shows (see benchmarks/ACCURACY.md
for means over seeds). This module does not print; `vcon_fx/cli/demo.py` does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UsageError
from .history import accuracy_curve, beta_curve
from .output import check_out, machine_info
from .plot import plot_histories
from .results import DEMO_FORMAT, FAST, FULL, PLOT_NAME, RESULTS_NAME, DemoResult, DemoRow, DemoSettings

__all__ = [
    "DemoSettings",
    "DemoRow",
    "DemoResult",
    "FULL",
    "FAST",
    "FAST_METHODS",
    "DEMO_FORMAT",
    "demo_configs",
    "run_demo",
    "plot_histories",
]

log = logging.getLogger(__name__)

# --fast runs one method of each ONNX route (float factors, integer weights) unless --methods says otherwise:
# each export costs seconds, and the fast mode has to stay under half a minute
FAST_METHODS = ("lowrank", "quant")
CALIBRATION_SAMPLES = 128  # training images the twins start from (data-aware) and --allocate measures on


def demo_configs() -> dict[str, tuple[Any, str]]:
    """Method name → (config, readable setting) for every method the demo knows how to run.

    Each is a strong compression on this model (every Linear inside the transformer blocks):
    abrupt compression loses accuracy, which is where the paper says VCON can help. A method
    declares its setting next to itself (`MethodConfig.examples`); one without is not demoed.
    """
    from ..methods import registered_methods

    examples = {name: config_type.examples() for name, config_type in registered_methods().items()}
    return {name: (ex.demo, ex.demo_setting) for name, ex in examples.items() if ex is not None}


# ── the run ────────────────────────────────────────────────────────────────────────────────


def run_demo(
    out: str | os.PathLike = "demo_out",
    *,
    methods: list[str] | tuple[str, ...] | None = None,
    seed: int = 0,
    fast: bool = False,
    settings: DemoSettings | None = None,
    force: bool = False,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> DemoResult:
    """Train the digits model, compress it abruptly and with VCON per method, export and check (writes `out`).

    The output folder is written whole, atomically: the plot, `dense.onnx`, one `METHOD.onnx`
    per method and `results.json`. A folder left by an earlier demo is replaced; anything else
    only with `force`.

    Args:
        out: the output folder.
        methods: method names (default: every registered method with a demo setting; in fast mode
            only FAST_METHODS, one per ONNX route).
        seed: model initialization, data order and dropout of every run.
        fast: the reduced sizes of `FAST` (for tests), else `FULL`.
        settings: explicit sizes (overrides `fast`).
        force: replace an output folder that is not an earlier demo's.
        on_event: called with progress dicts (`stage`: pretrain | finetune | export | done, …).

    Returns:
        A DemoResult (also written to `out/results.json`).

    Raises:
        UsageError: an unknown method name, or one without a demo setting.
        OutputExistsError: `out` exists, is not an earlier demo's output, and `force` is false.
        ImportError: scikit-learn or matplotlib is missing (`pip install 'vcon-fx[demo]'`).

    Example:
        >>> result = run_demo("demo_out", fast=True, methods=["lowrank"])  # doctest: +SKIP
        >>> result.rows[0].acc_abrupt, result.rows[0].acc_vcon  # doctest: +SKIP
    """
    from ..io.atomic import atomic_dir

    settings = settings or (FAST if fast else FULL)
    chosen, skipped = _choose_methods(methods, fast=fast and settings is FAST)
    out = check_out(Path(out), force)
    emit = on_event or (lambda _event: None)
    started = time.monotonic()
    # fork_rng: the demo seeds torch's global generator, the caller's stays as it was
    with atomic_dir(out) as tmp, _torch_threads(settings.threads), torch.random.fork_rng():
        result = _run(tmp, out, chosen, skipped, seed, fast, settings, emit, started)
    emit({"stage": "done", "seconds": result.seconds})
    return result


def _run(tmp: Path, out: Path, chosen, skipped, seed, fast, settings: DemoSettings, emit, started) -> DemoResult:
    from ..export import check_onnx, export_onnx
    from .model import TinyViT, accuracy, example_inputs, load_digits_data, pretrain

    data = load_digits_data()
    configs = demo_configs()
    torch.manual_seed(seed)
    dense = TinyViT(dim=settings.dim, depth=settings.depth, hidden=settings.hidden)
    emit({"stage": "pretrain", "steps": settings.pretrain_steps})
    pretrain(dense, data.train, steps=settings.pretrain_steps, lr=settings.pretrain_lr,
             batch_size=settings.batch_size, seed=seed)
    dense_acc = accuracy(dense, data.test)
    log.info("dense model: test accuracy %.4f", dense_acc)
    examples = example_inputs()
    check_inputs = (data.test.tensors[0][:settings.latency_batch],)

    emit({"stage": "export", "method": "dense"})
    dense_path = export_onnx(dense, tmp / "dense.onnx", examples)
    dense_report = check_onnx(dense, dense_path, check_inputs, runs=settings.latency_runs,
                              threads=settings.latency_threads)
    dense_params = sum(p.numel() for p in dense.parameters())

    rows = []
    for name in chosen:
        config, setting = configs[name]
        rows.append(_run_method(name, config, setting, dense, data, examples, check_inputs, tmp, dense_path,
                                settings, seed, emit))

    plot_path = tmp / PLOT_NAME
    plot_histories(rows, plot_path, dense_accuracy=dense_acc, title=f"digits, tiny ViT, seed {seed}")
    result = DemoResult(
        out=str(out), seed=seed, fast=fast, settings=dataclasses.asdict(settings),
        train_size=len(data.train), test_size=len(data.test), dense_params=dense_params,
        dense_accuracy=dense_acc, dense_onnx=dense_path.name, dense_onnx_bytes=dense_report.size_bytes,
        dense_latency_ms=dense_report.latency_ms, rows=rows, skipped=skipped, plot=PLOT_NAME, results=RESULTS_NAME,
        seconds=round(time.monotonic() - started, 1), machine=machine_info(),
    )
    (tmp / RESULTS_NAME).write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def _run_method(name, config, setting, dense, data, examples, check_inputs, tmp, dense_path, settings, seed,
                emit) -> DemoRow:
    """Abrupt and VCON fine-tuning of one method from the same dense model; vanish, export, check the VCON one."""
    from ..graph import pipeline as api
    from .model import accuracy
    from ..export import check_onnx, export_onnx
    from ..training.finetune import finetune

    started = time.monotonic()
    start, how = _best_start(api, dense, config, data, examples)
    runs = {}
    for run, q in (("abrupt", 0), ("vcon", settings.q)):
        vm = copy.deepcopy(start)  # both runs start from the same twins: only the schedule differs

        def on_step(info, run=run):
            emit({"stage": "finetune", "method": name, "run": run, "step": info["step"], "steps": settings.steps,
                  "beta": info["beta"], "accuracy": (info.get("eval") or {}).get("accuracy")})

        result = finetune(vm, data.train, steps=settings.steps, transition=q, lr=settings.lr,
                          batch_size=settings.batch_size, eval_data=data.test, eval_every=settings.eval_every,
                          seed=seed, on_step=on_step)
        runs[run] = (vm, result)
        log.info("%s %s: test accuracy %.4f", name, run, result.metrics["after"])

    vm, result = runs["vcon"]
    emit({"stage": "export", "method": name})
    small = api.vanish(vm)
    acc_vcon = accuracy(small, data.test)
    path = export_onnx(small, tmp / f"{name}.onnx", examples)
    bits = _weight_bits(config)
    if bits is not None and bits <= 4:
        # the exporter stores quantized weights as INT8; ≤ 4-bit grids fit in INT4 (half the bytes)
        from ..export.quantize import compress_onnx_weights

        # fold_transposes=False: with it onnxruntime fuses MatMulNBits, which quantizes the
        # activations to int8 at its default accuracy level (logits then differ by ~1e-2)
        packed = compress_onnx_weights(path, tmp / f"{name}.int4.onnx", bits=4, fold_transposes=False)
        os.replace(packed.path, path)
    report = check_onnx(small, path, check_inputs, atol=1e-4, runs=settings.latency_runs,
                        threads=settings.latency_threads, reference_onnx=dense_path)
    plan = api.plan(dense, config, example_inputs=examples)
    return DemoRow(
        method=name, setting=f"{setting}, {how}", config=config.to_dict(), params=plan.params_after, onnx=path.name,
        onnx_bytes=report.size_bytes, latency_ms=report.latency_ms, onnx_ok=report.ok,
        onnx_max_abs_diff=max((o.max_abs_diff for o in report.outputs), default=float("nan")),
        transition=settings.q,
        acc_compressed=runs["abrupt"][1].metrics["before_compressed"],
        acc_abrupt=runs["abrupt"][1].metrics["after"], acc_vcon=acc_vcon,
        acc_vcon_onnx=onnx_accuracy(path, data.test),
        seconds=round(time.monotonic() - started, 1),
        history_abrupt=accuracy_curve(runs["abrupt"][1]), history_vcon=accuracy_curve(runs["vcon"][1]),
        beta_vcon=beta_curve(runs["vcon"][1]),
    )


def _best_start(api, dense, config, data, examples):
    """(the blended model both runs start from, how it started): the best start benchmarks/QUALITY.md measured.

    Data-aware twins from 128 training images (whitened SVD, Wanda, GPTQ), and the budget spread over
    the layers by measured sensitivity where the method's setting is a ratio, sparsity or width.
    """
    from ..errors import ConfigError
    from ..methods.allocation import space_for

    try:
        space_for(config, "params")
        allocate = "params"
    except ConfigError:  # e.g. a fixed rank or a composition: nothing to spread
        allocate = None
    calibration = data.train.tensors[0][:CALIBRATION_SAMPLES]
    vm = api.transform(dense, config, example_inputs=examples, calibration=calibration, allocate=allocate)
    return vm, "data-aware start" + (", allocated" if allocate else "")


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _weight_bits(config) -> int | None:
    """The weight bits of a quantizing config (also inside a composition), else None."""
    found = getattr(config, "bits", None)
    if isinstance(found, int):
        return found
    for inner in getattr(config, "configs", ()) or ():
        bits = _weight_bits(inner)
        if bits is not None:
            return bits
    return None


def onnx_accuracy(path: str | os.PathLike, data) -> float:
    """Top-1 accuracy of an ONNX classifier on a TensorDataset, run by onnxruntime (pure)."""
    from ..bench.worker import make_session

    session = make_session(path, threads=1)
    images, labels = data.tensors
    logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    return float((logits.argmax(-1) == labels.numpy()).mean())


def _choose_methods(methods, fast: bool = False) -> tuple[list[str], dict[str, str]]:
    from ..methods import registered_methods

    registered = list(registered_methods())
    configs = demo_configs()
    skipped = {m: "no demo setting for this method yet" for m in registered if m not in configs}
    if methods is None:
        chosen = [m for m in registered if m in configs and (not fast or m in FAST_METHODS)]
        skipped.update({m: "not run in --fast mode (give --methods to add it)" for m in registered
                        if m in configs and m not in chosen})
        return chosen, skipped
    chosen = []
    for m in methods:
        if m not in registered:
            raise UsageError(f"unknown method {m!r}; the demo runs: {', '.join(x for x in registered if x in configs)}")
        if m not in configs:
            raise UsageError(f"method {m!r} has no demo setting; the demo runs: {', '.join(configs)}")
        if m not in chosen:
            chosen.append(m)
    if not chosen:
        raise UsageError("no method chosen: give at least one, e.g. --methods lowrank")
    skipped.update({m: "not chosen (--methods)" for m in registered if m in configs and m not in chosen})
    return chosen, skipped
