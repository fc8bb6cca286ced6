"""`vcon-fx export`: ONNX, optionally with integer kernels, checked in onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.markup import escape

from ..errors import UsageError
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
    p.add_argument("--int4", action="store_true", help="store weights of ≤ 4 bits as INT4 (opset 21; 8× smaller)")
    p.add_argument("--dynamic-int8", action="store_true",
                   help="run int8 matmuls as onnxruntime's DynamicQuantizeMatMul (activations quantized at run time: "
                        "integer GEMMs, faster on CPU)")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    from ..io.artifact import is_artifact, load, read_recipe
    from ..errors import StageError
    from ..export.check import check_onnx
    from ..export.onnx import export_onnx
    from ..io.atomic import check_output
    from ..io.recipe import inputs_from_spec

    if args.int4 and args.dynamic_int8:
        raise UsageError("--int4 and --dynamic-int8 exclude each other: the integer GEMMs take INT8 weights")
    out = check_output(args.onnx, force=args.force, inputs=(args.model,))
    if is_artifact(args.model):
        recipe = read_recipe(args.model)
        if recipe.stage != "vanished":
            raise StageError(f"{args.model} still has its dense branch (stage {recipe.stage}); run `vcon-fx vanish {args.model}` first")
        model = load(args.model, trust_pickle=args.trust_pickle)
        inputs, kwargs = inputs_from_spec(recipe.inputs)
        seq_inputs = tuple(recipe.selection.get("seq_inputs") or ())
        dense_source = recipe.source
    else:
        loaded = load_source(args, args.model)
        model, inputs, kwargs, seq_inputs, dense_source = (loaded.module, loaded.example_args, loaded.example_kwargs,
                                                           loaded.seq_inputs, None)
    integer = args.int4 or args.dynamic_int8
    with tempfile.TemporaryDirectory() as float_dir:
        exported = Path(float_dir) / "float.onnx" if integer else out
        with console.status("exporting to ONNX…"):
            export_onnx(model, exported, inputs, example_kwargs=kwargs, seq_inputs=seq_inputs, force=args.force,
                        dynamic_batch=not args.static_shapes)
        if integer:
            from ..export.quantize import compress_onnx_weights

            with console.status("storing integer weights…"):
                compressed = compress_onnx_weights(exported, out, bits=4 if args.int4 else 8,
                                                   kernel="dynamic" if args.dynamic_int8 else "weight-only",
                                                   require_integers=True, force=args.force)
            for note in compressed.notes:
                console.print(f"[dim]{escape(note)}[/]")
    console.print(f"[green]wrote[/] {out} ({fmt_bytes(Path(out).stat().st_size)})")
    if not args.check:
        return 0
    # Integer kernels quantize activations (DynamicQuantizeMatMul; MatMulNBits at onnxruntime's default
    # accuracy level): outputs move by that rounding, so parity is judged at 5 % of the output range.
    rtol = 0.05 if integer else 1e-4
    if integer:
        console.print("[yellow]note:[/] integer kernels quantize activations at run time: parity allows 5 % of "
                      "the output range; the cosine column shows the fidelity")
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        if dense_source:
            from ..sources.load import rebuild_model

            dense = rebuild_model(dense_source, trust_pickle=args.trust_pickle)
            reference = Path(tmp) / "dense.onnx"
            with console.status("exporting the dense model the same way…"):
                export_onnx(dense.module, reference, dense.example_args, example_kwargs=dense.example_kwargs,
                            seq_inputs=dense.seq_inputs, dynamic_batch=not args.static_shapes)
        with console.status("checking in onnxruntime…"):
            report = check_onnx(model, out, inputs, example_kwargs=kwargs, reference_onnx=reference, rtol=rtol)
        check_table(report)
        note = _speed_note(read_recipe(args.model).config) if is_artifact(args.model) else None
        if note:
            console.print(f"[yellow]note:[/] {note}")
        report.assert_ok()
    return 0


def _speed_note(config) -> str | None:
    """What the method does not buy on onnxruntime's CPU provider, said plainly."""
    return config.deployment_note()
