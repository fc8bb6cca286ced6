"""Export with integer weights: which kernel the CLI flags choose, the export itself, and its check tolerance."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping

from torch import nn

from ..errors import UsageError
from .check import FLOAT_RTOL
from .kernels import KERNELS, ExportKernel, get_kernel
from .onnx import export_onnx
from .quantize import CompressReport, compress_onnx_weights

__all__ = ["kernel_for_flags", "check_tolerance", "integer_export"]


def kernel_for_flags(options: Mapping[str, Any]) -> ExportKernel | None:
    """The kernel whose CLI flag is set in `options` (pure); None when no kernel's flag is.

    Args:
        options: parsed options, e.g. `vars(args)`: each kernel's `flag_dest` → whether given.

    Raises:
        UsageError: flags of two kernels are set (one file runs one kernel).
    """
    chosen = [k for k in KERNELS.values() if options.get(k.flag_dest)]
    if len(chosen) > 1:
        reason = "; ".join(k.conflict for k in chosen if k.conflict) or "one file runs one kernel"
        raise UsageError(f"{' and '.join(k.flag for k in chosen)} exclude each other: {reason}")
    return chosen[0] if chosen else None


def check_tolerance(kernel: ExportKernel | None) -> tuple[float, str | None]:
    """(rtol, note to show) that `check_onnx` judges a file exported with `kernel` by (pure); None: a float export."""
    if kernel is None:
        return FLOAT_RTOL, None
    return kernel.rtol, kernel.check_note


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
) -> CompressReport:
    """Export `model` to ONNX and store its weights as integers run by `kernel` (pure: the model is left as it was).

    The float export goes to a temporary folder; only the integer file is written to `path`.

    Args:
        model: as for `export_onnx`.
        path: the `.onnx` file to write (atomically).
        example_inputs: positional inputs for `model.forward`, used for tracing.
        kernel: a registered export kernel's name (`vcon_fx.export.kernels.KERNELS`).
        bits: the storage width; None takes the one its CLI flag stores (`flag_bits`).
        example_kwargs: keyword inputs for `model.forward`.
        seq_inputs: input names whose dim 1 is dynamic too.
        dynamic_batch: make dim 0 of every tensor input dynamic.
        force: replace `path` if it exists.
        progress: called with each step's description; the context manager it returns spans
            the step (the CLI passes its spinner).
        kernel_options: the kernel's own settings (e.g. `block_size` for "matmul-nbits").
        kv_cache: as `export_onnx` (a decoder LM takes its KV cache as inputs and outputs).

    Returns:
        The CompressReport; its `notes` say what the kernel did.

    Raises:
        UsageError: an unknown kernel, a width it does not store, or no weight to store as integers.
        OutputExistsError, ExportError: as `export_onnx` and `compress_onnx_weights`.
    """
    chosen = get_kernel(kernel)
    bits = chosen.flag_bits if bits is None else bits
    step = progress or (lambda _: contextlib.nullcontext())
    with tempfile.TemporaryDirectory() as float_dir:
        exported = Path(float_dir) / "float.onnx"
        with step("exporting to ONNX…"):
            export_onnx(model, exported, example_inputs, example_kwargs=example_kwargs, seq_inputs=seq_inputs,
                        force=force, dynamic_batch=dynamic_batch, kv_cache=kv_cache)
        with step("storing integer weights…"):
            return compress_onnx_weights(exported, path, bits=bits, kernel=chosen.name, require_integers=True,
                                         force=force, described_as=f"the exported {type(model).__name__}",
                                         kernel_options=kernel_options)
