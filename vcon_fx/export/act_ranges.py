"""Activation quantization parameters for a static int8 graph: where each tensor's uint8 scale comes from.

Sources, strongest first:
- "learned": the QuantizeLinear → DequantizeLinear pairs a vanished `quant --act-bits 8` model
  exports in front of each quantized layer (the EMA range of the fine-tuning).
- "observed": the per-channel output range each quantized layer recorded while fine-tuning,
  mapped through a folded batch norm (`bn_fold.py`).
- "calibrated": min / max over calibration batches (`calibrate_onnx.py`).
- "derived": carried through ops whose output range follows from their inputs' (ReLU, pooling,
  reshapes, sigmoid, hard-swish, add, mul, concat), or through ops that keep the scale.

Pure functions over ModelProto graphs, except `strip_learned`, which removes the pairs it reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .proto import attribute, consumers

__all__ = ["QParams", "qparams_for", "strip_learned", "carry_backward", "derive_forward", "SOURCES",
           "KEEP_SCALE_OPS"]

SOURCES = ("derived", "calibrated", "observed", "learned")  # weakest → strongest
QMIN, QMAX = 0, 255  # uint8 activations: onnxruntime's x86 guidance (u8 activations, s8 weights)
# Ops whose output takes the input's scale unchanged (onnxruntime drops their Q/DQ when equal).
KEEP_SCALE_OPS = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")
_SAME_RANGE_OPS = KEEP_SCALE_OPS + ("GlobalAveragePool", "AveragePool", "ReduceMean", "Dropout")
_MONOTONE = {
    "Sigmoid": lambda v: 1.0 / (1.0 + np.exp(-v)),
    "Tanh": np.tanh,
    "Relu": lambda v: np.maximum(v, 0.0),
}


@dataclass(frozen=True)
class QParams:
    """One tensor's uint8 quantization: value = (q − zero_point)·scale."""

    scale: float
    zero_point: int
    source: str

    @property
    def range(self) -> tuple[float, float]:
        return (QMIN - self.zero_point) * self.scale, (QMAX - self.zero_point) * self.scale

    def same_grid(self, other: "QParams") -> bool:
        return (self.scale, self.zero_point) == (other.scale, other.zero_point)

    def rank(self) -> int:
        return SOURCES.index(self.source)


def qparams_for(lo: float, hi: float, source: str) -> QParams:
    """uint8 scale and zero point of a range widened to contain 0 (the rule the PyTorch twin uses) (pure)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    scale = max((hi - lo) / (QMAX - QMIN), 1e-8)
    zero_point = int(min(max(round(-lo / scale), QMIN), QMAX))
    return QParams(float(np.float32(scale)), zero_point, source)


def strip_learned(graph, inits: dict) -> dict[str, QParams]:
    """Remove activation QuantizeLinear → DequantizeLinear pairs; return what they quantized (in place on `graph`).

    One tensor quantized by several pairs (two layers read it) gets one range that covers each.
    """
    from onnx import numpy_helper

    readers = consumers(graph)
    outputs = {o.name for o in graph.output}
    found: dict[str, list[QParams]] = {}
    rewire: dict[str, str] = {}
    drop = []
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in inits or len(q.input) < 3 or q.input[1] not in inits:
            continue
        zp_init = inits.get(q.input[2])
        dqs = [n for n, _ in readers.get(q.output[0], [])]
        if (zp_init is None or zp_init.data_type != 2 or not dqs  # 2 = UINT8
                or any(n.op_type != "DequantizeLinear" or n.output[0] in outputs for n in dqs)):
            continue
        scale = float(numpy_helper.to_array(inits[q.input[1]]))
        zero = int(numpy_helper.to_array(zp_init))
        found.setdefault(q.input[0], []).append(QParams(scale, zero, "learned"))
        drop.append(q)
        for dq in dqs:
            rewire[dq.output[0]] = q.input[0]
            drop.append(dq)
    for node in drop:
        graph.node.remove(node)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rewire:
                node.input[i] = rewire[name]
    return {t: _merge(params) for t, params in found.items()}


def _merge(params: list[QParams]) -> QParams:
    if len(set(params)) == 1:
        return params[0]
    return qparams_for(min(p.range[0] for p in params), max(p.range[1] for p in params), "learned")


def carry_backward(graph, table: dict[str, QParams]) -> None:
    """An op that keeps the scale gives its input its output's scale when that is stronger (in place on `table`)."""
    for node in reversed(list(graph.node)):
        if node.op_type not in KEEP_SCALE_OPS or node.output[0] not in table:
            continue
        out, src = table[node.output[0]], node.input[0]
        if src not in table or table[src].rank() < out.rank():
            table[src] = out


def derive_forward(graph, inits: dict, table: dict[str, QParams]) -> None:
    """Give each unquantized op output the range its inputs imply, in graph order (in place on `table`)."""
    for node in graph.node:
        if not node.output or node.output[0] in table:
            continue
        ranges = [_range_of(name, inits, table) for name in node.input]
        found = _implied(node, ranges, inits)
        if found is not None and np.all(np.isfinite(found)):
            table[node.output[0]] = qparams_for(*found, "derived")


def _range_of(name: str, inits: dict, table: dict[str, QParams]):
    from onnx import numpy_helper

    if name in table:
        return table[name].range
    if name in inits and inits[name].data_type in (1, 10):  # FLOAT, FLOAT16 constants
        value = numpy_helper.to_array(inits[name])
        return (float(value.min()), float(value.max())) if value.size else None
    return None


def _implied(node, ranges: list, inits: dict):
    """(lo, hi) of the output of `node` given its inputs' ranges, or None when it does not follow (pure)."""
    op = node.op_type
    first = ranges[0] if ranges else None
    if op in _SAME_RANGE_OPS:
        return first
    if first is None:
        return None
    if op in _MONOTONE:
        return tuple(float(_MONOTONE[op](np.float64(v))) for v in first)
    if op == "HardSigmoid":
        alpha, beta = attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
        return tuple(float(np.clip(alpha * v + beta, 0, 1)) for v in first)
    if op == "HardSwish":
        return _hard_swish_range(*first)
    if op == "Clip":
        return _clip_range(node, first, inits)
    if op == "Concat":
        return None if any(r is None for r in ranges) else (min(r[0] for r in ranges), max(r[1] for r in ranges))
    if op in ("Add", "Mul", "Sub") and len(ranges) == 2 and ranges[1] is not None:
        (a, b), (c, d) = first, ranges[1]
        if op == "Add":
            return a + c, b + d
        if op == "Sub":
            return a - d, b - c
        products = (a * c, a * d, b * c, b * d)
        return min(products), max(products)
    return None


def _hard_swish_range(lo: float, hi: float) -> tuple[float, float]:
    def f(v):
        return v * min(max(v + 3.0, 0.0), 6.0) / 6.0

    values = [f(lo), f(hi)] + ([f(-1.5)] if lo <= -1.5 <= hi else [])
    return min(values), max(values)


def _clip_range(node, first, inits):
    from onnx import numpy_helper

    bounds = [float(numpy_helper.to_array(inits[name])) if name and name in inits else None for name in node.input[1:3]]
    bounds += [None] * (2 - len(bounds))
    low, high = bounds
    return (first[0] if low is None else min(max(first[0], low), high if high is not None else np.inf),
            first[1] if high is None else max(min(first[1], high), low if low is not None else -np.inf))
