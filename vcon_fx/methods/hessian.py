"""The error-feedback sweep GPTQ and SparseGPT share: round one column, push its error onto the rest.

For a layer with inputs X, the output error ‖X(W − Ŵ)ᵀ‖² is a quadratic form in each row of
W − Ŵ with Hessian H = XᵀX. Rounding (or zeroing) column j changes the output; the least-squares
compensation spreads that change over the columns not yet rounded, in proportion to the row of
H⁻¹ restricted to them (Optimal Brain Surgeon). With U the upper Cholesky factor of H⁻¹, every
such restricted inverse is a row of U, so one left-to-right sweep does it:

    err = (w_j − q_j) / U_jj;     W[:, j:] −= err ⊗ U[j, j:]

Columns are processed in blocks (128 wide): inside a block column by column, then the block's
accumulated errors update every later column in one matrix product (the "lazy batch" update of
GPTQ, arXiv 2210.17323). H is dampened by 1 % of its mean diagonal first, which keeps the
factorization stable when a feature is (nearly) constant on the calibration data.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from ..errors import ConfigError

__all__ = ["inverse_hessian_factor", "error_feedback_sweep", "DAMP", "BLOCK"]

DAMP = 0.01  # share of the mean diagonal added to H
BLOCK = 128  # columns per lazy block update
_MORE_DAMP = (1.0, 10.0, 100.0)  # tried in turn when a factorization fails (rounding on huge ranges)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """U, the upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹, in float64 (pure).

    A feature that never fires (H_jj = 0) gets H_jj = 1: its column is rounded on its own.
    """
    h = hessian.detach().double().clone()
    h = (h + h.T) / 2
    diag = h.diagonal()
    diag[diag <= 0] = 1.0
    mean = float(diag.mean())
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for boost in _MORE_DAMP:
        lower, info = torch.linalg.cholesky_ex(h + boost * damp * mean * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
    raise ConfigError("a layer's XᵀX on the calibration data stays indefinite after dampening by 100 % of its "
                      "diagonal (inputs with NaN/Inf or overflowing activations?): check the calibration data, or "
                      "start plain with --init plain")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one CPU thread for the block (restored after it).

    The per-column operations are small (out × 128): on a busy machine, waking a second thread for
    each costs more than the operation itself (15× slower on 2 shared cores). The block's matrix
    product, outside, keeps every thread.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


BlockStart = Callable[[torch.Tensor, torch.Tensor, int], Any]
RoundColumn = Callable[[torch.Tensor, int, Any], torch.Tensor]


@torch.no_grad()
def error_feedback_sweep(weight: torch.Tensor, factor: torch.Tensor, round_column: RoundColumn,
                         start_block: BlockStart | None = None, block: int = BLOCK) -> torch.Tensor:
    """Ŵ: every column of `weight` rounded left to right, each one's error fed forward through `factor` (pure).

    Args:
        weight: (out, n) float weight.
        factor: U from `inverse_hessian_factor` (n, n).
        round_column: (the column as updated so far, its index in the block, the block's state)
            → its rounded value (a grid point for GPTQ, the column with zeros for SparseGPT).
        start_block: (the block's columns as updated so far, U's diagonal over them, the block's
            first column) → a state handed to `round_column` (SparseGPT chooses its mask there).
        block: columns per lazy update.

    Returns:
        Ŵ, in `weight`'s dtype and shape.
    """
    work = weight.detach().to(torch.float32).clone()
    u = factor.to(device=work.device, dtype=torch.float32)
    out = torch.empty_like(work)
    columns = work.shape[1]
    for first in range(0, columns, block):
        last = min(first + block, columns)
        part = work[:, first:last].clone()
        u_part = u[first:last, first:last]
        errors = torch.empty_like(part)
        state = start_block(part, u_part.diagonal(), first) if start_block is not None else None
        with _one_thread():
            for j in range(last - first):
                rounded = round_column(part[:, j], j, state)
                error = (part[:, j] - rounded) / u_part[j, j]
                part[:, j:] -= error[:, None] * u_part[j, j:][None, :]
                part[:, j] = rounded  # exactly the rounded value, free of the update's float error
                errors[:, j] = error
        out[:, first:last] = part
        work[:, last:] -= errors @ u[first:last, last:]
    return out.to(weight.dtype)
