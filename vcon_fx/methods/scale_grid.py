"""Fixed scale grids: rounding to them, and the MSE-optimal clipping search that picks them.

The plain quantized twin recomputes its scales from the weight at every step (max|w|/qmax, or
mean|w| for binary, TWN for ternary). A data-aware or clip-searched twin keeps its scales fixed
from the start (a buffer) and rounds every weight to the nearest point of {−qmax…qmax}·scale
({−1, +1}·scale for binary; {−1, 0, +1}·scale for ternary and 2 bits). The scales are one per
output channel, shape (out,), or one per group of inputs, shape (out, groups)
(group_scales.py): each scale rounds its own row of the weight.

The clip search tries a grid of shrink ratios r of the plain scale, per scale, and keeps the one
with the least error Σ_j m_j·(w_j − Q(w_j))² over the weights it scales. m_j = 1 without
calibration data (the weight error); with it, m_j is column j's input second moment, the diagonal
of XᵀX, so the error is measured where the inputs are. For binary weights the optimum has a
closed form, scale = Σ m_j|w_j| / Σ m_j.
"""

from __future__ import annotations

import torch

from .group_scales import scale_rows
from .zero_point import signed_range

__all__ = ["grid_integers", "grid_round", "fixed_fake_quantize", "clip_search_scales", "CLIP_RATIOS"]

# r = 1 is the plain scale: the search is never worse than it on its own objective. Shrinking helps
# integer grids (outliers clipped, finer steps for the rest); ternary may also want a larger scale.
CLIP_RATIOS = tuple(round(1.0 - 0.02 * k, 2) for k in range(36))  # 1.00 … 0.30
_TERNARY_RATIOS = tuple(round(0.5 + 0.025 * k, 3) for k in range(41))  # 0.50 … 1.50


def _qmax(bits: int | str) -> int:
    return 2 ** (int(bits) - 1) - 1 if isinstance(bits, int) and bits > 1 else 1


def grid_integers(weight: torch.Tensor, scale: torch.Tensor, bits: int | str,
                  zero: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest grid integers of `weight` for `scale` (out,) or (out, groups) (floats, `weight`'s shape) (pure).

    With `zero` (scale's shape) the grid is asymmetric (zero_point.py): q ∈ [−2^(b−1), 2^(b−1) − 1].
    """
    w = weight.detach()
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    rows = scale_rows(w, scale) / scale.to(w.dtype).reshape(-1, 1)
    if zero is None:
        low, high = -_qmax(bits), _qmax(bits)
    else:
        (low, high), rows = signed_range(bits), rows + zero.to(w.dtype).reshape(-1, 1)
    return torch.clamp(torch.round(rows), low, high).reshape(w.shape)


def grid_round(weight: torch.Tensor, scale: torch.Tensor, bits: int | str,
               zero: torch.Tensor | None = None) -> torch.Tensor:
    """The nearest grid point of every weight, (q − zero)·scale (pure)."""
    q = scale_rows(grid_integers(weight, scale, bits, zero), scale)
    if zero is not None:
        q = q - zero.to(weight.dtype).reshape(-1, 1)
    return (q * scale.to(weight.dtype).reshape(-1, 1)).reshape(weight.shape)


def fixed_fake_quantize(weight: torch.Tensor, scale: torch.Tensor, bits: int | str,
                        zero: torch.Tensor | None = None) -> torch.Tensor:
    """(q − zero)·scale on the fixed grid in the forward, identity gradient to `weight` (straight-through estimator)."""
    return grid_round(weight, scale, bits, zero).detach() + (weight - weight.detach())


@torch.no_grad()
def clip_search_scales(weight: torch.Tensor, plain_scale: torch.Tensor, bits: int | str,
                       importance: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> torch.Tensor:
    """Scales minimizing Σ_j m_j·(w_j − Q(w_j))² over shrink ratios of `plain_scale`, each over its own weights (pure).

    Args:
        weight: (out, …) float weight.
        plain_scale: (out,) or (out, groups): the method's own scales (`quantize_weight`'s).
        bits: 8, 4, 2, 1 or "ternary".
        importance: m_j per weight column (shape of one output row, or flat), or None for m = 1.
        zero: an asymmetric grid's zero points (zero_point.py), kept: shrinking [min, max] by r
            shrinks the scale by r and leaves −min/scale, so the zero point, where it was.

    Returns:
        scales of `plain_scale`'s shape, float32.
    """
    out = weight.shape[0]
    w = weight.detach().reshape(out, plain_scale[0].numel(), -1).float()  # (out, groups, weights per scale)
    m = torch.ones(w[0].numel(), device=w.device) if importance is None else importance.reshape(-1).float().to(w.device)
    m = (m / m.mean().clamp_min(1e-30)).reshape(w.shape[1:])
    plain = plain_scale.detach().float().to(w.device).reshape(out, -1)
    if bits == 1:
        best = (w.abs() * m).sum(-1) / m.sum(-1).clamp_min(1e-30)
        return torch.where(best > 0, best, plain).reshape(plain_scale.shape)
    ratios = _TERNARY_RATIOS if bits == "ternary" else CLIP_RATIOS
    best, best_error = plain.clone(), torch.full_like(plain, float("inf"))
    for ratio in ratios:
        scale = plain * ratio
        error = ((w - grid_round(w, scale, bits, zero)).pow(2) * m).sum(-1)
        better = error < best_error
        best = torch.where(better, scale, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(plain_scale.shape)
