"""Auto's per-layer fallback: the matmuls that leave the dynamic kernel's tolerance stay weight-only.

When quantizing every matmul's activations at run time moves the outputs too far (a transformer
whose feed-forward outputs carry outlier features, as MiniLM's do), the others can still run
as integer GEMMs. Each matmul's input is measured on the check batch in onnxruntime: the error
one per-tensor uint8 rounding (what DynamicQuantizeLinear does) makes of it ranks the layers;
the fewest of the worst stay weight-only for the file to pass the check (at most half of them;
doubling, then bisection).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["rank_by_activation_rounding", "fewest_kept"]


def rank_by_activation_rounding(weight_only: Path, feeds: dict) -> list[str]:
    """Matmul output names of `weight_only`'s int8 matmuls, worst activation rounding first (pure).

    Args:
        weight_only: a weight-only int8 file (DequantizeLinear → MatMul): the matmuls to rank.
        feeds: onnxruntime inputs of the check batch.
    """
    import onnx
    import onnxruntime as ort

    from .kernels.dynamic_int8 import dynamic_sites

    proto = onnx.load(str(weight_only))
    sites = dynamic_sites(proto)
    inputs = list(dict.fromkeys(x for x, _ in sites))
    known = {o.name for o in proto.graph.output}
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, None)
                              for x in inputs if x not in known)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    error = {x: _rounding_error(np.asarray(values[x], dtype=np.float64)) for x in inputs}
    return [out for x, out in sorted(sites, key=lambda site: -error[site[0]])]


def _rounding_error(x: np.ndarray) -> float:
    """‖x − deq(q(x))‖ / ‖x‖ for one per-tensor asymmetric uint8 rounding that keeps 0 exact (pure)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = max((hi - lo) / 255.0, 1e-12)
    zero = np.clip(np.round(-lo / scale), 0, 255)
    rounded = (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale
    return float(np.linalg.norm(x - rounded) / max(np.linalg.norm(x), 1e-12))


def fewest_kept(ranked: list[str], passes: Callable[[frozenset], bool]) -> frozenset | None:
    """The shortest prefix of `ranked` (at most half of it) with which the file passes, or None.

    Doubling finds a passing size k (1, 2, 4, …), bisection the smallest between k/2 and k
    (assuming that keeping more of the worst layers never hurts); each probe calls `passes` once.
    """
    limit, k = len(ranked) // 2, 1
    while k <= limit and not passes(frozenset(ranked[:k])):
        k *= 2
    if k > limit:  # the last probe is half of them
        if not limit or k // 2 >= limit or not passes(frozenset(ranked[:limit])):
            return None
        k = limit
    lo, hi = k // 2 if k & (k - 1) == 0 else 2 ** (k.bit_length() - 1), k  # lo fails (or is 0), hi passes
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if passes(frozenset(ranked[:mid])) else (mid, hi)
    return frozenset(ranked[:hi])
