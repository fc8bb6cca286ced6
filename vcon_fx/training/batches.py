"""Fine-tuning batches: which examples step t sees, and how a batch becomes model inputs.

A step's batch is a pure function of (seed, step, rank), never of how many steps this process
has run, so a run killed and resumed from a checkpoint sees exactly the batches an unbroken run
would have: nothing about the data order needs saving. `mix_seed` derives the seeds (per-epoch
permutations here, per-step dropout in `vcon_fx.finetune`).
"""

from __future__ import annotations

from typing import Iterator, Mapping

import torch

from ..errors import DataError

__all__ = ["StepBatches", "mix_seed", "split_batch", "to_device"]


# ── batches: a pure function of (seed, step, rank) ─────────────────────────────────────────


class StepBatches:
    """Index lists for steps first..last: global batch t covers positions [(t−1)·G, t·G) of an endless
    sequence of per-epoch permutations; rank r takes its slice [r·B, (r+1)·B) of it."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, first: int, last: int):
        self.n, self.batch, self.rank, self.world, self.seed = n, batch, rank, world, seed
        self.first, self.last = first, last
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return max(0, self.last - self.first + 1)

    def __iter__(self) -> Iterator[list[int]]:
        for t in range(self.first, self.last + 1):
            yield self.indices(t)

    def indices(self, t: int) -> list[int]:
        start = (t - 1) * self.batch * self.world + self.rank * self.batch
        return [self._index(p) for p in range(start, start + self.batch)]

    def _index(self, position: int) -> int:
        epoch, i = divmod(position, self.n)
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0x5EED))
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return int(self._perms[epoch][i])


def mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


# ── batches → model inputs ─────────────────────────────────────────────────────────────────


def split_batch(batch) -> tuple[tuple, dict, torch.Tensor | None]:
    """(args, kwargs, labels) from a collated batch of any item form `finetune` reads."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, Mapping):
        kwargs = dict(batch)
        labels = kwargs.pop("labels", None)
        if labels is None:
            labels = kwargs.pop("label", None)
        return (), kwargs, labels
    if isinstance(batch, (list, tuple)) and batch:
        first = batch[0]
        labels = batch[1] if len(batch) > 1 else None
        if isinstance(first, Mapping):
            return (), dict(first), labels
        return (first,), {}, labels
    raise DataError(f"a data item must be a tensor, (input, label) or a dict of inputs, got {type(batch).__name__}")


def to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
