"""SparseGPT-style pruning (Frantar & Alistarh 2023, arXiv 2301.00774): choose the mask block by block, update the rest.

The weights that stay are not left as they were: every zeroed weight's output error is fed to
the columns not yet processed through the inverse Hessian of the calibration inputs (hessian.py),
so the kept weights compensate. The mask is chosen per block of columns at the block's start,
from the weights as already updated, by the Optimal Brain Surgeon saliency w² / [U_jj]²:

- unstructured: each output row loses its share of the block, so that every row ends with the
  zeros `wanda.row_quota` gives it: the twin's Wanda re-selection (|W|·‖X_j‖ within rows) then
  picks exactly this mask again from the updated weights (their zeros score 0);
- N:M: in each group of M consecutive input channels the N most salient stay. A convolution's
  columns are visited kernel position by kernel position, so that a group's M channels lie side
  by side in one block.
"""

from __future__ import annotations

import torch

from .hessian import BLOCK, error_feedback_sweep, inverse_hessian_factor
from .wanda import lowest_per_row, row_quota

__all__ = ["sparsegpt_prune"]


@torch.no_grad()
def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, *, zeros: int = 0,
                    nm: tuple[int, int] | None = None) -> torch.Tensor:
    """The pruned weight (zeros in place, kept weights updated) of a Linear / Conv weight (pure).

    Args:
        weight: (out, in) or (out, channels, *kernel).
        hessian: XᵀX over the weight's columns (in the order of `weight.reshape(out, -1)`).
        zeros: how many weights to zero in all (unstructured; spread over rows by `row_quota`).
        nm: (N, M) to keep N of every M consecutive input channels instead.

    Returns:
        A tensor of `weight`'s shape and dtype.
    """
    rows = weight.shape[0]
    flat = weight.detach().reshape(rows, -1)
    kernel = flat.shape[1] // weight.shape[1]  # 1 for a Linear
    order = torch.arange(flat.shape[1], device=flat.device)
    if nm is not None and kernel > 1:  # kernel-position-major, so an N:M group's channels are adjacent
        order = order.reshape(weight.shape[1], kernel).T.reshape(-1)
    factor = inverse_hessian_factor(hessian.to(flat.device)[order][:, order])
    if nm is not None:
        block = nm[1] * max(1, BLOCK // nm[1])
        start = _nm_block(*nm)
    else:
        block = BLOCK
        start = _quota_block(row_quota(rows, zeros, flat.device), flat.shape[1])
    pruned = error_feedback_sweep(flat[:, order], factor, lambda column, j, keep: column * keep[:, j],
                                  start_block=start, block=block)
    result = torch.empty_like(flat)
    result[:, order] = pruned
    return result.reshape(weight.shape)


def _saliency(part: torch.Tensor, diag: torch.Tensor) -> torch.Tensor:
    return part.pow(2) / diag.pow(2)[None, :]


def _quota_block(quota: torch.Tensor, columns: int):
    """Block start for unstructured pruning: each row's quota spread over the blocks in proportion."""
    def start(part: torch.Tensor, diag: torch.Tensor, first: int) -> torch.Tensor:
        done = _share(quota, first, columns)
        upto = _share(quota, first + part.shape[1], columns)
        return lowest_per_row(_saliency(part, diag), upto - done)
    return start


def _share(quota: torch.Tensor, upto: int, columns: int) -> torch.Tensor:
    """The zeros each row has after `upto` of its `columns` columns (exactly `quota` at the end)."""
    return torch.div(quota * upto + columns // 2, columns, rounding_mode="floor")


def _nm_block(n: int, m: int):
    """Block start for N:M: the N most salient of every M consecutive columns stay."""
    def start(part: torch.Tensor, diag: torch.Tensor, first: int) -> torch.Tensor:
        score = _saliency(part, diag)
        groups = score.reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        return keep.reshape(score.shape)
    return start
