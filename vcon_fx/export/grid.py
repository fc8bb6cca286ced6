"""Find the per-channel symmetric integer grid that a float weight lies on.

Weights trained with fake quantization (or rounded by any per-channel symmetric scheme) are
floats that lie exactly on a grid: for every output channel c there is a scale s_c with
w / s_c integer and |w / s_c| ≤ qmax. `find_grid` finds the smallest such qmax (s_c =
max|w_c| / qmax, within 1e-4 of an integer); binary and ternary weights are ±1/0 integers with
the channel scale.
"""

from __future__ import annotations

import numpy as np

__all__ = ["find_grid", "grid_axes", "QMAX_CANDIDATES", "GRID_TOL"]

# qmax = 2^(b−1) − 1 for b = 2…8; 1 also covers binary (±1) and ternary (−1, 0, +1).
QMAX_CANDIDATES = (1, 3, 7, 15, 31, 63, 127)
GRID_TOL = 1e-4


def find_grid(weight: np.ndarray, axis: int, *, max_qmax: int = 127, tol: float = GRID_TOL):
    """(q int8, scale float32 per slice along `axis`, qmax) when `weight` lies on a grid, else None (pure).

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


def grid_axes(init, uses) -> list[int]:
    """The axes to try a grid along: the output-channel axis first (by the consumer), then the other ends (pure).

    Args:
        init: the weight's TensorProto.
        uses: its (node, input slot) readers.
    """
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
