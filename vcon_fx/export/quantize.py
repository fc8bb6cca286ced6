"""Store on-grid float weights of an ONNX file as integers + DequantizeLinear (lossless).

Weights trained with fake quantization (or rounded by any per-channel symmetric scheme) are
floats that lie exactly on a grid: for every output channel c there is a scale s_c with
w / s_c integer and |w / s_c| ≤ qmax. This pass finds that grid (s_c = max|w_c| / qmax, the
smallest qmax that fits, within 1e-4 of an integer), stores the integers as INT8 (or INT4 when
they fit in 4 bits and `bits` ≤ 4) with a per-axis float scale, and puts a DequantizeLinear in
front of every consumer. Binary and ternary weights are ±1/0 integers with the channel scale.
Existing DequantizeLinear on INT8 initializers (a vanished quantized model exports those) are
repacked to INT4 when their values fit. Floats that are not on a grid are left alone.

The outputs are unchanged up to float rounding of the scale (far below one quantization
step); the file shrinks about 4× (INT8) or 8× (INT4) on the weights.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ExportError, UsageError
from ..io.atomic import atomic_path, check_output
from .dynamic_int8 import to_dynamic_int8

__all__ = ["compress_onnx_weights", "CompressReport", "find_grid", "QMAX_CANDIDATES"]

log = logging.getLogger(__name__)

# qmax = 2^(b−1) − 1 for b = 2…8; 1 also covers binary (±1) and ternary (−1, 0, +1).
QMAX_CANDIDATES = (1, 3, 7, 15, 31, 63, 127)
GRID_TOL = 1e-4
INT4_OPSET = 21  # DequantizeLinear on INT4 inputs
_MAX_PROTO = 1536 * 1024 * 1024  # above this the weights go to external data (protobuf limit 2 GiB)


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
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_after, 1)


def find_grid(weight: np.ndarray, axis: int, *, max_qmax: int = 127, tol: float = GRID_TOL):
    """(q int8, scale float32 per slice along `axis`, qmax) when `weight` lies on a grid, else None.

    Tries qmax = 1, 3, 7, … and keeps the first that fits: the fewest bits that store it.
    A slice of zeros gets scale 1.
    """
    w = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0)
    rows = w.reshape(w.shape[0], -1)
    if not np.isfinite(rows).all():
        return None
    amax = np.abs(rows).max(axis=1)
    live = amax > 0
    for qmax in QMAX_CANDIDATES:
        if qmax > max_qmax:
            break
        scale = np.where(live, amax / qmax, 1.0)
        r = rows / scale[:, None]
        q = np.rint(r)
        if np.abs(r - q).max() <= tol and np.abs(q).max() <= qmax:
            q = np.moveaxis(q.reshape(w.shape), 0, axis).astype(np.int8)
            return q, scale.astype(np.float32), qmax
    return None


def compress_onnx_weights(
    onnx_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    bits: int = 8,
    min_elements: int = 64,
    fold_transposes: bool = True,
    kernel: str = "weight-only",
    require_integers: bool = False,
    force: bool = False,
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
        kernel: "weight-only" keeps DequantizeLinear in front of float ops (outputs as in PyTorch);
            "dynamic" turns int8 matmuls into onnxruntime's DynamicQuantizeMatMul /
            MatMulIntegerToFloat (activations quantized at run time, as `quantize_dynamic` does:
            integer GEMMs, faster on CPU, outputs within the activation rounding). bits must be 8.
        require_integers: raise instead of writing a float copy when no weight lies on a grid
            and none is stored as integers already.
        force: replace an existing output.

    Returns:
        A CompressReport (tensors rewritten, sizes before/after).

    Raises:
        UsageError: `bits` not 8 or 4, the output is the input, or `require_integers` and
            nothing to store as integers.
        OutputExistsError: the output exists and `force` is false.
        ExportError: the file is not a readable ONNX model.

    Example:
        >>> report = compress_onnx_weights("model.onnx", "model.int8.onnx")  # doctest: +SKIP
        >>> report.ratio > 3.5  # doctest: +SKIP
        True
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if bits not in (8, 4):
        raise UsageError(f"bits must be 8 or 4 (the integer storage widths onnxruntime reads), got {bits!r}")
    if kernel not in ("weight-only", "dynamic"):
        raise UsageError(f"kernel must be weight-only or dynamic, got {kernel!r}")
    if kernel == "dynamic" and bits != 8:
        raise UsageError("kernel='dynamic' runs int8 GEMMs: use bits=8 (INT4 weights have no dynamic kernel)")
    src = Path(onnx_path)
    out = Path(out_path) if out_path is not None else src.with_name(f"{src.stem}.int{bits}.onnx")
    check_output(out, force=force, inputs=(src,))
    try:
        model = onnx.load(str(src))
    except Exception as exc:  # onnx raises DecodeError, OSError, … for bad files
        raise ExportError(f"{src} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    report = CompressReport(out, bytes_before=src.stat().st_size)
    opset = _opset(model)
    if bits <= 4 and opset < INT4_OPSET:
        try:
            from onnx import version_converter

            model = version_converter.convert_version(model, INT4_OPSET)
            report.notes.append(f"opset {opset} → {INT4_OPSET} for INT4 DequantizeLinear")
            opset = INT4_OPSET
        except Exception as exc:
            report.notes.append(f"opset {opset} could not be converted to {INT4_OPSET} ({exc}): INT4 grids stay INT8")
    report.int4 = bits <= 4 and opset >= INT4_OPSET

    graph = model.graph
    consumers = _consumers(graph)
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    new_inits, new_nodes, keep = [], [], []
    for init in graph.initializer:
        reason = _why_not(init, min_elements, opset)
        if reason:
            keep.append(init)
            if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(init.dims) >= 2:
                report.skipped[init.name] = reason
            continue
        weight = numpy_helper.to_array(init)
        found = None
        for axis in _axes(init, consumers.get(init.name, [])):
            found = find_grid(weight, axis)
            if found is not None:
                break
        if found is None:
            keep.append(init)
            report.skipped[init.name] = "not on a per-channel symmetric grid"
            continue
        q, scale, qmax = found
        as_int4 = report.int4 and qmax <= 7
        q_name, s_name = _fresh(f"{init.name}_quantized", names), _fresh(f"{init.name}_scale", names)
        new_inits.append(_int_tensor(q, q_name, as_int4))
        new_inits.append(numpy_helper.from_array(scale.astype(_float_np(init.data_type, opset)), s_name))
        new_nodes.append(helper.make_node("DequantizeLinear", [q_name, s_name], [init.name], axis=axis,
                                          name=_fresh(f"{init.name}_dequantize", names)))
        report.rewritten[init.name] = "int4" if as_int4 else "int8"
    if report.int4:
        keep = _repack_int8_dequantize(graph, keep, report)
    if not report.rewritten and not any(n.op_type == "DequantizeLinear" for n in graph.node):
        if require_integers:
            raise UsageError(f"{src} has no weight on a quantization grid and none stored as integers, so there is "
                             "nothing to store as INT4/INT8 (nothing written): export a vanished quant or "
                             "lowrank+quant model")
        report.notes.append("no float weight lies on a quantization grid: fake-quantize or vanish a quant model first")
    rewritten = set(report.rewritten)
    del graph.initializer[:]
    graph.initializer.extend(keep + new_inits)
    inputs = [i for i in graph.input if i.name not in rewritten]  # old IR lists initializers as inputs
    del graph.input[:]
    graph.input.extend(inputs)
    nodes = new_nodes + list(graph.node)  # DequantizeLinear reads only initializers: first is topological
    del graph.node[:]
    graph.node.extend(nodes)
    folded = _fold_transposes(graph) if fold_transposes else 0
    if folded:
        report.notes.append(f"{folded} Transpose(s) of dequantized weights folded into the integer initializers")
    if kernel == "dynamic":
        report.dynamic_matmuls = to_dynamic_int8(model)
        report.notes.append(f"{report.dynamic_matmuls} int8 matmul(s) run as DynamicQuantizeMatMul "
                            "(activations quantized at run time)")
    try:
        onnx.checker.check_model(model) if model.ByteSize() < _MAX_PROTO else None
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"compressing {src} produced an invalid model ({str(exc).splitlines()[0]}): a bug, please report it") from None
    with atomic_path(out) as tmp:
        if model.ByteSize() < _MAX_PROTO:
            onnx.save_model(model, str(tmp))
        else:
            onnx.save_model(model, str(tmp), save_as_external_data=True, location=f"{out.name}.data")
    report.bytes_after = out.stat().st_size
    log.info("compressed %s: %d weight(s) to integers, %.1f× smaller (%s)", src.name, len(report.rewritten),
             report.ratio, out)
    return report


# ── helpers ─────────────────────────────────────────────────────────────────────────────────


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _consumers(graph) -> dict[str, list]:
    found: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            found.setdefault(name, []).append((node, index))
    return found


def _why_not(init, min_elements: int, opset: int) -> str | None:
    from onnx import TensorProto

    if init.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        return "not a float tensor"
    if len(init.dims) < 2:
        return "fewer than 2 dims (bias or constant)"
    if int(np.prod(init.dims)) < min_elements:
        return f"fewer than {min_elements} elements"
    if init.data_type == TensorProto.FLOAT16 and opset < 19:
        return "float16 scales need opset ≥ 19"
    if init.data_location == TensorProto.EXTERNAL and not init.raw_data:
        return "external data not loaded"
    return None


def _axes(init, uses) -> list[int]:
    """Output-channel axis first (by the consumer), then the other ends."""
    ndim = len(init.dims)
    preferred = []
    for node, index in uses:
        if node.op_type == "Conv" and index == 1:
            preferred.append(0)
        elif node.op_type == "ConvTranspose" and index == 1:
            preferred.append(1)
        elif node.op_type == "Gemm" and index == 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            preferred.append(0 if trans_b else 1)
        elif node.op_type == "MatMul" and index == 1:
            preferred.append(ndim - 1)
    order = []
    for axis in [*preferred, 0, ndim - 1, *range(ndim)]:
        if axis not in order:
            order.append(axis)
    return order


def _int_tensor(q: np.ndarray, name: str, as_int4: bool):
    from onnx import numpy_helper

    if as_int4:
        import ml_dtypes

        return numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


def _float_np(data_type: int, opset: int):
    from onnx import TensorProto

    return np.float16 if data_type == TensorProto.FLOAT16 else np.float32


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _repack_int8_dequantize(graph, inits: list, report: CompressReport) -> list:
    """INT8 initializers read only by DequantizeLinear (zero point 0) whose values fit in INT4 → INT4."""
    from onnx import TensorProto, numpy_helper

    uses = _consumers(graph)
    by_name = {i.name: i for i in graph.initializer}
    out = []
    for init in inits:
        readers = uses.get(init.name, [])
        ok = (
            init.data_type == TensorProto.INT8
            and readers
            and all(n.op_type == "DequantizeLinear" and i == 0 for n, i in readers)
            and all(_zero_point_is_zero(n, by_name) for n, _ in readers)
        )
        if ok:
            q = numpy_helper.to_array(init)
            if q.size and q.min() >= -8 and q.max() <= 7:
                for node, _ in readers:  # a zero point must share the input's type: drop the all-zero one
                    if len(node.input) > 2:
                        del node.input[2:]
                out.append(_int_tensor(q, init.name, True))
                report.rewritten[init.name] = "int4"
                continue
        out.append(init)
    return out


def _fold_transposes(graph) -> int:
    """DequantizeLinear(init) → Transpose becomes DequantizeLinear(transposed init, remapped axis).

    The exporter writes a Linear on a 3-D input as MatMul(x, Transpose(W)); with W dequantized
    the Transpose would run on every inference and hide the DequantizeLinear → MatMul pair
    that onnxruntime's QDQ fusions look for.
    """
    from onnx import helper, numpy_helper

    uses = _consumers(graph)
    by_name = {i.name: i for i in graph.initializer}
    drop, folded = [], 0
    for dq in list(graph.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in by_name:
            continue
        readers = uses.get(dq.output[0], [])
        if len(readers) != 1 or readers[0][0].op_type != "Transpose" or dq.output[0] in {o.name for o in graph.output}:
            continue
        transpose = readers[0][0]
        q_init = by_name[dq.input[0]]
        if len(uses.get(q_init.name, [])) != 1:
            continue
        q = numpy_helper.to_array(q_init)
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), list(range(q.ndim))[::-1])
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        scale = by_name.get(dq.input[1])
        if scale is None or len(scale.dims) not in (0, 1) or (len(dq.input) > 2 and dq.input[2] and len(by_name.get(dq.input[2], scale).dims) > 1):
            continue
        q_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(q, perm)), q_init.name))
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", perm.index(axis % q.ndim)))
        dq.output[0] = transpose.output[0]
        drop.append(transpose)
        folded += 1
    for node in drop:
        graph.node.remove(node)
    return folded


def _zero_point_is_zero(node, by_name) -> bool:
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return True
    zp = by_name.get(node.input[2])
    return zp is not None and not numpy_helper.to_array(zp).any()
