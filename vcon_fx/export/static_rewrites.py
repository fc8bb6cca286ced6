"""Graph rewrites around static int8's QDQ placement (`static_int8.py`): forms onnxruntime has integer kernels for.

- ReduceMean over H, W (keepdims) → GlobalAveragePool (QLinearGlobalAveragePool exists).
- Gemm(x, DQ(W), b, transB=1) → MatMul(x, DQ(Wᵀ)) + b (onnxruntime fuses the MatMul form only).
- An integer Conv's float bias → int32 at scale s_x·s_w behind DequantizeLinear (its QDQ fusion
  requires it).
- DQ(x) → MatMul(·, DQ(W)) [→ + b] → com.microsoft.MatMulIntegerToFloat, bias inside.

Each works in place on a ModelProto / GraphProto.
"""

from __future__ import annotations

import numpy as np

from .proto import attribute, consumers, fresh_name

__all__ = ["reduce_mean_to_global_pool", "gemm_to_matmul", "quantize_bias", "matmuls_to_integer", "is_int8_weight"]

_MS_DOMAIN = "com.microsoft"


def is_int8_weight(name: str, producers: dict, inits: dict) -> bool:
    """True when `name` is DequantizeLinear of an INT8 initializer the integer kernels take (pure).

    They take one scale per output channel and zero point 0: a grouped weight (a scale per block
    of inputs) or an asymmetric one (non-zero zero points) stays weight-only.
    """
    from onnx import numpy_helper

    dq = producers.get(name)
    if (dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits
            or inits[dq.input[0]].data_type != 3 or attribute(dq, "block_size", 0)):  # 3 = INT8
        return False
    zero = dq.input[2] if len(dq.input) > 2 else ""
    return not zero or (zero in inits and not numpy_helper.to_array(inits[zero]).any())


def reduce_mean_to_global_pool(graph, ranks: dict[str, int]) -> None:
    """ReduceMean(x[N, C, H, W], axes H and W) → GlobalAveragePool(x) [→ Squeeze without keepdims] (in place)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    taken = set(inits) | {o for n in graph.node for o in n.output}
    for node in list(graph.node):
        if node.op_type != "ReduceMean" or ranks.get(node.input[0]) != 4:
            continue
        axes = attribute(node, "axes", None)
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        if axes is None or sorted(a % 4 for a in axes) != [2, 3]:
            continue
        keep = attribute(node, "keepdims", 1)
        pooled = node.output[0] if keep else fresh_name(f"{node.output[0]}_pooled", taken)
        new = [helper.make_node("GlobalAveragePool", [node.input[0]], [pooled], name=f"{node.name}_global_pool")]
        if not keep:
            axes_name = fresh_name(f"{node.output[0]}_axes", taken)
            graph.initializer.append(numpy_helper.from_array(np.array([2, 3], np.int64), axes_name))
            new.append(helper.make_node("Squeeze", [pooled, axes_name], [node.output[0]], name=f"{node.name}_squeeze"))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, made in enumerate(new):
            graph.node.insert(position + offset, made)


def gemm_to_matmul(graph) -> dict[str, str]:
    """Gemm(x, DQ(W[N, K]), b, transB=1) → MatMul(x, DQ(Wᵀ)) + b (in place): onnxruntime fuses the MatMul form only.

    Returns:
        Each new MatMul's output name → the Gemm's.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    taken = set(inits) | set(producers)
    renamed = {}
    for gemm in list(graph.node):
        if (gemm.op_type != "Gemm" or attribute(gemm, "transB", 0) != 1 or attribute(gemm, "transA", 0)
                or attribute(gemm, "alpha", 1.0) != 1.0 or attribute(gemm, "beta", 1.0) != 1.0):
            continue
        dq = producers.get(gemm.input[1])
        if not is_int8_weight(gemm.input[1], producers, inits) or len(readers.get(gemm.input[1], [])) != 1:
            continue
        if len(readers.get(dq.input[0], [])) != 1 or attribute(dq, "axis", 1) % 2 != 0:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q.T), dq.input[0]))
        del dq.attribute[:]
        dq.attribute.append(helper.make_attribute("axis", 1))
        position = list(graph.node).index(gemm)
        has_bias = len(gemm.input) > 2 and gemm.input[2]
        product = fresh_name(f"{gemm.output[0]}_matmul", taken) if has_bias else gemm.output[0]
        new = [helper.make_node("MatMul", [gemm.input[0], gemm.input[1]], [product], name=f"{gemm.name}_matmul")]
        if has_bias:
            new.append(helper.make_node("Add", [product, gemm.input[2]], [gemm.output[0]], name=f"{gemm.name}_bias"))
        graph.node.remove(gemm)
        for offset, node in enumerate(new):
            graph.node.insert(position + offset, node)
        renamed[product] = gemm.output[0]
    return renamed


