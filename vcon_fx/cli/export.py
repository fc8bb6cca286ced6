"""`vcon-fx export`: ONNX, with the fastest faithful integer kernels for a quantized model, checked in onnxruntime."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.markup import escape

from ..export.integer import KERNEL_CHOICES
from ..export.kernels import KERNELS
from ..export.seq2seq import SEQ2SEQ_METADATA_KEY, encoder_path
from .options import add_source, load_source
from .render import check_table, console, fmt_bytes

__all__ = ["add_parser", "run"]

CALIBRATION_EXAMPLES = 64  # the first examples of --calibration-data the static kernel observes
CALIBRATION_BATCH = 4


def add_parser(sub) -> None:
    """Add the `export` sub-command to an argparse sub-parsers object."""
    p = sub.add_parser("export", help="export to ONNX, optionally checked in onnxruntime")
    p.add_argument("model", help="a vanished vcon artifact, or any model source (exported dense)")
    add_source(p)
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch, and with the dense model")
    p.add_argument("--static-shapes", action="store_true", help="export fixed shapes (no dynamic batch/sequence axes)")
    p.add_argument("--kernel", choices=KERNEL_CHOICES,
                   help="integer kernels of a quantized model (default auto: the fastest within the check's tolerance)")
    p.add_argument("--calibration-data", help="data whose first examples calibrate activation ranges for --kernel "
                                              "static / auto when the model learned none (same formats as --data)")
    for kernel in KERNELS.values():
        if kernel.flag:
            p.add_argument(kernel.flag, action="store_true", help=kernel.flag_help)
    p.add_argument("--block-size", type=int, default=None,
                   help="--matmul-nbits: weights per block, a power of 2 ≥ 16 (default 32)")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="a decoder language model without its KV cache: the whole sequence every call")
    p.add_argument("--force", action="store_true", help="replace an existing output")


def run(args) -> int:
    from ..export import check_tolerance, integer_export
    from ..export.check import check_onnx
    from ..export.onnx import export_onnx
    from ..io.artifact import is_artifact, read_recipe
    from ..io.atomic import check_output

    out = check_output(args.onnx, force=args.force,
                       inputs=tuple(p for p in (args.model, getattr(args, "calibration_data", None)) if p))
    kernel, recipe = _choose_kernel(args)
    kernel_options = _kernel_options(args, KERNELS[kernel] if kernel in KERNELS else None)
    kv_cache = False if args.no_kv_cache else None
    model, inputs, kwargs, seq_inputs, dense_source, notes = _load_model(args)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    kernels_run = None
    if kernel is None:
        with console.status("exporting to ONNX…"):
            export_onnx(model, out, inputs, example_kwargs=kwargs, seq_inputs=seq_inputs, force=args.force,
                        dynamic_batch=not args.static_shapes, kv_cache=kv_cache)
    else:
        calibration, calibration_name = _calibration(args, model, recipe, kernel)
        compressed = integer_export(model, out, inputs, kernel=kernel, example_kwargs=kwargs, seq_inputs=seq_inputs,
                                    dynamic_batch=not args.static_shapes, force=args.force, progress=console.status,
                                    calibration=calibration, calibration_name=calibration_name,
                                    kernel_options=kernel_options,
                                    kv_cache=kv_cache)
        kernels_run = compressed.kernels
        for note in compressed.notes:
            console.print(f"[dim]{escape(note)}[/]", soft_wrap=True)
        lines = kernel_lines(compressed.layers, recipe.groups if recipe else ())
        if lines:
            console.print("kernels:")
        for line in lines:
            console.print(line, soft_wrap=True)
        console.print(f"[yellow]deploy:[/] {escape(_deployment_line(out, compressed.kernels))}", soft_wrap=True)
    _print_written(Path(out))
    if not args.check:
        return 0
    rtol, note = check_tolerance(kernels_run)
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


def _print_written(out: Path) -> None:
    """Say what the export wrote: the file, and an encoder-decoder model's encoder file beside it."""
    import onnx

    console.print(f"[green]wrote[/] {out} ({fmt_bytes(out.stat().st_size)})")
    props = {p.key for p in onnx.load(str(out), load_external_data=False).metadata_props}
    if SEQ2SEQ_METADATA_KEY in props:
        encoder = encoder_path(out)
        console.print(f"[green]wrote[/] {encoder} ({fmt_bytes(encoder.stat().st_size)}), the encoder of {out.name}")


def _choose_kernel(args):
    """(the kernel to export with: "auto", a kernel name or None for a float export; the artifact's recipe or None).

    Raises:
        UsageError: two kernel flags, a kernel for a model with no quantized weight, or calibration
            data for a model source (it calibrates a vanished quant artifact).
    """
    from ..errors import UsageError
    from ..export import kernel_choice
    from ..io.artifact import is_artifact, read_recipe

    kernel = kernel_choice(vars(args))
    recipe = read_recipe(args.model) if is_artifact(args.model) else None
    quantized = recipe is not None and "quant" in _methods(recipe.config)
    if getattr(args, "calibration_data", None) and not quantized:
        raise UsageError(f"--calibration-data calibrates the activations of a vanished quant artifact; {args.model} "
                         "is not one: leave --calibration-data out, or transform with --method quant first")
    if kernel in (None, "auto"):
        if kernel == "auto" and not quantized:
            console.print(f"[yellow]note:[/] {escape(args.model)} has no quantized weight: --kernel auto exports it "
                          "in float")
        return ("auto" if quantized else None), recipe
    if recipe is not None:
        flag = KERNELS[kernel].flag if KERNELS[kernel].flag and getattr(args, KERNELS[kernel].flag_dest, False) \
            else f"--kernel {kernel}"
        _refuse_unquantized(args.model, recipe.config, flag)
    return kernel, recipe


