"""What a vanished quant model recorded about its activations, keyed by the tensor names of its ONNX export.

A `quant --act-bits 8` layer exports its learned input scale as QuantizeLinear → DequantizeLinear
in the graph itself. Its output range (per channel, observed while fine-tuning) has no place in
the graph, so it travels beside it: `export_onnx(scopes=...)` says which module computed each
node, `layer_ops` finds each quantized layer's weight op and last op, and the ranges ride in the
file's metadata (`RANGES_KEY`) until the static kernel reads them (`pop_ranges`).
"""

from __future__ import annotations

import json

from torch import nn

from ..methods.quant import QuantizedLayer

__all__ = ["RANGES_KEY", "quantized_layers", "layer_ops", "observed_ranges", "attach_ranges", "pop_ranges",
           "has_learned_scales"]

RANGES_KEY = "vcon_fx.activation_ranges"
_WEIGHT_OPS = ("Conv", "MatMul", "Gemm")
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    """Module path → every materialized quantized layer of `model` (pure)."""
    return {path: m for path, m in model.named_modules() if isinstance(m, QuantizedLayer)}


def layer_ops(graph, scopes: dict[str, str], paths) -> dict[str, tuple[str, str]]:
    """Layer path → (its weight op's output name, its last op's output name) in `graph` (pure).

    The last op is the weight op, or the bias Add the exporter puts after a MatMul.
    """
    wanted = set(paths)
    found: dict[str, list[str]] = {}
    for node in graph.node:
        if not node.output or node.op_type in _QDQ:
            continue
        path = scopes.get(node.output[0])
        if path not in wanted:
            continue
        ops = found.setdefault(path, ["", ""])
        if node.op_type in _WEIGHT_OPS and not ops[0]:
            ops[0] = node.output[0]
        if ops[0]:
            ops[1] = node.output[0]
    return {path: (first, last) for path, (first, last) in found.items() if first}


def observed_ranges(model: nn.Module, graph, scopes: dict[str, str]) -> dict[str, dict]:
    """Output tensor name → the per-channel range its layer observed while fine-tuning (pure)."""
    layers = {p: m for p, m in quantized_layers(model).items() if getattr(m, "out_observed", None) is not None
              and bool(m.out_observed)}
    ranges = {}
    for path, (_, last) in layer_ops(graph, scopes, layers).items():
        lo, hi = layers[path].out_range.detach().cpu().double()
        ranges[last] = {"lo": lo.tolist(), "hi": hi.tolist(), "source": "observed"}
    return ranges


def has_learned_scales(graph) -> bool:
    """True when some activation (not a weight) is quantized in `graph` (pure)."""
    constants = {i.name for i in graph.initializer}
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in graph.node)


def attach_ranges(model, ranges: dict[str, dict]) -> None:
    """Store `ranges` in the ModelProto's metadata for the static kernel (in place)."""
    pop_ranges(model)
    entry = model.metadata_props.add()
    entry.key, entry.value = RANGES_KEY, json.dumps(ranges)


def pop_ranges(model) -> dict[str, dict]:
    """Remove and return the ranges `attach_ranges` stored (in place; {} when none)."""
    found = {}
    for index in reversed(range(len(model.metadata_props))):
        if model.metadata_props[index].key == RANGES_KEY:
            found = json.loads(model.metadata_props[index].value)
            del model.metadata_props[index]
    return found