def quantize_bias(node, graph, inits: dict) -> None:
    """Store an integer Conv's / Gemm's float bias as int32 at scale s_x·s_w behind DequantizeLinear (in place)."""
    from onnx import helper, numpy_helper

    if len(node.input) < 3 or node.input[2] not in inits:
        return
    producers = {o: n for n in graph.node for o in n.output}
    x_dq, weight_dq = producers.get(node.input[0]), producers[node.input[1]]
    if x_dq is None or x_dq.op_type != "DequantizeLinear":
        return
    x_scale = float(numpy_helper.to_array(inits[x_dq.input[1]]))
    w_scale = numpy_helper.to_array(inits[weight_dq.input[1]]).astype(np.float64)
    bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
    scale = (x_scale * w_scale * np.ones_like(bias)).astype(np.float32)
    q = np.clip(np.rint(bias / scale.astype(np.float64)), -(2 ** 31), 2 ** 31 - 1).astype(np.int32)
    taken = set(inits) | {o for n in graph.node for o in n.output}
    q_name, s_name = fresh_name(f"{node.input[2]}_int32", taken), fresh_name(f"{node.input[2]}_scale", taken)
    out = fresh_name(f"{node.input[2]}_dequantized", taken)
    graph.initializer.extend([numpy_helper.from_array(q, q_name), numpy_helper.from_array(scale, s_name)])
    for name in (q_name, s_name):
        inits[name] = graph.initializer[-1] if name == s_name else graph.initializer[-2]
    dq = helper.make_node("DequantizeLinear", [q_name, s_name], [out], axis=0, name=f"{node.name}_bias_dequantize")
    graph.node.insert(list(graph.node).index(node), dq)
    node.input[2] = out


def matmuls_to_integer(model, integer_outputs: set[str]) -> None:
    """Each integer DQ(x) → MatMul(·, DQ(W)) [→ Add(b)] becomes com.microsoft.MatMulIntegerToFloat (in place).

    onnxruntime would fuse the QDQ form itself, but its MatMul + Add → Gemm fusion runs first and
    leaves a float Gemm; writing the fused op keeps the bias inside the integer kernel.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    taken = set(inits) | set(producers)
    drop, done = [], False
    for mm in [n for n in graph.node if n.op_type == "MatMul" and n.output[0] in integer_outputs]:
        x_dq, w_dq = producers[mm.input[0]], producers[mm.input[1]]
        n_out = inits[w_dq.input[0]].dims[-1]
        out, bias = mm.output[0], []
        after = readers.get(out, [])
        if len(after) == 1 and after[0][0].op_type == "Add":
            add, slot = after[0]
            other = add.input[1 - slot]
            if other in inits and list(inits[other].dims) == [n_out]:
                out, bias = add.output[0], [other]
                drop.append(add)
        w_scale = numpy_helper.to_array(inits[w_dq.input[1]])
        zero = fresh_name(f"{w_dq.input[0]}_zero_point", taken)
        graph.initializer.append(numpy_helper.from_array(np.zeros(w_scale.shape, np.int8), zero))
        fused = helper.make_node("MatMulIntegerToFloat", [x_dq.input[0], w_dq.input[0], x_dq.input[1], w_dq.input[1],
                                                          x_dq.input[2], zero, *bias], [out], domain=_MS_DOMAIN,
                                 name=f"{mm.name}_integer")
        graph.node.insert(list(graph.node).index(mm), fused)
        drop.append(mm)
        done = True
    for node in drop:
        graph.node.remove(node)
    _drop_unread_dequantize(graph)
    if done and not any(o.domain == _MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS_DOMAIN, 1))


def _drop_unread_dequantize(graph) -> None:
    """Remove DequantizeLinear nodes nothing reads any more (in place)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        idle = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] not in read]
        if not idle:
            return
        for node in idle:
            graph.node.remove(node)
