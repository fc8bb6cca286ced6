"""Fold each BatchNormalization into the Conv before it, in an ONNX graph, before static quantization.

An integer convolution (QLinearConv) has no batch norm after it, and onnxruntime folds a batch
norm only into a convolution whose weight is a constant float. Here both kinds are folded:

    BN(Conv(x, W, b)) = Conv(x, W·k, b·k + c)   with k = γ / √(σ² + ε), c = β − μ·k per channel

A weight stored as integers (DequantizeLinear(q, s), per output channel, zero point 0) keeps its
integers: s·|k| is the new scale and a channel with k < 0 flips the sign of its integers, which a
symmetric grid allows. The fold is exact up to float rounding of the scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .proto import attribute, consumers

__all__ = ["fold_batch_norms", "ChannelAffine"]


@dataclass(frozen=True)
class ChannelAffine:
    """What a fold did to one convolution's output: new = k·old + c per channel (old → new name)."""

    old_name: str
    new_name: str
    k: np.ndarray
    c: np.ndarray

    def map_range(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel [lo, hi] of the old output → per-channel range of the new one (pure)."""
        a, b = self.k * lo + self.c, self.k * hi + self.c
        return np.minimum(a, b), np.maximum(a, b)


def fold_batch_norms(model) -> list[ChannelAffine]:
    """Fold every BatchNormalization that alone reads a Conv's output into that Conv (in place on `model`).

    Returns:
        One ChannelAffine per fold, so that ranges observed on the convolution's output can follow.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers = consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    folded, drop = [], []
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or attribute(bn, "training_mode", 0):
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(readers.get(conv.output[0], [])) != 1:
            continue
        if conv.output[0] in outputs or not all(name in inits for name in bn.input[1:5]):
            continue
        k, c = _bn_affine(bn, inits)
        if not _fold_weight(conv, k, graph, inits, producers, readers):
            continue
        _fold_bias(conv, k, c, graph, inits)
        folded.append(ChannelAffine(conv.output[0], bn.output[0], k, c))
        conv.output[0] = bn.output[0]
        drop.append(bn)
    for node in drop:
        graph.node.remove(node)
    return folded


def _array(init) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init)


def _set(init, value: np.ndarray) -> None:
    from onnx import numpy_helper

    init.CopyFrom(numpy_helper.from_array(value.astype(_array(init).dtype), init.name))


def _bn_affine(bn, inits) -> tuple[np.ndarray, np.ndarray]:
    gamma, beta, mean, var = (_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
    k = gamma / np.sqrt(var + attribute(bn, "epsilon", 1e-5))
    return k, beta - mean * k


def _fold_weight(conv, k, graph, inits, producers, readers) -> bool:
    """Scale the convolution's weight per output channel; False when its form is not one we fold."""
    name = conv.input[1]
    if name in inits:  # a float weight
        if len(readers.get(name, [])) != 1:
            return False
        w = _array(inits[name])
        _set(inits[name], w * k.reshape(-1, *([1] * (w.ndim - 1))))
        return True
    dq = producers.get(name)
    if (dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits
            or attribute(dq, "axis", 1) != 0 or len(readers.get(name, [])) != 1):
        return False
    if len(dq.input) > 2 and dq.input[2] and _array(inits[dq.input[2]]).any():
        return False  # asymmetric integers cannot flip sign
    q, scale = _array(inits[dq.input[0]]), _array(inits[dq.input[1]])
    if scale.ndim != 1 or len(readers.get(dq.input[0], [])) != 1 or len(readers.get(dq.input[1], [])) != 1:
        return False
    sign = np.where(k < 0, -1, 1).astype(q.dtype)
    dead = k == 0  # γ = 0: the channel outputs its bias alone
    q = np.where(dead.reshape(-1, *([1] * (q.ndim - 1))), 0, q * sign.reshape(-1, *([1] * (q.ndim - 1))))
    _set(inits[dq.input[0]], q)
    _set(inits[dq.input[1]], np.where(dead, scale, scale * np.abs(k)))
    return True


def _fold_bias(conv, k, c, graph, inits) -> None:
    from onnx import numpy_helper

    from .proto import fresh_name

    if len(conv.input) > 2 and conv.input[2] in inits:
        bias = _array(inits[conv.input[2]]).astype(np.float64)
        _set(inits[conv.input[2]], bias * k + c)
        return
    taken = set(inits) | {o for n in graph.node for o in n.output}
    name = fresh_name(f"{conv.output[0]}_folded_bias", taken)
    graph.initializer.append(numpy_helper.from_array(c.astype(np.float32), name))
    inits[name] = graph.initializer[-1]
    while len(conv.input) < 3:
        conv.input.append("")
    conv.input[2] = name
