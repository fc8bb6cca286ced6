"""Store on-grid float weights of an ONNX file as integers, run by the kernel asked for.

This module reads the file, brings its opset up for INT4, lets `kernels/weight_only.py` store
the on-grid weights as INT8/INT4 + DequantizeLinear (lossless: see `grid.py`), lets the chosen
kernel rewrite the graph for its onnxruntime ops (`kernels/`), and writes the result.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ExportError, UsageError
from ..io.atomic import atomic_path, check_output
from .kernels import get_kernel
from .kernels.weight_only import store_integer_weights
from .proto import INLINE_LIMIT_BYTES, opset_of

__all__ = ["compress_onnx_weights", "CompressReport"]

log = logging.getLogger(__name__)

INT4_OPSET = 21  # DequantizeLinear on INT4 inputs


@dataclass
class CompressReport:
    """What `compress_onnx_weights` did: tensors rewritten (name → storage) and file sizes."""

    path: Path
    rewritten: dict[str, str] = field(default_factory=dict)  # name → "int8" | "int4"
    skipped: dict[str, str] = field(default_factory=dict)  # name → why it stayed float
    bytes_before: int = 0
    bytes_after: int = 0
    int4: bool = False
    dynamic_matmuls: int = 0  # matmuls turned into integer GEMMs (kernel="dynamic")
    static_layers: int = 0  # convolutions and matmuls given fixed activation scales (kernel="static")
    notes: list[str] = field(default_factory=list)
    layer_kernels: dict[str, str] = field(default_factory=dict)  # weight op output name → kernel, where not weight-only
    kernels: tuple[str, ...] = ()  # the kernels that ran, in order
    layers: dict[str, str] = field(default_factory=dict)  # quantized layer path → its kernel (integer_export)
    islands: list = field(default_factory=list)  # float islands between integer kernels (islands.Island)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)


def compress_onnx_weights(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    bits: int = 8,
    min_elements: int = 64,
    fold_transposes: bool = True,
    kernel: str | tuple[str, ...] = "weight-only",
    require_integers: bool = False,
    force: bool = False,
    described_as: str | None = None,
    kernel_options: dict | None = None,
) -> CompressReport:
    """Rewrite on-grid float weights of an ONNX model into integers + DequantizeLinear (pure on the input).

    Args:
        onnx_path: the float (or already partly integer) model.
        out_path: where to write; default `NAME.int{bits}.onnx` beside the input. Never the input.
        bits: 8 stores every grid as INT8; 4 stores grids of ≤ 4 bits as INT4 (opset ≥ 21; the
            model's opset is converted when needed, else INT8 is kept and a note says why).
        min_elements: smaller tensors (shape constants, tiny biases) stay as they are.
        fold_transposes: DequantizeLinear(W) → Transpose becomes DequantizeLinear(Wᵀ): no
            per-inference transpose, and onnxruntime can then fuse DequantizeLinear → MatMul
            (MatMulNBits; MatMulIntegerToFloat when the input is QDQ too). Note: MatMulNBits
            computes with int8 activations at onnxruntime's default accuracy level 4; session
            option `session.qdq_matmulnbits_accuracy_level=1` keeps them float.
        kernel: a registered export kernel (`kernels/`): "weight-only" keeps DequantizeLinear
            in front of float ops (outputs as in PyTorch); "dynamic" (bits=8) runs int8 matmuls
            as integer GEMMs with activations quantized at run time, as `quantize_dynamic` does;
            "static" (bits=8) runs layers whose activations have scales as QLinearConv /
            MatMulIntegerToFloat. A tuple runs several in order, e.g. ("static", "dynamic"): each
            takes the layers the ones before it left weight-only.
        require_integers: raise instead of writing a float copy when no weight lies on a grid
            and none is stored as integers already.
        force: replace an existing output.
        described_as: how errors name the model (default: `onnx_path`), e.g. the user's model
            when `onnx_path` is a temporary export of it.
        kernel_options: the kernel's own settings, passed to its rewrite (e.g. `block_size`
            for "matmul-nbits").

    Returns:
        A CompressReport (tensors rewritten, sizes before/after).

    Raises:
        UsageError: `bits` not 8 or 4 (or not one the kernel stores), an unknown kernel, the
            output is the input, or `require_integers` and nothing to store as integers.
        OutputExistsError: the output exists and `force` is false.
        ExportError: the file is not a readable ONNX model.

    Example:
        >>> compress_onnx_weights("model.onnx", "model.int8.onnx").ratio > 3.5  # doctest: +SKIP
        True
    """
    if bits not in (8, 4):
        raise UsageError(f"bits must be 8 or 4 (the integer storage widths onnxruntime reads), got {bits!r}")
    chain = [get_kernel(name) for name in ((kernel,) if isinstance(kernel, str) else kernel)]
    for chosen in chain:
        if bits not in chosen.bits:
            raise UsageError(f"kernel={chosen.name!r} {chosen.why_bits}")
    src = Path(onnx_path)
    out = Path(out_path) if out_path is not None else src.with_name(f"{src.stem}.int{bits}.onnx")
    check_output(out, force=force, inputs=(src,))
    model = _load(src)
    report = CompressReport(out, bytes_before=src.stat().st_size)
    model, opset = _opset_for(model, bits, report)
    store_integer_weights(model, report, opset=opset, min_elements=min_elements, fold_transposes=fold_transposes)
    _refuse_or_note_no_integers(model, report, described_as or str(src), require_integers)
    for chosen in chain:  # options belong to the kernel that declares them (e.g. MatMulNBits' block_size)
        chosen.lower(model, report, **((kernel_options or {}) if chosen is chain[-1] else {}))
    report.kernels = tuple(k.name for k in chain)
    _save(model, src, out)
    report.bytes_after = out.stat().st_size
    log.info("compressed %s: %d weight(s) to integers, %.1f× smaller (%s)", src.name, len(report.rewritten),
             report.ratio, out)
    return report


def _load(src: Path):
    import onnx

    try:
        return onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, OSError, … for bad files
        raise ExportError(f"{src} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None


def _opset_for(model, bits: int, report: CompressReport):
    """(model at an opset that stores INT4 when `bits` ≤ 4 and it converts, its opset); sets `report.int4`."""
    opset = opset_of(model)
    if bits <= 4 and opset < INT4_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, INT4_OPSET)
            report.notes.append(f"opset {opset} → {INT4_OPSET} for INT4 DequantizeLinear")
            opset = INT4_OPSET
        except Exception as exc:
            report.notes.append(f"opset {opset} could not be converted to {INT4_OPSET} ({exc}): INT4 grids stay INT8")
    report.int4 = bits <= 4 and opset >= INT4_OPSET
    return model, opset


def _refuse_or_note_no_integers(model, report: CompressReport, src: str, require_integers: bool) -> None:
    """When nothing is stored as integers: raise if integers were required, else say so in the report."""
    if report.rewritten or any(n.op_type == "DequantizeLinear" for n in model.graph.node):
        return
    if require_integers:
        raise UsageError(f"{src} has no weight on a quantization grid and none stored as integers, so there is "
                         "nothing to store as INT4/INT8 (nothing written): export a vanished quant or "
                         "lowrank+quant model")
    report.notes.append("no float weight lies on a quantization grid: fake-quantize or vanish a quant model first")


def _save(model, src: Path, out: Path) -> None:
    """Validate and write atomically; weights go to `OUT.data` above protobuf's size limit."""
    import onnx

    try:
        onnx.checker.check_model(model) if model.ByteSize() < INLINE_LIMIT_BYTES else None
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"compressing {src} produced an invalid model ({str(exc).splitlines()[0]}): a bug, please report it") from None
    with atomic_path(out) as tmp:
        if model.ByteSize() < INLINE_LIMIT_BYTES:
            onnx.save_model(model, str(tmp))
        else:
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=f"{out.name}.data")
