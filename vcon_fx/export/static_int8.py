"""Static int8: rewrite an integer-weight ONNX graph into the QDQ pattern onnxruntime fuses into integer kernels.

The steps, in order, on a ModelProto whose weights are INT8 + DequantizeLinear (`weight_only.py`):
1. ReduceMean over H, W (keepdims) becomes GlobalAveragePool, which has an integer kernel.
2. Batch norms are folded into the convolutions before them (`bn_fold.py`).
3. Every activation gets its uint8 scale if one is known (`act_ranges.py`): learned
   QuantizeLinear → DequantizeLinear pairs are lifted off the graph into a table, observed or
   calibrated ranges join it, and ops that keep or bound their range carry it on.
4. A ReLU (or ReLU6) whose output is quantized with zero point 0 is absorbed: quantizing its
   input with the same scale gives the same integers, so the convolution or add before it
   writes uint8 directly (onnxruntime then has no float op between two integer kernels).
5. Each op with an integer kernel whose inputs and output all have a scale is marked integer;
   every activation an integer op reads or writes (and every learned one) gets one
   QuantizeLinear → DequantizeLinear, shared by all its readers.
6. Biases of integer Conv / Gemm become int32 at scale s_x·s_w, as onnxruntime's fusion requires.

onnxruntime's graph optimizations then fuse DQ → Conv → Q into QLinearConv, DQ → MatMul into
MatMulIntegerToFloat, DQ → Add → Q into QLinearAdd, and so on; MaxPool and reshapes run on
uint8 between them. `islands.py` counts what stays float between integer kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .act_ranges import KEEP_SCALE_OPS, QParams, carry_backward, derive_forward, qparams_for, strip_learned
from .bn_fold import ChannelAffine, fold_batch_norms
from .proto import attribute, consumers, fresh_name
from .static_rewrites import gemm_to_matmul, is_int8_weight, matmuls_to_integer, quantize_bias, reduce_mean_to_global_pool

__all__ = ["to_static_int8", "StaticResult", "WEIGHT_OPS"]

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
_UNARY = ("GlobalAveragePool", "AveragePool", "Sigmoid", "LeakyRelu", "Softmax")
_BINARY = ("Add", "Mul")


@dataclass
class StaticResult:
    """What `to_static_int8` did: layers (by their op's output name) run integer, or why not."""

    integer: list[str] = field(default_factory=list)  # weight op outputs as the exporter named them
    not_integer: dict[str, str] = field(default_factory=dict)
    quantized_tensors: int = 0
    relus_absorbed: int = 0
    batch_norms_folded: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # scale source → tensors quantized with it


def to_static_int8(model, ranges: dict | None = None) -> StaticResult:
    """Rewrite `model` into fusable QDQ with the scales it carries and `ranges` gives (in place).

    Args:
        model: an onnx ModelProto with INT8 weights behind DequantizeLinear.
        ranges: tensor name → {"lo", "hi", "source"}: per-channel lists (a layer's observed output,
            mapped through a folded batch norm) or numbers (calibrated), for tensors the graph
            carries no learned scale for.

    Returns:
        A StaticResult.
    """
    import onnx

    graph = model.graph
    ranks = _ranks(model)
    reduce_mean_to_global_pool(graph, ranks)
    original = gemm_to_matmul(graph)  # new output name → the exporter's
    folds = fold_batch_norms(model)
    original.update({f.new_name: f.old_name for f in folds})
    inits = {i.name: i for i in graph.initializer}
    table = strip_learned(graph, inits)
    _add_ranges(table, ranges or {}, folds)
    carry_backward(graph, table)
    derive_forward(graph, inits, table)
    forced, absorbed = _absorb_relus(graph, inits, table)
    carry_backward(graph, table)
    integer, not_integer = _integer_nodes(graph, inits, table)
    integer_outputs = {n.output[0] for n in integer}
    placed = _place(graph, inits, table, integer, forced)  # rebuilds graph.node: the node objects change
    inits = {i.name: i for i in graph.initializer}
    for node in [n for n in graph.node if n.output and n.output[0] in integer_outputs]:
        if node.op_type == "Conv":
            quantize_bias(node, graph, inits)
    matmuls_to_integer(model, integer_outputs)
    _drop_unused_initializers(graph)
    del graph.value_info[:]  # shapes of rewritten tensors changed; onnxruntime infers them again
    if model.ByteSize() < (1 << 30):  # the checker refuses larger protos
        onnx.checker.check_model(model)
    sources: dict[str, int] = {}
    for name in placed:
        sources[table[name].source] = sources.get(table[name].source, 0) + 1
    return StaticResult(
        integer=[original.get(n.output[0], n.output[0]) for n in integer if n.op_type in WEIGHT_OPS],
        not_integer={original.get(k, k): why for k, why in not_integer.items()}, quantized_tensors=len(placed),
        relus_absorbed=absorbed, batch_norms_folded=len(folds), sources=sources,
    )


def _ranks(model) -> dict[str, int]:
    """Tensor name → rank, from onnx shape inference (empty where it cannot tell)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort: a rank we do not know only skips a rewrite
        return {}
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    return {v.name: len(v.type.tensor_type.shape.dim) for v in values if v.type.tensor_type.HasField("shape")}


def _add_ranges(table: dict[str, QParams], ranges: dict, folds: list[ChannelAffine]) -> None:
    """Observed (per channel, mapped through folded batch norms) and calibrated ranges join `table` (in place)."""
    by_old = {f.old_name: f for f in folds}
    for name, entry in ranges.items():
        lo, hi = np.asarray(entry["lo"], np.float64), np.asarray(entry["hi"], np.float64)
        if name in by_old:
            fold = by_old[name]
            if lo.ndim == 1 and lo.shape == fold.k.shape:
                lo, hi = fold.map_range(lo, hi)
            name = fold.new_name
        params = qparams_for(lo.min(), hi.max(), entry.get("source", "observed"))
        if name not in table or table[name].rank() < params.rank():
            table[name] = params


def _absorb_relus(graph, inits: dict, table: dict[str, QParams]) -> tuple[set[str], int]:
    """Drop each ReLU / ReLU6 that uint8 quantization at zero point 0 implies (in place); (tensors that must stay quantized, count)."""
    from onnx import numpy_helper

    readers, outputs = consumers(graph), {o.name for o in graph.output}
    producers = {o: n for n in graph.node for o in n.output}
    forced, absorbed = set(), 0
    for node in list(graph.node):
        if node.op_type not in ("Relu", "Clip"):
            continue
        x, y = node.input[0], node.output[0]
        params = table.get(y)
        if params is None or params.zero_point != 0 or y in outputs or x in outputs or x not in producers:
            continue
        if len(readers.get(x, [])) != 1:
            continue
        if params.source != "learned" and not any(_may_run_integer(r, producers, inits) for r, _ in readers.get(y, [])):
            continue  # nothing integer reads it: quantizing here would only add rounding
        if node.op_type == "Clip":
            bounds = [numpy_helper.to_array(inits[n]).item() if n in inits else None for n in node.input[1:3]]
            if len(bounds) < 2 or bounds[0] != 0 or bounds[1] is None or 255 * params.scale > bounds[1] * (1 + 1e-6):
                continue
        table[x] = params
        table.pop(y)
        for reader, slot in readers.get(y, []):
            reader.input[slot] = x
        graph.node.remove(node)
        forced.add(x)
        absorbed += 1
    return forced, absorbed


def _may_run_integer(node, producers: dict, inits: dict) -> bool:
    """Whether `node` is of a kind that can get an integer kernel (its scales not yet known) (pure)."""
    if node.op_type in WEIGHT_OPS:
        return len(node.input) > 1 and is_int8_weight(node.input[1], producers, inits)
    return node.op_type in _BINARY + _UNARY + KEEP_SCALE_OPS + ("Concat",)


def _integer_nodes(graph, inits: dict, table: dict[str, QParams]):
    """(nodes that get integer kernels, weight op output → why it stays float) (pure)."""
    producers = {o: n for n in graph.node for o in n.output}
    integer, not_integer, passing = [], {}, []

    def scaled(name):
        return name in table and name not in inits

    for node in graph.node:
        op = node.op_type
        if op in WEIGHT_OPS:
            why = _why_not_integer(node, producers, inits, scaled)
            if why:
                if is_int8_weight(node.input[1], producers, inits):
                    not_integer[node.output[0]] = why
                continue
        elif op in _BINARY or op == "Concat" or op in _UNARY:
            if not all(scaled(n) for n in node.input if n) or not scaled(node.output[0]):
                continue
        elif op in KEEP_SCALE_OPS:
            src, out = node.input[0], node.output[0]
            if scaled(src) and scaled(out) and table[src].same_grid(table[out]):
                passing.append(node)
            continue
        else:
            continue
        integer.append(node)
    return _with_passing(graph, integer, passing), not_integer


def _with_passing(graph, integer: list, passing: list) -> list:
    """Add the scale-keeping ops (reshapes, max pool) that touch an integer op, directly or through others (pure).

    Alone they would only add quantization where PyTorch has none (a reshape between float ops).
    """
    readers = consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    chosen = {id(n) for n in integer}
    changed = True
    while changed:
        changed = False
        for node in passing:
            if id(node) in chosen:
                continue
            before = producers.get(node.input[0])
            if (before is not None and id(before) in chosen) or any(id(r) in chosen for r, _ in readers.get(node.output[0], [])):
                chosen.add(id(node))
                changed = True
    return [n for n in graph.node if id(n) in chosen]


def _why_not_integer(node, producers, inits, scaled) -> str | None:
    if not is_int8_weight(node.input[1], producers, inits):
        return "no INT8 weight"
    if not scaled(node.input[0]):
        return "its input has no activation scale"
    if node.op_type == "Conv" and not scaled(node.output[0]):
        return "its output has no activation scale"
    if node.op_type == "Gemm" and (attribute(node, "transA", 0) or attribute(node, "alpha", 1.0) != 1.0
                                   or attribute(node, "beta", 1.0) != 1.0):
        return "a Gemm with transA, alpha or beta"
    return None


def _place(graph, inits: dict, table: dict[str, QParams], integer: list, forced: set[str]) -> list[str]:
    """Insert one QuantizeLinear → DequantizeLinear per activation that needs it (in place); the tensors quantized."""
    from onnx import TensorProto, helper

    readers = consumers(graph)
    producer_of = {o: n for n in graph.node for o in n.output}
    is_integer = {id(n) for n in integer}
    outputs = {o.name for o in graph.output}
    wanted = []
    for name, params in table.items():
        if name in inits or name in outputs or (name not in producer_of and name not in {i.name for i in graph.input}):
            continue
        made_by_integer = name in producer_of and id(producer_of[name]) in is_integer
        read_by_integer = any(id(n) in is_integer for n, _ in readers.get(name, []))
        if params.source == "learned" or name in forced or made_by_integer or read_by_integer:
            wanted.append(name)
    taken = set(inits) | {o for n in graph.node for o in n.output} | {i.name for i in graph.input}
    after: dict[str, list] = {}
    for name in wanted:
        params = table[name]
        scale, zero = fresh_name(f"{name}_scale", taken), fresh_name(f"{name}_zero_point", taken)
        graph.initializer.extend([helper.make_tensor(scale, TensorProto.FLOAT, [], [params.scale]),
                                  helper.make_tensor(zero, TensorProto.UINT8, [], [params.zero_point])])
        q_out, dq_out = fresh_name(f"{name}_quantized", taken), fresh_name(f"{name}_dequantized", taken)
        for reader, slot in readers.get(name, []):
            reader.input[slot] = dq_out
        after[name] = [helper.make_node("QuantizeLinear", [name, scale, zero], [q_out], name=f"{name}_quantize"),
                       helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out], name=f"{name}_dequantize")]
    nodes = [n for i in graph.input for n in after.get(i.name, [])]
    for node in graph.node:
        nodes.append(node)
        for out in node.output:
            nodes.extend(after.get(out, []))
    del graph.node[:]
    graph.node.extend(nodes)
    return wanted


def _drop_unused_initializers(graph) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