def _calibration(args, model, recipe, kernel: str):
    """(the first CALIBRATION_EXAMPLES examples of the calibration data as (args, kwargs) batches, or None; its name).

    --calibration-data first; without it, a model the static kernel would have to calibrate
    (a quantized layer recorded no range while fine-tuning) uses the data it was fine-tuned on,
    as its recipe records it, and the export notes say so.
    """
    path, name = getattr(args, "calibration_data", None), "the calibration data"
    training = recipe.training if recipe is not None else None
    if not path and training and kernel in ("auto", "static"):
        from ..export.static_inputs import needs_calibration

        if needs_calibration(model) and Path(training["data"]).exists():
            path = training["data"]
            name = f"the training data ({path}; no --calibration-data given)"
    if not path:
        return None, name
    from torch.utils.data import DataLoader, Subset

    from ..data import load_data_for
    from ..training.batches import split_batch

    columns = {k: training[k] for k in ("seq_len", "text_column", "label_column")
               if training and path == training["data"] and training.get(k) is not None}
    with console.status(f"reading {name}…"):
        data = load_data_for(model, path, **columns)
        first = Subset(data, range(min(CALIBRATION_EXAMPLES, len(data))))
        return [split_batch(batch)[:2] for batch in DataLoader(first, batch_size=CALIBRATION_BATCH)], name


def kernel_lines(layers: dict[str, str], groups) -> list[str]:
    """Which kernel each group got, one line per group (one per kernel when there are many groups) (pure)."""
    if not layers:
        return []
    rows = []
    for group in groups or ():
        got = [layers[p] for p in group.layers if p in layers]
        if got:
            counts = {k: got.count(k) for k in dict.fromkeys(got)}
            rows.append((group.name, ", ".join(k if n == len(got) else f"{k} ×{n}" for k, n in counts.items())))
    if not rows:  # no recipe groups: the layers themselves
        rows = list(layers.items())
    if len(rows) <= 12:
        return [f"  [bold]{escape(kernel)}[/]: {escape(name)}" for name, kernel in rows]
    by_kernel: dict[str, list[str]] = {}
    for name, kernel in rows:
        by_kernel.setdefault(kernel, []).append(name)
    return [f"  [bold]{escape(kernel)}[/]: {len(names)} group(s): {escape(', '.join(names[:4]))}"
            f"{', …' if len(names) > 4 else ''}" for kernel, names in by_kernel.items()]


def _deployment_line(path, kernels: tuple[str, ...]) -> str:
    """The onnxruntime session options a deployment of `path` must use, in one line."""
    import onnx

    from ..bench.worker import is_static_int8

    entries = {}
    for name in kernels:
        entries.update(KERNELS[name].session_options(path))
    if entries:
        return ("open it with the session config " + ", ".join(f"{k}={v}" for k, v in entries.items())
                + " (SessionOptions.add_session_config_entry); `vcon-fx bench` does")
    if "static" in kernels and is_static_int8(onnx.load(str(path), load_external_data=False).graph):
        return ("onnxruntime's default session options (graph optimizations on: they fuse the QDQ pairs into "
                "integer kernels); do not set session.disable_quant_qdq")
    return "onnxruntime's default session options"


def _methods(config) -> list[str]:
    return [part.method for part in getattr(config, "configs", (config,))]


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
        # onnxruntime's CPU kernels take float32: a bf16 / fp16 model is rebuilt in float32, its weights cast
        model = load(args.model, trust_pickle=args.trust_pickle, dtype="fp32")
        inputs, kwargs = inputs_from_spec(recipe.inputs)
        fixed = recipe.inputs.get("fixed")
        notes = [f"the model computes with fixed {' and '.join(f'{k} {v}' for k, v in fixed.items())} (see `vcon-fx "
                 "transform`'s note): the ONNX takes exactly those sizes"] if fixed else []
        if (recipe.source or {}).get("dtype"):
            from ..graph.precision import cast_inputs, torch_dtype

            inputs, kwargs = cast_inputs(inputs, torch_dtype("fp32")), cast_inputs(kwargs, torch_dtype("fp32"))
            notes.append(f"the model was made in {recipe.source['dtype']}: exported in float32")
        dense = {k: v for k, v in (recipe.source or {}).items() if k != "dtype"} or None  # the reference: float32 too
        return model, inputs, kwargs, tuple(recipe.selection.get("seq_inputs") or ()), dense, notes
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

    methods = _methods(config)
    if "quant" not in methods:
        raise UsageError(f"{model} was compressed with {'+'.join(methods)}, which leaves no weight on a quantization grid, so "
                         f"{flag} has nothing to store as integers: export it without {flag}, or compress with quant "
                         "or lowrank+quant")


def _speed_note(config) -> str | None:
    """What the method does not buy on onnxruntime's CPU provider, said plainly."""
    return config.deployment_note()
