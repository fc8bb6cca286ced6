"""Wanda (Sun et al. 2023, arXiv 2306.11695): prune by |W_ij|·‖X_j‖₂, compared within each output row.

A weight matters as much as the input it multiplies: |W_ij| times the norm of input column j
over the calibration data. Scores are compared within each output row (each row loses the same
number of weights), or within each N:M group. The pruned twin keeps the column norms as a
buffer (`PrunedLayer.feature_norm`), so the mask it re-chooses at every fine-tuning step is
chosen by the same score from the weights as they train; the norms themselves stay those of the
calibration data (the inputs drift little while the twin takes over, and re-measuring them
would need the data at every step).
"""

from __future__ import annotations

import torch

from .calibration import InputStatistics

__all__ = ["row_quota", "lowest_per_row", "wanda_score", "feature_norms"]


def row_quota(rows: int, zeros: int, device: torch.device | None = None) -> torch.Tensor:
    """Zeros per output row: `zeros` spread as evenly as possible, the first rows taking one more (pure)."""
    base, extra = divmod(int(zeros), int(rows))
    return base + (torch.arange(rows, device=device) < extra).long()


@torch.no_grad()
def lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Boolean keep-mask of `score`'s shape: in row r, the counts[r] lowest scores are False (pure).

    Ties are broken by topk's order, so each row's count is exact whatever the values.
    """
    flat = score.detach().reshape(score.shape[0], -1)
    keep = torch.ones_like(flat, dtype=torch.bool)
    most = int(counts.max()) if counts.numel() else 0
    if most > 0:
        order = flat.topk(most, dim=1, largest=False, sorted=True).indices
        drop = torch.arange(most, device=flat.device)[None, :] < counts.to(flat.device)[:, None]
        keep.scatter_(1, order, ~drop)
    return keep.view_as(score)


def wanda_score(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """|W|·‖X_j‖ (feature_norm has the shape of one output row of `weight`) (pure, no gradient)."""
    return weight.detach().abs() * feature_norm


def feature_norms(statistics: InputStatistics | None, weight: torch.Tensor, groups: int = 1) -> torch.Tensor | None:
    """‖X_j‖₂ per weight column, shaped like one output row of `weight`, scaled to a maximum of 1 (pure).

    None when there are no statistics, or for a grouped convolution (its rows read different
    channels, so one row of norms does not fit them all): the twin then ranks by |W| within rows.
    """
    if statistics is None or groups != 1 or statistics.column_squares.numel() != weight[0].numel():
        return None
    norms = statistics.column_norms()
    top = float(norms.max()) if norms.numel() else 0.0
    norms = norms / top if top > 0 else torch.ones_like(norms)
    return norms.reshape(weight.shape[1:]).to(device=weight.device, dtype=weight.dtype)
