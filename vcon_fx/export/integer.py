"""Export with integer weights: which kernel the CLI flags choose, the export itself, and its check tolerance.

`kernel="auto"` (the CLI's default for a vanished quant model) picks the fastest faithful
kernels: static int8 where activation scales exist, DynamicQuantizeMatMul for the other
matmuls, weight-only for the rest; when onnxruntime's outputs then leave the check's tolerance
it drops to the next, more faithful choice (`AUTO_CHOICES`), and says so.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

from torch import nn

from ..errors import UsageError
from ..io.atomic import check_output
from .auto import first_faithful, storage_bits
from .check import FLOAT_RTOL
from .islands import find_islands, optimized_graph
from .layer_ranges import layer_ops, quantized_layers
from .kernels import KERNELS, ExportKernel, get_kernel
from .onnx import export_onnx
from .quantize import CompressReport, compress_onnx_weights
from .seq2seq import encoder_path
from .seq2seq_onnx import rename_encoder
from .static_inputs import StaticInputs, prepare_static

__all__ = ["kernel_for_flags", "kernel_choice", "check_tolerance", "integer_export", "AUTO", "AUTO_CHOICES",
           "KERNEL_CHOICES"]

AUTO = "auto"
# The kernels auto tries, fastest first; each runs after the ones before it in its tuple.
AUTO_CHOICES = (("static", "dynamic"), ("dynamic",), ("weight-only",))
KERNEL_CHOICES = (AUTO, *KERNELS)


def kernel_for_flags(options: Mapping[str, Any]) -> ExportKernel | None:
    """The kernel whose own CLI flag is set in `options` (pure); None when no kernel's flag is.

    Args:
        options: parsed options, e.g. `vars(args)`: each kernel's `flag_dest` → whether given.

    Raises:
        UsageError: flags of two kernels are set (one file runs one kernel).
    """
    chosen = [k for k in KERNELS.values() if k.flag_dest and options.get(k.flag_dest)]
    if len(chosen) > 1:
        reason = "; ".join(k.conflict for k in chosen if k.conflict) or "one file runs one kernel"
        raise UsageError(f"{' and '.join(k.flag for k in chosen)} exclude each other: {reason}")
    return chosen[0] if chosen else None


def kernel_choice(options: Mapping[str, Any]) -> str | None:
    """`--kernel`'s value, or the kernel an older flag names (pure); None when neither is given.

    Raises:
        UsageError: two kernel flags, or `--kernel` naming another kernel than a flag does.
    """
    flagged, named = kernel_for_flags(options), options.get("kernel")
    if flagged is not None and named not in (None, flagged.name):
        raise UsageError(f"{flagged.flag} chooses kernel {flagged.name!r}, --kernel {named} another: give one of them")
    return flagged.name if flagged is not None else named


def check_tolerance(kernel: ExportKernel | Sequence[str] | None) -> tuple[float, str | None]:
    """(rtol, note to show) that `check_onnx` judges a file exported with `kernel` by (pure); None: a float export.

    Args:
        kernel: an ExportKernel, the names of the kernels that ran (`CompressReport.kernels`), or None.
    """
    if kernel is None:
        return FLOAT_RTOL, None
    if isinstance(kernel, ExportKernel):
        return kernel.rtol, kernel.check_note
    ran = [get_kernel(name) for name in kernel]
    if not ran:
        return FLOAT_RTOL, None
    loosest = max(ran, key=lambda k: k.rtol)
    return loosest.rtol, loosest.check_note


def integer_export(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple,
    *,
    kernel: str,
    bits: int | None = None,
    example_kwargs: dict | None = None,
    seq_inputs: tuple[str, ...] = (),
    dynamic_batch: bool = True,
    force: bool = False,
    progress: Callable[[str], ContextManager] | None = None,
    kernel_options: dict | None = None,
    kv_cache: bool | None = None,
    calibration: Sequence[tuple[tuple, dict]] | None = None,
    calibration_name: str = "the calibration data",
) -> CompressReport:
    """Export `model` to ONNX and store its weights as integers run by `kernel` (pure: the model is left as it was).

    The float export goes to a temporary folder; only the integer file is written to `path`.

    Args:
        model: as for `export_onnx`.
        path: the `.onnx` file to write (atomically).
        example_inputs: positional inputs for `model.forward`, used for tracing (and auto's check).
        kernel: "auto", or a registered export kernel's name (`vcon_fx.export.kernels.KERNELS`).
        bits: the storage width; None takes the one the kernel's flag stores (`flag_bits`; 8 for auto).
        example_kwargs: keyword inputs for `model.forward`.
        seq_inputs: input names whose dim 1 is dynamic too.
        dynamic_batch: make dim 0 of every tensor input dynamic.
        force: replace `path` if it exists.
        progress: called with each step's description; the context manager it returns spans
            the step (the CLI passes its spinner).
        kernel_options: the kernel's own settings (e.g. `block_size` for "matmul-nbits").
        kv_cache: as `export_onnx` (a decoder LM takes its KV cache as inputs and outputs).
        calibration: (args, kwargs) batches of real inputs: the static kernel calibrates the
            activations of a model that learned no scales on them, and auto checks on the first.
        calibration_name: what the notes call `calibration`.

    Returns:
        The CompressReport; `notes` say what the kernels did, `layers` which kernel each
        quantized layer got, `islands` what stays float between integer kernels.

    Raises:
        UsageError: an unknown kernel, a width it does not store, no weight to store as integers,
            or kernel "static" on a model with neither activation scales nor calibration data.
        OutputExistsError, ExportError: as `export_onnx` and `compress_onnx_weights`.
    """
    choices = AUTO_CHOICES if kernel == AUTO else ((get_kernel(kernel).name,),)
    out = check_output(path, force=force)
    step = progress or (lambda _: contextlib.nullcontext())
    described_as = f"the exported {type(model).__name__}"
    with tempfile.TemporaryDirectory() as folder:
        exported, scopes = Path(folder) / "float.onnx", {}
        with step("exporting to ONNX…"):
            export_onnx(model, exported, example_inputs, example_kwargs=example_kwargs, seq_inputs=seq_inputs,
                        force=True, dynamic_batch=dynamic_batch, scopes=scopes, kv_cache=kv_cache)
        static = StaticInputs(ops=_layer_ops(model, exported, scopes))
        if any("static" in choice for choice in choices):
            with step("reading activation scales…"):
                static = prepare_static(model, exported, scopes, calibration, required=kernel == "static",
                                        calibration_name=calibration_name)
            if not static.usable:
                choices = tuple(c for c in choices if "static" not in c) or choices
        check_batch = calibration[0] if calibration else (tuple(example_inputs), dict(example_kwargs or {}))
        choice, notes, chosen_options = first_faithful(model, exported, Path(folder), choices, bits, check_batch,
                                                       step, described_as)
        float_encoder = encoder_path(exported)
        if float_encoder.is_file():  # an encoder-decoder LM: its encoder goes beside `out`, named after it
            check_output(encoder_path(out), force=force)  # before anything is written
            rename_encoder(exported, encoder_path(out).name)
        with step("storing integer weights…"):
            report = compress_onnx_weights(exported, out, bits=storage_bits(choice, bits), kernel=choice,
                                           require_integers=True, force=force, described_as=described_as,
                                           kernel_options={**(kernel_options or {}), **chosen_options})
            if float_encoder.is_file():
                _store_encoder(float_encoder, encoder_path(out), choice, bits, described_as,
                               {**(kernel_options or {}), **chosen_options})
    report.notes[:0] = static.notes + notes
    report.layers = static.layer_kernels(report.layer_kernels)
    if "static" in choice:
        report.islands = find_islands(optimized_graph(out))
        report.notes.append(_islands_note(report.islands))
    return report


def _store_encoder(float_encoder: Path, out: Path, choice: tuple[str, ...], bits: int | None, described_as: str,
                   kernel_options: dict) -> None:
    """The encoder file of an encoder-decoder LM with the decoder's kernels (`out` checked by the caller).

    Static int8 reads activation scales found for the decoder file only: its encoder runs the
    dynamic kernel, or stays weight-only.
    """
    kernels = tuple(k for k in choice if k != "static") or ("weight-only",)
    compress_onnx_weights(float_encoder, out, bits=storage_bits(kernels, bits), kernel=kernels, require_integers=False,
                          force=True, described_as=f"the encoder of {described_as}", kernel_options=kernel_options)


def _layer_ops(model: nn.Module, exported: Path, scopes: dict[str, str]) -> dict[str, tuple[str, str]]:
    import onnx

    return layer_ops(onnx.load(str(exported), load_external_data=False).graph, scopes, quantized_layers(model))


def _islands_note(islands: list) -> str:
    if not islands:
        return "static int8: no float island between integer kernels"
    shown = "; ".join(i.describe() for i in islands[:5])
    more = f"; … {len(islands) - 5} more" if len(islands) > 5 else ""
    return f"static int8: {len(islands)} float island(s) between integer kernels: {shown}{more}"
