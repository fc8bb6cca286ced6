"""Asymmetric grids: a zero point beside each group's scale, so the integers span the group's own range.

A symmetric grid {−qmax…qmax}·s is centred on 0: a group whose weights run from −0.2 to +0.9
spends almost half its levels on values it never takes, and at 4 bits it has 15 levels, not 16.
An asymmetric grid stretches all 2^b levels over [min, max] of the group (widened to contain 0,
so a zero weight stays exactly 0):

    s = (max − min) / (2^b − 1),   z = round(−min / s) − 2^(b−1),   w ≈ (q − z)·s

with q and z in the signed range [−2^(b−1), 2^(b−1) − 1] (−8…7 at 4 bits). That is the unsigned
grid u = q + 2^(b−1) of onnxruntime's `is_symmetric=False` and of GPTQ / AWQ checkpoints, shifted
so the integers stay int8 as the symmetric ones do, and export as DequantizeLinear with an int8
(INT4 after packing) zero point. vcon-fx uses it for groups of inputs only (`--group-size` with
`--asymmetric`): one zero point per g weights is what the int4 kernels store; per output channel
a shift costs more than it gains on zero-mean weights.

Every grid function of scale_grid.py takes the zero point as an optional argument with the same
shape as the scales (floats holding integers); None means the symmetric grid.
"""

from __future__ import annotations

import torch

__all__ = ["signed_range", "minmax_grid", "quantize_weight_asymmetric", "ASYMMETRIC_BITS"]

ASYMMETRIC_BITS = (8, 4, 2)


def signed_range(bits: int) -> tuple[int, int]:
    """The integers of a b-bit asymmetric grid, shifted to signed: (−2^(b−1), 2^(b−1) − 1) (pure)."""
    return -(2 ** (int(bits) - 1)), 2 ** (int(bits) - 1) - 1


@torch.no_grad()
def minmax_grid(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points (out, in/g) spanning each group's [min, max], widened to contain 0 (pure).

    A group of zeros gets scale 1 and the zero point that maps 0 to 0.
    """
    w = weight.detach()
    rows = w.reshape(-1, group_size).float()
    low, high = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    levels = 2 ** int(bits) - 1
    scale = (high - low) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, levels) + signed_range(bits)[0]
    return scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1)


@torch.no_grad()
def quantize_weight_asymmetric(weight: torch.Tensor, bits: int,
                               group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integers (floats, `weight`'s shape), scales and zero points (out, in/g) by round-to-nearest (pure)."""
    from .scale_grid import grid_integers

    scale, zero = minmax_grid(weight, bits, group_size)
    return grid_integers(weight, scale, bits, zero), scale, zero
