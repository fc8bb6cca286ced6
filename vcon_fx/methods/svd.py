"""Truncated SVD for initializing low-rank factors: exact, or randomized when the rank is far below the size.

Two routes give the factors (A: out×r, B: r×in) with A·B ≈ the best rank-r approximation:

* exact: eigendecomposition of the small-side Gram matrix in float64. On CPU it is 10-20× faster
  than a full SVD of a wide layer, but it is still O(n³) in the small side and dominated
  `transform` on BERT-base (benchmarks/TOOLSPEED.md).
* randomized (Halko, Martinsson & Tropp 2011): a Gaussian sketch of r + p columns, a few power
  iterations, then an exact SVD of the small (r + p)×in projection. O(out·in·(r + p)) per
  iteration: 3-6× faster than exact for a 768×3072 layer at rank 64, with a reconstruction error
  0.5-0.7 % above the optimum on random (flat-spectrum, hardest-case) weights: a fine start for
  fine-tuning. It takes over when the rank is at most a quarter of the layer's smaller side.

The sketch uses its own seeded generator, so the factors are reproducible and the caller's
random stream (training seeds) is left untouched.
"""

from __future__ import annotations

import torch

__all__ = ["truncated_svd", "exact_svd", "randomized_svd", "use_randomized"]

# Randomized SVD when the rank is at most this share of the small side, and that side is large
# enough for the O(n³) eigendecomposition to matter.
RANDOMIZED_MAX_SHARE = 1 / 4
RANDOMIZED_MIN_SIDE = 256
_OVERSAMPLE = 16
_POWER_ITERATIONS = 4
_SEED = 0


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """True when `truncated_svd(..., method="auto")` takes the randomized route for this shape."""
    small = min(shape)
    return small >= RANDOMIZED_MIN_SIDE and rank <= small * RANDOMIZED_MAX_SHARE


def truncated_svd(matrix: torch.Tensor, rank: int, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (A: out×r, B: r×in), √σ split between them, with A·B ≈ the rank-r truncation.

    Args:
        matrix: a 2-D weight (out × in).
        rank: singular values kept.
        method: "exact", "randomized", or "auto" (randomized when the rank is far below the size).

    Degenerate (zero, rank-deficient) input works: empty directions get zero factors.
    """
    if method not in ("auto", "exact", "randomized"):
        raise ValueError(f"method must be auto, exact or randomized, got {method!r}")
    randomized = method == "randomized" or (method == "auto" and use_randomized(tuple(matrix.shape), rank))
    a, b = randomized_svd(matrix, rank) if randomized else exact_svd(matrix, rank)
    return a.to(matrix.dtype).contiguous(), b.to(matrix.dtype).contiguous()


def exact_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r truncation through eigh of the small-side Gram matrix (float64)."""
    m = matrix.detach()
    wide = m.double() if m.shape[0] <= m.shape[1] else m.double().T
    evals, evecs = torch.linalg.eigh(wide @ wide.T)
    sigma = evals.flip(0)[:rank].clamp_min(0).sqrt()
    u = evecs.flip(1)[:, :rank]
    root = sigma.sqrt()
    a = u * root  # U·√S
    b = (u.T @ wide) / torch.where(root > 0, root, torch.ones_like(root))[:, None]  # √S·Vᵀ
    b[root <= sigma.max() * 1e-12 if sigma.numel() else root <= 0] = 0
    return (b.T, a.T) if m.shape[0] > m.shape[1] else (a, b)


def randomized_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r truncation through a randomized range finder with power iterations.

    The sketch and power iterations run in float32 (the fast GEMMs; the QR after every half-step
    keeps the basis orthonormal to float32 precision), the small final SVD in float64.
    """
    m = matrix.detach()
    m = m.float() if m.dtype != torch.float64 else m
    out_f, in_f = m.shape
    width = min(rank + _OVERSAMPLE, out_f, in_f)
    gen = torch.Generator(device=m.device).manual_seed(_SEED)
    sketch = torch.randn(in_f, width, generator=gen, dtype=m.dtype, device=m.device)
    basis = torch.linalg.qr(m @ sketch).Q
    for _ in range(_POWER_ITERATIONS):  # re-orthonormalize each half-step: float error stays small
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.T @ basis).Q).Q
    u_small, sigma, vh = torch.linalg.svd((basis.T @ m).double(), full_matrices=False)
    u = basis.double() @ u_small[:, :rank]
    sigma, vh = sigma[:rank], vh[:rank]
    root = sigma.clamp_min(0).sqrt()
    live = sigma > (sigma.max() * 1e-12 if sigma.numel() else 0)
    a = u * torch.where(live, root, torch.zeros_like(root))
    b = torch.where(live[:, None], root[:, None] * vh, torch.zeros_like(vh))
    if a.shape[1] < rank:  # the layer's size capped the sketch: pad with empty directions
        a = torch.cat([a, a.new_zeros(out_f, rank - a.shape[1])], 1)
        b = torch.cat([b, b.new_zeros(rank - b.shape[0], in_f)], 0)
    return a, b
