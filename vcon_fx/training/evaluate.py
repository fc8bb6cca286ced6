"""How fine-tuning scores a blended model: the loss it trains on, the metric it reports, the gap it logs.

    loss    task      cross-entropy(model(x), y)                       (labels)
            mse / kl  model(x) against the same graph at β = 1         (no labels: "distill")
    metric  accuracy  argmax against the labels of the eval data
            cosine    mean cosine of the outputs to those at β = 1
    gap     ‖dense − compressed‖ / ‖dense‖ per group, from forward hooks

The teacher and the cosine reference are the same graph at β = 1 (`at_beta`), not a second
copy of the model. Model outputs may be a tensor, a tuple or a dict; the prediction is `logits`
when the output names them, else the first floating-point tensor.
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, default_collate

from .batches import split_batch, to_device
from .distributed import Distributed
from ..errors import DataError
from ..graph.blend import Blend, blend_modules, get_betas, set_beta
from ..graph.modes import eval_mode
from .teacher import original_weights

__all__ = ["LOSSES", "choose_loss", "training_loss", "evaluate", "prediction", "at_beta", "GapProbe"]

LOSSES = ("auto", "task", "distill", "mse", "kl")


# ── the loss ───────────────────────────────────────────────────────────────────────────────


def choose_loss(requested: str, vm: nn.Module, args, kwargs, labels, device: torch.device) -> str:
    """The loss a run trains on ("task", "mse" or "kl"), from the one asked for and a first batch."""
    loss = requested
    if loss == "task":
        if labels is None:
            raise DataError("loss 'task' needs labels, but the training data has none: add labels (key 'labels'), "
                            "or use loss 'distill' / 'auto'")
        return "task"
    if loss == "auto" and labels is not None:
        return "task"
    if loss in ("mse", "kl"):
        return loss
    with torch.no_grad(), eval_mode(vm):
        out = vm(*to_device(args, device), **to_device(kwargs, device))
    return "kl" if _logits(out) is not None else "mse"


def training_loss(kind: str, vm: nn.Module, out, args, kwargs, labels) -> torch.Tensor:
    """The loss of outputs `out` of `vm(*args, **kwargs)`; a distillation loss runs the teacher here."""
    if kind == "task":
        logits = prediction(out)
        if tuple(logits.shape[:-1]) != tuple(labels.shape):
            raise DataError(f"labels of shape {tuple(labels.shape)} do not match the model's predictions "
                            f"{tuple(logits.shape)}: give one class per example (or per token)")
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).long(), ignore_index=-100)
    teacher = _teacher(vm, args, kwargs)
    if kind == "kl":
        s, te = prediction(out), prediction(teacher)
        s, te = s.reshape(-1, s.shape[-1]), te.reshape(-1, te.shape[-1])
        return F.kl_div(F.log_softmax(s, -1), F.log_softmax(te, -1), log_target=True, reduction="batchmean")
    n = prediction(out).shape[0]
    return F.mse_loss(_flat(out, n), _flat(teacher, n))


@torch.no_grad()
def _teacher(vm: nn.Module, args, kwargs):
    """The original model's outputs: the same graph at β = 1 (no second copy but of shared weights, if kept)."""
    with eval_mode(vm), at_beta(vm, 1.0), original_weights(vm):
        return vm(*args, **kwargs)


# ── the metric ─────────────────────────────────────────────────────────────────────────────


