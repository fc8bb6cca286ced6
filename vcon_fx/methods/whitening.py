"""Truncation-aware whitening (SVD-LLM, arXiv 2403.07378): the low-rank factors that minimize the output error.

The plain SVD minimizes ‖W − Ŵ‖, but the model feels ‖X(W − Ŵ)ᵀ‖ on its inputs X. With
XᵀX = S·Sᵀ (S lower-triangular, the Cholesky factor),

    ‖X(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)·S‖_F,

so the best rank-r Ŵ is the truncated SVD of W·S with S taken back out:
W·S ≈ U_r Σ_r V_rᵀ, factors A = U_r·√Σ_r and B = √Σ_r·V_rᵀ·S⁻¹ (a triangular solve, never
an inverse). Each truncated singular value is exactly the output error it costs.

XᵀX is singular when the calibration data has fewer rows than the layer has input columns, or
a feature never varies. Then it is shifted by |λ_min| + ε·trace/n (λ_min its smallest eigenvalue)
before the Cholesky factorization, and the shift is reported. The product A·B stays bounded
whatever the shift: it equals U_r·U_rᵀ·W, W projected onto the kept output directions.
"""

from __future__ import annotations

import logging

import torch

from .svd import truncated_svd

__all__ = ["whitened_factors", "cholesky_with_shift", "SHIFT_EPS"]

log = logging.getLogger(__name__)

SHIFT_EPS = 1e-6  # the shift's floor, relative to the mean diagonal of XᵀX
_PIVOT_FLOOR = 1e-12  # a Cholesky pivot² below this share of the mean diagonal counts as singular


def cholesky_with_shift(gram: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(S, shift): the lower Cholesky factor of gram + shift·I, shift = 0 when gram is positive-definite (pure).

    Args:
        gram: a symmetric (n, n) matrix (XᵀX or XᵀX / rows), any float dtype; the work is in float64.

    Returns:
        S (float64, lower-triangular) with S·Sᵀ = gram + shift·I, and the shift added (0.0 if none).
    """
    h = gram.detach().double()
    h = (h + h.T) / 2
    n = h.shape[0]
    mean_diag = float(h.diagonal().mean()) if n else 0.0
    if mean_diag <= 0:  # no input ever reached the layer: every direction weighs the same (plain SVD)
        return torch.eye(n, dtype=h.dtype, device=h.device), 0.0
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0 and float(factor.diagonal().pow(2).min()) > _PIVOT_FLOOR * mean_diag:
        return factor, 0.0
    smallest = float(torch.linalg.eigvalsh(h)[0])
    shift = abs(smallest) + SHIFT_EPS * mean_diag
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(h + shift * eye), shift


def whitened_factors(matrix: torch.Tensor, gram: torch.Tensor, rank: int,
                     svd: str = "auto") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Factors (A: out×r, B: r×in) minimizing ‖X(W − A·B)ᵀ‖ for inputs with Gram matrix `gram` (pure).

    Args:
        matrix: the weight W as (out, in) (a conv's flattened to in = channels·kernel).
        gram: XᵀX over W's columns (any positive scale: a mean or a sum).
        rank: singular values kept.
        svd: the truncated SVD's route ("auto", "exact", "randomized"; see svd.py).

    Returns:
        (A, B, shift) in `matrix`'s dtype; shift > 0 when XᵀX was not positive-definite (see the module doc).
    """
    factor, shift = cholesky_with_shift(gram.to(matrix.device))
    a, b = truncated_svd(matrix.detach().double() @ factor, rank, svd)  # A = U√Σ, b = √Σ·Vᵀ
    b = torch.linalg.solve_triangular(factor, b, upper=False, left=False)  # b·S⁻¹
    if shift:
        log.warning("XᵀX of a %s layer was not positive-definite: shifted by %.3g before whitening",
                    "×".join(map(str, matrix.shape)), shift)
    return a.to(matrix.dtype).contiguous(), b.to(matrix.dtype).contiguous(), shift
