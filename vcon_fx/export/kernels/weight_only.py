"""The weight-only kernel, and the integer storage every kernel starts from.

On-grid float weights (see `grid.py`) are stored as INT8 (or INT4 when they fit in 4 bits and
the export asks for ≤ 4) with a per-axis float scale, and a DequantizeLinear goes in front of
every consumer. Existing DequantizeLinear on INT8 initializers (a vanished quantized model
exports those) are repacked to INT4 when their values fit; a grouped one (one scale per block
of inputs, `--group-size`) first becomes a blocked DequantizeLinear at opset ≥ 21 (`blocked.py`).
An asymmetric layer's zero points (`QuantConfig(asymmetric=True)`) go with its integers: INT4
together when both fit, and transposed with them when a Transpose is folded.
Floats that are not on a grid are left alone. The outputs are unchanged up to float rounding of the scale (far below one
quantization step); the file shrinks about 4× (INT8) or 8× (INT4) on the weights.

The weight-only kernel stops there: onnxruntime runs DequantizeLinear in front of float ops
(fused into MatMulNBits for matmuls).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ...bench.worker import session_config
from ..blocked import block_grouped_dequantize
from ..grid import find_grid, grid_axes
from ..proto import attribute, consumers, fresh_name
from .registry import ACTIVATION_ROUNDING_NOTE, ACTIVATION_ROUNDING_RTOL, register_kernel

if TYPE_CHECKING:
    from ..quantize import CompressReport

__all__ = ["store_integer_weights", "keep_dequantize_linear"]


def store_integer_weights(model, report: "CompressReport", *, opset: int, min_elements: int,
                          fold_transposes: bool) -> None:
    """Store the on-grid float weights of an onnx ModelProto as integers + DequantizeLinear (in place).

    Args:
        model: the ModelProto; INT4 storage needs `report.int4` set (opset ≥ 21).
        report: filled in place: `rewritten`, `skipped` and `notes`.
        opset: the model's default-domain opset.
        min_elements: smaller tensors (shape constants, tiny biases) stay as they are.
        fold_transposes: fold DequantizeLinear(W) → Transpose into DequantizeLinear(Wᵀ).
    """
    graph = model.graph
    blocked = block_grouped_dequantize(graph) if opset >= 21 else 0
    if blocked:
        report.notes.append(f"{blocked} grouped weight(s) dequantized per block (DequantizeLinear block_size)")
    uses = consumers(graph)
    names = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    new_inits, new_nodes, keep = [], [], []
    for init in graph.initializer:
        stored = _store_one(init, uses.get(init.name, []), report, names, opset, min_elements)
        if stored is None:
            keep.append(init)
            continue
        new_inits.extend(stored[:2])
        new_nodes.append(stored[2])
    if report.int4:
        keep = _repack_int8_dequantize(graph, keep, report)
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


@register_kernel(
    name="weight-only",
    bits=(8, 4),
    why_bits="stores INT8 or INT4 weights: use bits=8 or bits=4",
    rtol=ACTIVATION_ROUNDING_RTOL,
    check_note=ACTIVATION_ROUNDING_NOTE,
    flag="--int4",
    flag_bits=4,
    flag_help="store weights of ≤ 4 bits as INT4 (opset 21; 8× smaller)",
    conflict="",
    session_options=session_config,
)
def keep_dequantize_linear(model, report: "CompressReport") -> None:
    """Leave the stored graph as it is (pure): DequantizeLinear stays in front of float ops, outputs as in PyTorch."""


def _store_one(init, uses: list, report: "CompressReport", names: set[str], opset: int, min_elements: int):
    """(integers, scale, DequantizeLinear node) for one on-grid initializer, else None (noted in `report`)."""
    from onnx import TensorProto, helper, numpy_helper

    if any(node.op_type == "DequantizeLinear" for node, _ in uses):
        return None  # a DequantizeLinear's own scale (a grouped weight's is 2-D): not a weight
    reason = _why_not(init, min_elements, opset)
    if reason:
        if init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16) and len(init.dims) >= 2:
            report.skipped[init.name] = reason
        return None
    weight = numpy_helper.to_array(init)
    found = None
    for axis in grid_axes(init, uses):
        found = find_grid(weight, axis)
        if found is not None:
            break
    if found is None:
        report.skipped[init.name] = "not on a per-channel symmetric grid"
        return None
    q, scale, qmax = found
    as_int4 = report.int4 and qmax <= 7
    q_name, s_name = fresh_name(f"{init.name}_quantized", names), fresh_name(f"{init.name}_scale", names)
    node = helper.make_node("DequantizeLinear", [q_name, s_name], [init.name], axis=axis,
                            name=fresh_name(f"{init.name}_dequantize", names))
    report.rewritten[init.name] = "int4" if as_int4 else "int8"
    return (_int_tensor(q, q_name, as_int4),
            numpy_helper.from_array(scale.astype(_float_np(init.data_type)), s_name), node)


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


def _int_tensor(q: np.ndarray, name: str, as_int4: bool):
    from onnx import numpy_helper

    if as_int4:
        import ml_dtypes

        return numpy_helper.from_array(q.astype(ml_dtypes.int4), name)
    return numpy_helper.from_array(q.astype(np.int8), name)


def _float_np(data_type: int):
    from onnx import TensorProto

    return np.float16 if data_type == TensorProto.FLOAT16 else np.float32


def _repack_int8_dequantize(graph, inits: list, report: "CompressReport") -> list:
    """INT8 initializers read only by DequantizeLinear whose values (and zero points) fit in INT4 → INT4 (pure on `inits`).

    DequantizeLinear takes its zero point in the integers' type: an all-zero one is dropped, a
    non-zero one (an asymmetric layer's) becomes INT4 with them, and when either does not fit in
    4 bits both stay INT8.
    """
    from onnx import numpy_helper

    uses = consumers(graph)
    by_name = {i.name: i for i in graph.initializer}
    zero_points = set()
    repacked = set()
    for init in inits:
        readers = _int8_dequantize_readers(init, uses)
        if readers is None or not _fits_int4(numpy_helper.to_array(init)):
            continue
        zeros = [n.input[2] for n, _ in readers if not _zero_point_is_zero(n, by_name)]
        if not all(_zero_point_fits_int4(by_name.get(z), init.name, uses) for z in zeros):
            continue
        for node, _ in readers:  # a zero point must share the input's type: drop the all-zero one
            if len(node.input) > 2 and node.input[2] not in zeros:
                del node.input[2:]
        repacked.add(init.name)
        zero_points.update(zeros)
    out = []
    for init in inits:
        if init.name in repacked or init.name in zero_points:
            out.append(_int_tensor(numpy_helper.to_array(init), init.name, True))
            if init.name in repacked:
                report.rewritten[init.name] = "int4"
        else:
            out.append(init)
    return out


def _int8_dequantize_readers(init, uses: dict) -> list | None:
    """The DequantizeLinear nodes reading an INT8 initializer as their integers, when nothing else reads it (pure)."""
    from onnx import TensorProto

    readers = uses.get(init.name, [])
    if init.data_type != TensorProto.INT8 or not readers or not all(n.op_type == "DequantizeLinear" and i == 0
                                                                    for n, i in readers):
        return None
    return readers


def _fits_int4(q: np.ndarray) -> bool:
    return bool(q.size) and q.min() >= -8 and q.max() <= 7


def _zero_point_fits_int4(zero, integers: str, uses: dict) -> bool:
    """Whether a zero point initializer can turn INT4 with `integers`: INT8, in [−8, 7], read only as their zero point."""
    from onnx import TensorProto, numpy_helper

    return (zero is not None and zero.data_type == TensorProto.INT8 and _fits_int4(numpy_helper.to_array(zero))
            and all(n.op_type == "DequantizeLinear" and i == 2 and n.input[0] == integers
                    for n, i in uses.get(zero.name, [])))


def _fold_transposes(graph) -> int:
    """DequantizeLinear(init) → Transpose becomes DequantizeLinear(transposed init, remapped axis) (in place).

    The exporter writes a Linear on a 3-D input as MatMul(x, Transpose(W)); with W dequantized
    the Transpose would run on every inference and hide the DequantizeLinear → MatMul pair
    that onnxruntime's QDQ fusions look for.
    """
    from onnx import helper, numpy_helper

    uses = consumers(graph)
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
        axis, block = attribute(dq, "axis", 1), attribute(dq, "block_size", 0)
        params = [by_name.get(name) for name in dq.input[1:3] if name]  # scale [, zero point]
        ranks = (len(q.shape),) if block else (0, 1)
        if None in params or any(len(p.dims) not in ranks or (block and len(uses.get(p.name, [])) != 1) for p in params):
            continue
        q_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(q, perm)), q_init.name))
        for param in params if block else ():  # blocked scales and zero points have the integers' rank: they turn with them
            param.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(np.transpose(numpy_helper.to_array(param), perm)),
                                                   param.name))
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", perm.index(axis % q.ndim)))
        if block:
            dq.attribute.append(helper.make_attribute("block_size", block))
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
