"""A grouped quantized layer's dequantization as one blocked DequantizeLinear (opset 21).

A Linear quantized with `--group-size g` (methods/group_scales.py) holds integers (out, in) and
scales (out, in/g). PyTorch dequantizes them per channel over the (out·in/g, g) rows, so the
exporter writes, at its opset 18:

    [Reshape](Q) → DequantizeLinear(·, [Reshape](S), axis=0) → Reshape(out, in)

(a Reshape of an initializer is folded into it only below the exporter's size limit). onnxruntime
runs that as it is. From opset 21 DequantizeLinear takes the scales per block of an axis
(`block_size`), so the three nodes become one on the (out, in) integers and (out, in/g) scales:
the form onnxruntime fuses into MatMulNBits, that `_fold_transposes` can transpose, and that
the MatMulNBits kernel packs with its real per-block scales. The values are unchanged.

An asymmetric grouped layer (`QuantConfig(asymmetric=True)`) also holds zero points (out, in/g),
of the integers' type, as the DequantizeLinear's third input (over the same rows as the scales):
they become the blocked node's zero point (out, in/g), so w = (q − z)·s stays exact.
"""

from __future__ import annotations

from .proto import attribute, consumers, fresh_name

__all__ = ["block_grouped_dequantize"]


def block_grouped_dequantize(graph) -> int:
    """Rewrite every grouped dequantization of an onnx GraphProto into a blocked DequantizeLinear (in place).

    Needs opset ≥ 21 (the caller checks). Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    taken = set(inits) | set(producers) | {n.name for n in graph.node}
    done, drop = 0, []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear"]:
        site = _grouped_site(dq, inits, producers, readers, outputs)
        if site is None:
            continue
        q, scale, zero, reshape, replaced = site
        groups = scale.size // q.shape[0]
        per_row = (q.shape[0], groups) if groups > 1 else (q.shape[0],)  # per-axis takes 1-D scales
        names = [fresh_name(f"{reshape.output[0]}_{part}", taken) for part in ("quantized", "scale", "zero_point")]
        graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale.reshape(per_row), names[1])])
        if zero is not None:
            graph.initializer.append(numpy_helper.from_array(zero.reshape(per_row), names[2]))
        blocked = {"axis": 1, "block_size": q.shape[1] // groups} if groups > 1 else {"axis": 0}
        node = helper.make_node("DequantizeLinear", names[:2 if zero is None else 3], [reshape.output[0]],
                                name=fresh_name(f"{reshape.output[0]}_dequantize", taken), **blocked)
        graph.node.insert(list(graph.node).index(dq), node)  # it reads initializers only: any place is topological
        drop.extend(replaced)
        done += 1
    for node in drop:
        graph.node.remove(node)
    if done:
        read = {name for node in graph.node for name in node.input} | outputs
        kept = [i for i in graph.initializer if i.name in read]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return done


def _grouped_site(dq, inits: dict, producers: dict, readers: dict, outputs: set):
    """(integers (out, in), flat scales (out·groups,), flat zero points or None, the closing Reshape, the nodes replaced) or None."""
    if attribute(dq, "axis", 1) != 0 or attribute(dq, "block_size", 0):
        return None
    after = readers.get(dq.output[0], [])
    if len(after) != 1 or after[0][0].op_type != "Reshape" or dq.output[0] in outputs:
        return None
    reshape = after[0][0]
    rows, scale = _constant(dq.input[0], inits, producers, readers), _constant(dq.input[1], inits, producers, readers)
    shape = inits.get(reshape.input[1])
    if rows is None or scale is None or shape is None:
        return None
    from onnx import numpy_helper

    zero, zero_chain = None, []
    if len(dq.input) > 2 and dq.input[2]:
        found = _constant(dq.input[2], inits, producers, readers)
        if found is None:
            return None
        zero, zero_chain = found
    shape = numpy_helper.to_array(shape)
    (rows, rows_chain), (scale, scale_chain) = rows, scale
    if rows.ndim != 2 or scale.ndim != 1 or scale.size != rows.shape[0] or shape.size != 2 or (shape <= 0).any():
        return None
    if zero is not None and (zero.shape != scale.shape or zero.dtype != rows.dtype):
        return None  # a zero point per tensor (or of another type): not a grouped layer's
    out, inputs = (int(d) for d in shape)
    if out * inputs != rows.size or scale.size % out or (scale.size // out) * rows.shape[1] != inputs:
        return None  # the rows are not consecutive groups of the output rows
    return rows.reshape(out, inputs), scale, zero, reshape, [*rows_chain, *scale_chain, *zero_chain, dq, reshape]


def _constant(name: str, inits: dict, producers: dict, readers: dict):
    """(the value of `name` when it is an initializer, or Reshapes and lossless Casts of one read only here; those nodes) or None."""
    from onnx import numpy_helper

    from onnx import helper

    chain = []
    while name not in inits:
        node = producers.get(name)
        if node is None or len(readers.get(name, [])) != 1 or not (
                node.op_type == "Cast" or node.op_type == "Reshape" and node.input[1] in inits):
            return None
        chain.append(node)
        name = node.input[0]
    value = numpy_helper.to_array(inits[name])
    for node in reversed(chain):
        if node.op_type == "Cast":  # a zero point's int8 → int32 → int8 round trip (quantized_layer.py)
            converted = value.astype(helper.tensor_dtype_to_np_dtype(attribute(node, "to", 0)))
            if not (converted == value).all():
                return None  # a cast that changes the values: not a lossless round trip
            value = converted
            continue
        shape = numpy_helper.to_array(inits[node.input[1]])
        if (shape == 0).any():
            return None  # a copied dimension (allowzero 0) or an empty one: not the exporter's
        value = value.reshape(shape)
    return value, chain