@torch.no_grad()
def evaluate(vm: nn.Module, data: Dataset, metric: str, *, batch_size: int, device: torch.device,
             dist: Distributed, pad: bool = False) -> float:
    """Accuracy (labels) or mean cosine to the β = 1 outputs, over every rank's share of the eval data.

    `pad`: the model runs only at `batch_size` (shapes fixed at export); the last partial batch is
    filled with repeats of its first example, whose results are not counted.
    """
    ds = data
    total, count = 0.0, 0.0
    with eval_mode(vm):
        idx = list(range(dist.rank, len(ds), dist.world))
        # Every rank runs as many forwards as rank 0 (FSDP's are collective); a spare one counts nothing.
        for lo in range(0, len(range(0, len(ds), dist.world)), batch_size):
            chunk = idx[lo:lo + batch_size] or [0]
            real = len(idx[lo:lo + batch_size])
            if pad:
                chunk = chunk + chunk[:1] * (batch_size - len(chunk))
            args, kwargs, labels = split_batch(default_collate([ds[i] for i in chunk]))
            args, kwargs = to_device(args, device), to_device(kwargs, device)
            out = vm(*args, **kwargs)
            if metric == "accuracy":
                labels = to_device(labels, device)[:real]
                pred = prediction(out)[:real].argmax(-1)
                keep = labels != -100
                total += float((pred[keep] == labels[keep]).sum())
                count += float(keep.sum())
            else:
                with at_beta(vm, 1.0), original_weights(vm):
                    ref = vm(*args, **kwargs)
                n = prediction(out).shape[0]
                sims = F.cosine_similarity(_flat(out, n), _flat(ref, n), dim=1, eps=1e-12)[:real]
                total += float(sims.sum())
                count += real
    total, count = dist.sum([total, count])
    return total / max(count, 1.0)


# ── the model's state while measuring ──────────────────────────────────────────────────────


@contextlib.contextmanager
def at_beta(model: nn.Module, beta: float):
    """Temporarily set every β (through set_beta), then restore each group's value."""
    saved = get_betas(model)
    set_beta(model, beta)
    try:
        yield
    finally:
        set_beta(model, saved)


# ── the gap ────────────────────────────────────────────────────────────────────────────────


class GapProbe:
    """‖dense − compressed‖ / ‖dense‖ per group over one forward pass, from forward hooks.

    Both branches run when 0 < β < 1; at β = 0 or 1 the missing one is run here, under no_grad and in
    eval mode, so it changes neither the gradients, nor batch-norm statistics, nor the RNG.
    """

    def __init__(self, model: nn.Module):
        self.blends = blend_modules(model)
        self.sums: dict[str, list[float]] = {g: [0.0, 0.0] for g in self.blends}
        self.handles: list = []

    def __enter__(self) -> "GapProbe":
        for group, blend in self.blends.items():
            seen: dict[str, torch.Tensor] = {}

            def record(role, seen=seen):
                def hook(_module, _args, output):
                    seen[role] = _primary_detached(output)
                return hook

            def finish(module: Blend, args, kwargs, _output, seen=seen, group=group):
                with torch.no_grad():
                    for role in ("dense", "compressed"):
                        if role not in seen:
                            with eval_mode(getattr(module, role)):
                                seen[role] = _primary_detached(getattr(module, role)(*args, **kwargs))
                    d, c = seen.pop("dense").float(), seen.pop("compressed").float()
                    self.sums[group][0] += float((d - c).square().sum())
                    self.sums[group][1] += float(d.square().sum())

            self.handles.append(blend.dense.register_forward_hook(record("dense")))
            self.handles.append(blend.compressed.register_forward_hook(record("compressed")))
            # prepend: ahead of FSDP's post-forward hook, while the unit's weights are still whole
            self.handles.append(blend.register_forward_hook(finish, with_kwargs=True, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def gaps(self) -> dict[str, float]:
        return {g: math.sqrt(num / den) if den > 0 else 0.0 for g, (num, den) in self.sums.items()}


# ── model outputs → tensors ────────────────────────────────────────────────────────────────


def _leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output, in order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def _logits(out) -> torch.Tensor | None:
    if isinstance(out, Mapping) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    return None


def prediction(out) -> torch.Tensor:
    """The prediction: `logits` when the output names them, else the first tensor."""
    found = _logits(out)
    if found is not None:
        return found
    leaves = _leaves(out)
    if not leaves:
        raise DataError(f"the model returns {type(out).__name__} with no floating-point tensor: it cannot be trained")
    return leaves[0]


def _flat(out, n: int) -> torch.Tensor:
    """Every floating-point output, flattened per example and concatenated: (n, D)."""
    return torch.cat([t.reshape(n, -1) for t in _leaves(out)], dim=1)


def _primary_detached(out) -> torch.Tensor:
    leaves = _leaves(out)
    return leaves[0].detach() if leaves else torch.zeros(())
