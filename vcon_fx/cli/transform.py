"""`vcon-fx transform`: add compressed twins and blends (β = 1) and save the artifact."""

from __future__ import annotations

from rich.markup import escape

from .options import (add_calibration, add_dtype, add_method, add_source, calibration_samples, default_output,
                      load_calibration, load_source, method_config, selection_kwargs)
from .render import console, describe, fmt_count

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add the `transform` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("transform", help="add compressed twins and blends (β = 1)")
    p.add_argument("model")
    add_source(p)
    add_dtype(p)
    add_method(p, required=True)
    add_calibration(p)
    p.add_argument("--freeze-dense", action="store_true", help="do not train the dense branch")
    p.add_argument("-o", "--output", help="artifact folder (default: NAME.vcon)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    from ..graph.pipeline import transform, uses_input_statistics
    from ..io.artifact import save
    from ..io.atomic import check_output

    config = method_config(args)
    inputs = (args.model, *([args.calibration_data] if args.calibration_data else []))
    out = check_output(args.output or default_output(args.model, ".vcon"), force=args.force, inputs=inputs)
    loaded = load_source(args, args.model)
    for note in loaded.notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    calibration = load_calibration(args, loaded)
    with console.status("capturing and transforming…"):
        vm = transform(loaded.module, config, example_inputs=loaded.example_args, example_kwargs=loaded.example_kwargs,
                       seq_inputs=loaded.seq_inputs, freeze_dense=args.freeze_dense, source=loaded.source,
                       calibration=calibration, calibration_samples=calibration_samples(args), copy_model=False,
                       **selection_kwargs(args))
    recipe = vm.meta["vcon"]
    console.print(f"capture path: [bold]{recipe.capture}[/]" + "".join(f"\n  [dim]{n}[/]" for n in recipe.notes))
    if uses_input_statistics(config) and calibration is None:
        console.print("[yellow]note:[/] --activation-aware measured the input statistics on the synthetic example "
                      "inputs the CLI builds; give --calibration-data FILE for statistics of real data")
    done = [p for p in recipe.plans.values() if not p.skipped]
    before = sum(p.params_before for p in done)
    after = sum(p.params_after for p in done)
    console.print(f"{len(recipe.groups)} group(s) blended at β = 1 with {describe(recipe.config)}; compressed layers hold "
                  f"{fmt_count(before)} → {fmt_count(after)} parameters; {len(recipe.excluded)} layer(s) left dense")
    save(vm, out, force=args.force)
    console.print(f"[green]wrote[/] {out}")
    return 0
