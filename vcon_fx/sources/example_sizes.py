"""Example inputs whose batch (and sequence) can stay dynamic: never a size of 0 or 1 there.

torch.export specialises sizes 0 and 1, so a model captured or exported at batch 1 comes out
fixed to batch 1: fine-tuning at batch 32 and the ONNX at any other batch then fail. Every
source vcon-fx builds itself therefore gets examples of at least `MIN_DYNAMIC_SIZE` on those
dims; a smaller size the user asked for is repeated up to it, and a note says so.
"""

from __future__ import annotations

import torch

from ..graph.dims import MIN_DYNAMIC_SIZE
from .base import LoadedModel

__all__ = ["widen_examples", "resize_dim"]


def widen_examples(lm: LoadedModel) -> list[str]:
    """Repeat example inputs along batch (and sequence) up to MIN_DYNAMIC_SIZE (in place on `lm`).

    Returns:
        The notes saying what changed ([] when nothing did).
    """
    notes: list[str] = []

    def widen(name: str, t):
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.shape[0] < MIN_DYNAMIC_SIZE and t.shape[0] > 0:
            notes.append(f"{name}: example batch {t.shape[0]} → {MIN_DYNAMIC_SIZE}")
            t = resize_dim(t, 0, MIN_DYNAMIC_SIZE)
        if name in lm.seq_inputs and t.dim() >= 2 and 0 < t.shape[1] < MIN_DYNAMIC_SIZE:
            notes.append(f"{name}: example sequence length {t.shape[1]} → {MIN_DYNAMIC_SIZE}")
            t = resize_dim(t, 1, MIN_DYNAMIC_SIZE)
        return t

    lm.example_args = tuple(widen(f"input {i}", t) for i, t in enumerate(lm.example_args))
    lm.example_kwargs = {k: widen(k, t) for k, t in lm.example_kwargs.items()}
    if not notes:
        return []
    return [f"captured with {', '.join(sorted(set(notes)))}: torch.export fixes dims of size 1, and these must "
            "stay dynamic (the model still runs at any size, 1 included)"]


def resize_dim(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with dim `dim` exactly `size` long: its slices repeated, then cut (pure)."""
    if t.shape[dim] == 0:
        return t
    reps = -(-size // t.shape[dim])
    return torch.cat([t] * reps, dim=dim).narrow(dim, 0, size)
