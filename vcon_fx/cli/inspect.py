"""`vcon-fx inspect`: what transform would do (the plan), or what an artifact holds."""

from __future__ import annotations

import json
from dataclasses import asdict

from rich.table import Table

from ..errors import CaptureError
from .options import (add_calibration, add_dtype, add_method, add_source, calibration_samples, load_calibration,
                      load_source, method_config, selection_kwargs)
from .render import console, describe, fmt_bytes, fmt_count, plan_table

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add the `inspect` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("inspect", help="matched layers, parameters, FLOPs and the plan")
    p.add_argument("model", help="model source: .pt2, torchvision:NAME, HF folder, .pt, or a vcon artifact")
    add_source(p)
    add_dtype(p)
    add_method(p, required=False)
    add_calibration(p)
    p.add_argument("--graph", action="store_true", help="print the captured graph")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args) -> int:
    from ..graph.memory import memory_estimate
    from ..graph.pipeline import plan
    from ..io.artifact import is_artifact, read_recipe

    if is_artifact(args.model):
        recipe = read_recipe(args.model)
        console.print(f"[bold]{args.model}[/]: vcon artifact, stage [bold]{recipe.stage}[/], method {describe(recipe.config)}")
        console.print(f"capture path: {recipe.capture}; {len(recipe.groups)} group(s)")
        plan_table(recipe.plans, recipe.excluded)
        return 0
    loaded = load_source(args, args.model)
    from ..methods.lowrank import LowRankConfig

    config = method_config(args) if args.method else LowRankConfig(ratio=0.25)
    calibration = load_calibration(args, loaded)
    try:
        compression_plan = plan(loaded.module, config, example_inputs=loaded.example_args,
                                example_kwargs=loaded.example_kwargs, seq_inputs=loaded.seq_inputs,
                                calibration=calibration, calibration_samples=calibration_samples(args),
                                copy_model=False, **selection_kwargs(args))
    except CaptureError:
        _uncaptured_layers(args, loaded.module)  # what the module tree alone tells, then the error
        raise
    config = compression_plan.config
    memory = _statistics_memory(args, compression_plan, calibration)
    peaks = memory_estimate(compression_plan)
    if args.json:
        console.print_json(json.dumps({**_plan_json(compression_plan, config), "calibration": memory,
                                       "memory": {**asdict(peaks), "transform_peak": peaks.transform,
                                                  "step_peak": peaks.step}}))
        return 0
    console.print(f"[bold]{args.model}[/] ({type(loaded.module).__name__}): captured with "
                  f"[bold]{compression_plan.capture}[/]")
    for note in compression_plan.notes:
        console.print(f"  [dim]{note}[/]")
    if args.graph:
        console.print(str(compression_plan.extra["gm"].graph))
    plan_table(compression_plan.plans, compression_plan.selection.excluded, title=f"plan: {describe(config)}")
    before, after = compression_plan.total_params, compression_plan.params_after
    console.print(f"{len(compression_plan.groups)} group(s) ({compression_plan.selection.granularity}); parameters "
                  f"{fmt_count(before)} → {fmt_count(after)} ({after / max(before, 1):.1%})")
    _memory_lines(peaks)
    if memory:
        console.print(f"calibration: {memory['samples']} sample(s) of {memory['data']}; the input statistics of "
                      f"{memory['layers']} layer(s) take {fmt_bytes(memory['bytes'])}"
                      + (" (XᵀX: input columns² × 8 bytes per layer)" if memory["gram"] else " (per-feature moments)"))
    return 0


def _memory_lines(peaks) -> None:
    """The two peaks of graph/memory.py's estimate, after the plan."""
    console.print(f"peak memory (estimate, activations excluded): transform {fmt_bytes(peaks.transform)} (model "
                  f"{fmt_bytes(peaks.dense)} + twins {fmt_bytes(peaks.twins)} + work space {fmt_bytes(peaks.workspace)})")
    console.print(f"  one training step {fmt_bytes(peaks.step)} (model and twins + gradients {fmt_bytes(peaks.gradients)} "
                  f"+ Adam {fmt_bytes(peaks.adam)})")


def _statistics_memory(args, compression_plan, calibration) -> dict | None:
    """What the calibration pass would read and hold (None without --calibration-data)."""
    from ..graph.statistics import statistics_bytes

    if calibration is None:
        return None
    sites, config = compression_plan.extra["sites"], compression_plan.config
    layers = [sites[p].module for g in compression_plan.groups for p in g.layers if not compression_plan.plans[p].skipped]
    gram = config.needs_gram or bool(getattr(args, "allocate", None))  # --allocate reads every layer's XᵀX
    return {"data": args.calibration_data, "samples": min(len(calibration), calibration_samples(args)),
            "layers": len(layers), "gram": gram, "bytes": statistics_bytes(layers, gram=gram)}


def _plan_json(compression_plan, config) -> dict:
    """`inspect --json`: the plan as plain data."""
    return {
        "capture": compression_plan.capture, "notes": compression_plan.notes, "method": config.to_dict(),
        "groups": [g.to_dict() for g in compression_plan.groups],
        "layers": {p: pl.to_dict() for p, pl in compression_plan.plans.items()},
        "excluded": compression_plan.selection.excluded,
        "params_before": compression_plan.total_params, "params_after": compression_plan.params_after,
    }


def _weight(layer):
    """The layer's weight (a recurrent layer's first gate matrix)."""
    return next(p for p in layer.parameters(recurse=False) if p.dim() >= 2)


def _uncaptured_layers(args, model) -> None:
    """The compressible layers a walk of the module tree finds, for a model no tracer captured."""
    from ..methods.base import COMPRESSIBLE

    layers = {name: m for name, m in model.named_modules() if isinstance(m, COMPRESSIBLE)}
    if args.json:
        console.print_json(json.dumps({"capture": None, "layers_found": {
            n: {"type": type(m).__name__, "shape": list(_weight(m).shape), "params": _weight(m).numel()}
            for n, m in layers.items()}}))
        return
    table = Table(title=f"{type(model).__name__}: not captured; its module tree holds {len(layers)} compressible layer(s)")
    for col in ("layer", "type", "weight shape", "params"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for name, m in layers.items():
        table.add_row(name, type(m).__name__, "×".join(map(str, _weight(m).shape)), fmt_count(_weight(m).numel()))
    console.print(table)
    console.print("[yellow]no plan:[/] the graph could not be captured (reason below); layers inside a "
                  "submodule that does trace can be reached by keeping the failing part whole (--ignore it)")
