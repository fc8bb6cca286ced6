"""`vcon-fx export`: ONNX, optionally with integer kernels, checked in onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.markup import escape

from ..export.kernels import KERNELS
from .options import add_source, load_source
from .render import check_table, console, fmt_bytes

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Add the `export` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("export", help="export to ONNX, optionally checked in onnxruntime")
    p.add_argument("model", help="a vanished vcon artifact, or any model source (exported dense)")
    add_source(p)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch, and with the dense model")
    p.add_argument("--static-shapes", action="store_true", help="export fixed shapes (no dynamic batch/sequence axes)")
    for kernel in KERNELS.values():
        p.add_argument(kernel.flag, action="store_true", help=kernel.flag_help)
    p.add_argument("--block-size", type=int, default=None,
                   help="--matmul-nbits: weights per block, a power of 2 ≥ 16 (default 32)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="a decoder language model without its KV cache: the whole sequence every call")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    from ..export import check_tolerance, integer_export, kernel_for_flags
    from ..export.check import check_onnx
    from ..export.onnx import export_onnx
    from ..io.artifact import is_artifact, read_recipe
    from ..io.atomic import check_output

    kernel = kernel_for_flags(vars(args))
    kernel_options = _kernel_options(args, kernel)
    kv_cache = False if args.no_kv_cache else None
    out = check_output(args.onnx, force=args.force, inputs=(args.model,))
    if kernel is not None and is_artifact(args.model):
        _refuse_unquantized(args.model, read_recipe(args.model).config, kernel.flag)
    model, inputs, kwargs, seq_inputs, dense_source, notes = _load_model(args)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if kernel is None:
        with console.status("exporting to ONNX…"):
            export_onnx(model, out, inputs, example_kwargs=kwargs, seq_inputs=seq_inputs, force=args.force,
                        dynamic_batch=not args.static_shapes, kv_cache=kv_cache)
    else:
        compressed = integer_export(model, out, inputs, kernel=kernel.name, example_kwargs=kwargs,
                                    seq_inputs=seq_inputs, dynamic_batch=not args.static_shapes, force=args.force,
                                    progress=console.status, kernel_options=kernel_options, kv_cache=kv_cache)
        for note in compressed.notes:
            console.print(f"[dim]{escape(note)}[/]")
    console.print(f"[green]wrote[/] {out} ({fmt_bytes(Path(out).stat().st_size)})")
    if not args.check:
        return 0
    rtol, note = check_tolerance(kernel)
    if note:
        console.print(f"[yellow]note:[/] {escape(note)}")
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if dense_source:
            from ..sources.load import rebuild_model

            dense = rebuild_model(dense_source, trust_pickle=args.trust_pickle)
            reference = Path(tmp) / "dense.onnx"
            with console.status("exporting the dense model the same way…"):
                export_onnx(dense.module, reference, dense.example_args, example_kwargs=dense.example_kwargs,
                            seq_inputs=dense.seq_inputs, dynamic_batch=not args.static_shapes, kv_cache=kv_cache)
        with console.status("checking in onnxruntime…"):
            report = check_onnx(model, out, inputs, example_kwargs=kwargs, reference_onnx=reference, rtol=rtol)
        check_table(report)
        note = _speed_note(read_recipe(args.model).config) if is_artifact(args.model) else None
        if note:
            console.print(f"[yellow]note:[/] {note}")
        report.assert_ok()
    return 0


def _load_model(args):
    """(model, example args, example kwargs, seq inputs, dense source or None, notes) for the `model` argument.

    Raises:
        StageError: an artifact that still has its dense branch.
    """
    from ..errors import StageError
    from ..io.artifact import is_artifact, load, read_recipe
    from ..graph.recipe import inputs_from_spec

    if is_artifact(args.model):
        recipe = read_recipe(args.model)
        if recipe.stage != "vanished":
            raise StageError(f"{args.model} still has its dense branch (stage {recipe.stage}); run `vcon-fx vanish {args.model}` first")
        model = load(args.model, trust_pickle=args.trust_pickle)
        inputs, kwargs = inputs_from_spec(recipe.inputs)
        fixed = recipe.inputs.get("fixed")
        notes = [f"the model computes with fixed {' and '.join(f'{k} {v}' for k, v in fixed.items())} (see `vcon-fx "
                 "transform`'s note): the ONNX takes exactly those sizes"] if fixed else []
        return model, inputs, kwargs, tuple(recipe.selection.get("seq_inputs") or ()), recipe.source, notes
    loaded = load_source(args, args.model)
    return loaded.module, loaded.example_args, loaded.example_kwargs, loaded.seq_inputs, None, loaded.notes


def _kernel_options(args, kernel) -> dict:
    """The chosen kernel's own settings from the flags; a setting for another kernel is refused."""
    from ..errors import UsageError

    if args.block_size is None:
        return {}
    if kernel is None or kernel.name != "matmul-nbits":
        raise UsageError("--block-size sets the blocks of --matmul-nbits: add --matmul-nbits, or drop --block-size")
    from ..export.kernels.matmul_nbits import check_block_size

    return {"block_size": check_block_size(args.block_size)}


def _refuse_unquantized(model: str, config, flag: str) -> None:
    """An integer kernel needs quantized weights: say so before exporting anything."""
    from ..errors import UsageError

    methods = [part.method for part in getattr(config, "configs", (config,))]
    if "quant" not in methods:
        raise UsageError(f"{model} was compressed with {'+'.join(methods)}, which leaves no weight on a quantization grid, so "
                         f"{flag} has nothing to store as integers: export it without {flag}, or compress with quant "
                         "or lowrank+quant")


def _speed_note(config) -> str | None:
    """What the method does not buy on onnxruntime's CPU provider, said plainly."""
    return config.deployment_note()
