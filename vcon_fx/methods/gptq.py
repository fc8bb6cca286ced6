"""GPTQ-style quantization (Frantar et al. 2022, arXiv 2210.17323): round column by column, compensate with the rest.

Round-to-nearest rounds each weight on its own. GPTQ rounds the columns of W left to right on
the method's own grid (scales fixed from the dense weight before the sweep: per output channel,
or per group of inputs, GPTQ's "static groups"),
and after each column moves the not-yet-rounded columns so the layer's output on the calibration
inputs changes as little as possible: the inverse-Hessian error feedback of hessian.py, with
H = XᵀX dampened by 1 % of its mean diagonal, in blocks of 128 columns. Columns are visited in
order of decreasing H_jj (GPTQ's "act-order"): the inputs that carry the most energy are rounded
while many columns are left to absorb their error. Each column is rounded with its own
group's scales wherever the order puts it, so the order changes nothing in how the result is
stored. It pays off at 4 bits
and fewer, where rounding errors are large; at 8 bits round-to-nearest is already close.

The result lies exactly on the grid, so the quantized twin starts from it with its own weight
copy (the dense layer's weight must stay as it is for β = 1) and its scales kept fixed.
"""

from __future__ import annotations

import torch

from .hessian import DAMP, error_feedback_sweep, inverse_hessian_factor
from .scale_grid import grid_round

__all__ = ["gptq_quantize"]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int | str,
                  damp: float = DAMP, zero: torch.Tensor | None = None) -> torch.Tensor:
    """The GPTQ solution: a weight of `weight`'s shape whose every entry is a grid point (q − zero)·scale (pure).

    Args:
        weight: (out, in) or (out, channels, *kernel).
        hessian: XᵀX over the weight's columns (order of `weight.reshape(out, -1)`), any positive scale.
        scale: (out,) per-output-channel scales, or (out, groups) per group of consecutive columns
            (a Linear's), fixed for the sweep.
        bits: 4, 2, 1 or "ternary" (any width `scale_grid.grid_round` takes).
        damp: share of H's mean diagonal added before inverting.
        zero: zero points of an asymmetric grid (scale's shape, zero_point.py), or None (symmetric).
    """
    flat = weight.detach().reshape(weight.shape[0], -1)
    h = hessian.to(flat.device)
    order = torch.argsort(h.diagonal(), descending=True, stable=True)  # act-order: the loudest inputs first
    factor = inverse_hessian_factor(h[order][:, order], damp)
    per_column = scale.to(device=flat.device, dtype=torch.float32).reshape(flat.shape[0], -1)
    zeros = None if zero is None else zero.to(device=flat.device, dtype=torch.float32).reshape(per_column.shape)
    group_of = ((order * per_column.shape[1]) // flat.shape[1]).tolist()  # each column's group, in sweep order

    def round_column(column: torch.Tensor, j: int, first: int) -> torch.Tensor:
        group = group_of[first + j]
        return grid_round(column, per_column[:, group], bits, None if zeros is None else zeros[:, group])

    solution = torch.empty_like(flat)
    solution[:, order] = error_feedback_sweep(flat[:, order], factor, round_column,
                                              start_block=lambda _part, _diag, first: first)
    # the sweep ran in float32: snap once more so every entry is exactly q·scale in the weight's dtype
    return grid_round(solution, scale.to(solution), bits, None if zero is None else zero.to(solution)).reshape(weight.shape)
