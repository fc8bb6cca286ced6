"""Truncation-aware whitening (SVD-LLM, arXiv 2403.07378): the low-rank factors that minimize the output error.

The plain SVD minimizes ‖W − Ŵ‖, but the model feels ‖X(W − Ŵ)ᵀ‖ on its inputs X. With
XᵀX = S·Sᵀ (S lower-triangular, the Cholesky factor),

    ‖X(W − Ŵ)ᵀ‖_F = ‖(W − Ŵ)·S‖_F,

so the best rank-r Ŵ is the truncated SVD of W·S with S taken back out:
W·S ≈ U_r Σ_r V_rᵀ, factors A = U_r·√Σ_r and B = √Σ_r·V_rᵀ·S⁻¹ (a triangular solve, never
an inverse). Each truncated singular value is exactly the output error it costs.

XᵀX is singular when the calibration data has fewer rows than the layer has input columns, or
a feature never varies (a LayerNorm's outputs sum to a constant). Then it is shifted by
|λ_min| + ε·trace/n (λ_min its smallest eigenvalue, ε = 10⁻⁶) before the Cholesky factorization,
and the shift is reported. XᵀX is positive semi-definite, so λ_min is 0 up to rounding: ε·trace/n
is tried first, and λ_min is computed only when that is not enough. The product A·B stays bounded
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
    if _positive_definite(factor, info, mean_diag):
        return factor, 0.0
    # XᵀX is positive semi-definite by construction: its smallest eigenvalue is 0 up to rounding, and the
    # floor alone usually makes it definite; the eigenvalue is computed (O(n³) again) only when it does not
    shift = SHIFT_EPS * mean_diag
    factor, info = torch.linalg.cholesky_ex(_plus_diagonal(h, shift))
    if not _positive_definite(factor, info, mean_diag):
        shift = abs(float(torch.linalg.eigvalsh(h)[0])) + SHIFT_EPS * mean_diag
        factor = torch.linalg.cholesky(_plus_diagonal(h, shift))
    return factor, shift


def _positive_definite(factor: torch.Tensor, info: torch.Tensor, mean_diag: float) -> bool:
    return int(info) == 0 and float(factor.diagonal().pow(2).min()) > _PIVOT_FLOOR * mean_diag


def _plus_diagonal(h: torch.Tensor, shift: float) -> torch.Tensor:
    shifted = h.clone()
    shifted.diagonal().add_(shift)
    return shifted


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
    # the SVD in the weight's dtype, as for the plain start (svd.py); the solve in float64
    a, b = truncated_svd((matrix.detach().double() @ factor).to(matrix.dtype), rank, svd)  # A = U√Σ, b = √Σ·Vᵀ
    b = torch.linalg.solve_triangular(factor, b.double(), upper=False, left=False)  # b·S⁻¹
    if shift:
        log.warning("XᵀX of a %s layer was not positive-definite: shifted by %.3g before whitening",
                    "×".join(map(str, matrix.shape)), shift)
    return a.to(matrix.dtype).contiguous(), b.to(matrix.dtype).contiguous(), shift
