"""Turn weight-only int8 matmuls into integer matmuls with activations quantized at run time.

A vanished quant model exports its weights as INT8 initializers + DequantizeLinear. onnxruntime
fuses DequantizeLinear → MatMul into an 8-bit MatMulNBits, which on CPU runs at about float
speed; its own `quantize_dynamic` instead emits `DynamicQuantizeMatMul` (VNNI / AVX2 int8 GEMMs,
activations quantized per tensor on the fly). This pass gives our graphs the same kernels while
keeping our integers and per-output-channel scales:

    DequantizeLinear(W_q, s, 0) → MatMul(x, ·) [→ Add(bias)]
        → com.microsoft.DynamicQuantizeMatMul(x, W_q, s, 0[, bias])

and when one x feeds several such matmuls (Q, K, V projections) it is quantized once:

    DynamicQuantizeLinear(x) → com.microsoft.MatMulIntegerToFloat(x_q, W_q, x_s, s, x_zp, 0[, bias]) each

Gemm(x, DQ(W), bias, transB=1) is handled by storing Wᵀ. A weight with zero points per output
channel (an asymmetric per-channel layer) passes them as the kernels' b_zero_point; a grouped
one (one scale and zero point per block of inputs) has no such kernel and stays weight-only, as
do convolutions (onnxruntime has no dynamic-activation conv that beats float). The weights are the same
integers; the outputs move by the activation rounding (about 1e-2 relative), which is why
this is opt-in (`kernel="dynamic"`), not the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ...bench.worker import session_config
from ..proto import attribute, consumers, fresh_name
from .registry import ACTIVATION_ROUNDING_NOTE, ACTIVATION_ROUNDING_RTOL, register_kernel

if TYPE_CHECKING:
    from ..quantize import CompressReport

__all__ = ["dynamic_sites", "to_dynamic_int8", "lower_to_dynamic_int8"]

_MS_DOMAIN = "com.microsoft"


@register_kernel(
    name="dynamic",
    bits=(8,),
    why_bits="runs int8 GEMMs: use bits=8 (INT4 weights have no dynamic kernel)",
    rtol=ACTIVATION_ROUNDING_RTOL,
    check_note=ACTIVATION_ROUNDING_NOTE,
    flag="--dynamic-int8",
    flag_bits=8,
    flag_help="run int8 matmuls as onnxruntime's DynamicQuantizeMatMul (activations quantized at run time: "
              "integer GEMMs, faster on CPU)",
    conflict="the integer GEMMs take INT8 weights",
    session_options=session_config,  # its convolutions stay weight-only
)
def lower_to_dynamic_int8(model, report: "CompressReport", keep_weight_only: frozenset = frozenset()) -> None:
    """Run the stored int8 matmuls as integer GEMMs (in place on `model`; counted and noted in `report`).

    `keep_weight_only`: matmul output names left weight-only (auto's per-layer fallback, `export/auto_layers.py`).
    """
    report.dynamic_matmuls = to_dynamic_int8(model, report.layer_kernels, keep=keep_weight_only)
    if report.dynamic_matmuls or not report.static_layers:  # after static, silent when it left no matmul
        report.notes.append(f"{report.dynamic_matmuls} int8 matmul(s) run as DynamicQuantizeMatMul "
                            "(activations quantized at run time)")
    left = _weights_with_zero_points(model.graph)
    if left:
        report.notes.append(f"{left} weight(s) with zero points stay weight-only (zero points per group of inputs, "
                            "or not a matmul: the integer GEMMs take one per output column)")


@dataclass
class _Site:
    x: str  # the float activation
    weight: str  # INT8 initializer, [K, N]
    scale: str  # per-N (or scalar) float scale
    scale_shape: tuple
    zero: str | None  # the weight's own zero points (per N), or None: all 0
    bias: str | None
    out: str
    remove: list  # nodes the fused op replaces
    anchor: object  # the matmul node: the fused op goes where it was


def to_dynamic_int8(model, layer_kernels: dict[str, str] | None = None, keep: frozenset = frozenset()) -> int:
    """Rewrite the weight-only int8 matmuls of an onnx ModelProto in place; returns how many.

    Args:
        model: the ModelProto.
        layer_kernels: when given, each rewritten matmul's output name → "dynamic" (in place).
        keep: matmul output names to leave weight-only.
    """
    from onnx import helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    sites = [s for s in (_match(dq, graph, inits, readers) for dq in list(graph.node)
                         if dq.op_type == "DequantizeLinear") if s is not None and s.anchor.output[0] not in keep]
    if not sites:
        return 0
    for site in sites:
        if layer_kernels is not None:
            layer_kernels[site.anchor.output[0]] = "dynamic"
    by_input: dict[str, list[_Site]] = {}
    for site in sites:
        by_input.setdefault(site.x, []).append(site)
    order = {id(n): i for i, n in enumerate(graph.node)}
    inserts: list[tuple[object, object]] = []  # (anchor, new node): inserted before the anchor
    taken = set(inits) | {o for n in graph.node for o in n.output}
    for x, group in by_input.items():
        shared = len(group) > 1
        if shared:
            xq, xs, xz = (fresh_name(f"{x}_{suffix}", taken) for suffix in ("u8", "scale", "zero_point"))
            first = min(group, key=lambda s: order[id(s.anchor)]).anchor
            inserts.append((first, helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz],
                                                    name=fresh_name(f"{x}_dynamic_quantize", taken))))
        for site in group:
            zero = site.zero
            if zero is None:
                zero = fresh_name(f"{site.weight}_zero_point", taken)
                graph.initializer.append(_array(np.zeros(site.scale_shape, np.int8), zero))
            bias = [site.bias] if site.bias else []
            if shared:
                node = helper.make_node("MatMulIntegerToFloat", [xq, site.weight, xs, site.scale, xz, zero, *bias],
                                        [site.out], domain=_MS_DOMAIN, name=f"{site.anchor.name}_int8")
            else:
                node = helper.make_node("DynamicQuantizeMatMul", [site.x, site.weight, site.scale, zero, *bias],
                                        [site.out], domain=_MS_DOMAIN, name=f"{site.anchor.name}_int8")
            inserts.append((site.anchor, node))
    for anchor, node in inserts:
        graph.node.insert(list(graph.node).index(anchor), node)
    for site in sites:
        for node in site.remove:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))
    return len(sites)


def _match(dq, graph, inits: dict, readers: dict) -> _Site | None:
    """The fusable pattern around one DequantizeLinear, or None."""
    from onnx import TensorProto, numpy_helper

    if len(dq.input) < 2 or dq.input[0] not in inits or dq.input[1] not in inits:
        return None
    q = inits[dq.input[0]]
    users = readers.get(dq.output[0], [])
    if q.data_type != TensorProto.INT8 or len(q.dims) != 2 or len(users) != 1:
        return None
    if attribute(dq, "block_size", 0):
        return None  # a scale per block of inputs: the integer GEMMs take one per output column
    op, slot = users[0]
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zero = _own_zero_point(dq, inits, scale.shape)
    if zero is False:
        return None
    axis = attribute(dq, "axis", 1) % 2
    weight, bias, remove = dq.input[0], None, [dq, op]
    if op.op_type == "MatMul" and slot == 1 and (scale.ndim == 0 or axis == 1):
        n_out = q.dims[1]
    elif (op.op_type == "Gemm" and slot == 1 and attribute(op, "transB", 0) == 1 and attribute(op, "transA", 0) == 0
          and attribute(op, "alpha", 1.0) == 1.0 and attribute(op, "beta", 1.0) == 1.0 and (scale.ndim == 0 or axis == 0)):
        n_out = q.dims[0]  # W is [N, K]: store Wᵀ, whose columns keep the per-N scales
        weight = f"{q.name}_transposed"
        if weight not in inits:
            graph.initializer.append(_array(np.ascontiguousarray(numpy_helper.to_array(q).T), weight))
            inits[weight] = graph.initializer[-1]
        if len(op.input) > 2 and op.input[2]:
            bias = op.input[2]
    else:
        return None
    out = op.output[0]
    if bias is None:  # MatMul → Add(bias[N]): fold the bias in
        after = readers.get(out, [])
        if len(after) == 1 and after[0][0].op_type == "Add":
            add, add_slot = after[0]
            other = add.input[1 - add_slot]
            if other in inits and list(inits[other].dims) == [n_out]:
                bias, out = other, add.output[0]
                remove.append(add)
    return _Site(op.input[0], weight, dq.input[1], tuple(scale.shape), zero, bias, out, remove, op)


def _weights_with_zero_points(graph) -> int:
    """How many DequantizeLinear of integer initializers with non-zero zero points the graph still has (pure)."""
    from onnx import TensorProto, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    return sum(1 for n in graph.node if n.op_type == "DequantizeLinear" and len(n.input) > 2 and n.input[2] in inits
               and n.input[0] in inits and inits[n.input[0]].data_type in (TensorProto.INT8, TensorProto.INT4)
               and numpy_helper.to_array(inits[n.input[2]]).any())


def _own_zero_point(dq, inits: dict, scale_shape: tuple):
    """The weight's zero point initializer when non-zero and shaped like its scales (None: absent or all 0; False: not one the kernels take)."""
    from onnx import TensorProto, numpy_helper

    if len(dq.input) < 3 or not dq.input[2]:
        return None
    init = inits.get(dq.input[2])
    if init is None or init.data_type != TensorProto.INT8:
        return False
    if not numpy_helper.to_array(init).any():
        return None
    return init.name if tuple(init.dims) == tuple(scale_shape) else False


def _array(value: np.ndarray, name: str):
    from onnx import numpy_helper

    return numpy_helper.from_array(value, name)


def dynamic_sites(model) -> list[tuple[str, str]]:
    """(activation input, matmul output name) of every int8 matmul the dynamic kernel would rewrite (pure)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    sites = (_match(dq, graph, inits, readers) for dq in list(graph.node) if dq.op_type == "DequantizeLinear")
    return [(s.x, s.anchor.output[0]) for s in sites if s is not None]
