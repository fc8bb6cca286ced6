"""The dense branch as a free teacher: terms added to the training loss while it is still there.

During the transition the original model is already in the graph (each Blend's dense branch), so
teaching costs no second copy:

    distill        (1 − w)·task + w·distill(model(x), model at β = 1)   with labels (--distill W)
    match_groups   + m · mean over groups of ‖c − d‖² / ‖d‖²            (--match-groups M)

where c and d are a group's compressed and dense branch outputs on this batch. Both stop once
every β is 0, unless `teacher_after`. The dense targets carry no gradient.

Without labels the whole loss is distillation to the model at β = 1, so the dense branch is the
target and must not learn from it: while β > 0 the blend β·d + (1 − β)·c is pulled toward d, and
a trained dense branch moves toward the twin just as the twin moves toward it, with nothing left
to hold either to the original (measured on MiniLM, low-rank 0.5, 30 steps: the β = 1 model's
sentence embeddings fell to cosine 0.18 of the original's; abrupt compression, where the dense
branch gets no gradient, kept 0.999). Layers outside the groups are read by both, so training
them moves the target too, and shrinking them shrinks the loss. `hold_teacher` keeps every
weight no twin is made of fixed for such a run: only the twins train, toward the original model.
Weights a twin shares with its dense branch (prune, quant) must keep training, the twin being
made of them; but a teacher that reads them collapses with them, abrupt or not: the loss
‖Q(W)x − Wx‖² shrinks as W does (MiniLM, 4-bit weights, 50 steps: cosine 0.90 one-shot, ~0.01
after fine-tuning). So `TeacherWeights` keeps a frozen copy of exactly those shared weights,
swapped in while the teacher runs: the cost is one copy of the shared weights, without
gradients or optimizer state (`--separate-weights` keeps that copy in the model instead).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..graph.blend import Blend, blend_modules
from ..graph.modes import eval_mode

__all__ = ["teacher_active", "GroupMatch", "hold_teacher", "TeacherWeights", "original_weights"]

_ATTACHED = "_vcon_teacher_weights"  # where a run attaches its TeacherWeights to the model (not state)


def teacher_active(betas: dict[str, float], after: bool) -> bool:
    """Whether the teacher terms apply at a step with these β: during the transition, or always if `after`."""
    return after or any(b > 0.0 for b in betas.values())


def hold_teacher(model: nn.Module) -> list[nn.Parameter]:
    """Stop every trainable weight no twin is made of from training (in place); returns them.

    The dense branches' own weights, and the layers outside the groups (embeddings, norms, heads):
    the teacher reads them, so while they train it moves. Give the returned parameters
    `requires_grad_(True)` back when the run ends.
    """
    twins = {id(p) for blend in blend_modules(model).values() for p in blend.compressed.parameters()}
    held = [p for p in model.parameters() if p.requires_grad and id(p) not in twins]
    for p in held:
        p.requires_grad_(False)
    return held


class TeacherWeights:
    """Frozen copies of the weights dense branches share with their twins, for the teacher's forward."""

    def __init__(self, model: nn.Module):
        seen, self.pairs = set(), []
        for blend in blend_modules(model).values():
            twin = {id(p) for p in blend.compressed.parameters()}
            for p in blend.dense.parameters():
                if id(p) in twin and id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    self.pairs.append((p, p.detach().clone()))

    def attach(self, model: nn.Module) -> None:
        """Make `original_weights(model)` swap these in (in place; `detach` undoes it)."""
        model.__dict__[_ATTACHED] = self

    @staticmethod
    def detach(model: nn.Module) -> None:
        model.__dict__.pop(_ATTACHED, None)


@contextlib.contextmanager
def original_weights(model: nn.Module):
    """Within: the shared weights hold their values from the start of the run, if a run attached them."""
    frozen = model.__dict__.get(_ATTACHED)
    if frozen is None:
        yield
        return
    live = [p.data for p, _ in frozen.pairs]
    for p, copy in frozen.pairs:
        p.data = copy  # a storage swap: autograd keeps the live tensors it saved, restored before backward
    try:
        yield
    finally:
        for (p, _), data in zip(frozen.pairs, live):
            p.data = data


class GroupMatch:
    """Collects each group's ‖compressed − dense‖² / ‖dense‖² over one forward pass, with gradients.

    The term trains the twins only: each twin runs once more here, on its input detached (the
    layers before it are not moved to make matching easier), and the dense output is a target
    without gradient (recorded from the forward, or run here under no_grad when the Blend skipped it).
    """

    def __init__(self, model: nn.Module):
        self.blends = blend_modules(model)
        self.terms: list[torch.Tensor] = []
        self.handles: list = []

    def __enter__(self) -> "GroupMatch":
        for blend in self.blends.values():
            seen: dict[str, torch.Tensor] = {}

            def record(_module, _args, output, seen=seen):
                seen["dense"] = _primary(output)

            def finish(module: Blend, args, kwargs, _output, seen=seen):
                if "dense" not in seen:
                    with torch.no_grad(), eval_mode(module.dense):
                        seen["dense"] = _primary(module.dense(*args, **kwargs))
                d = seen.pop("dense").detach().float()
                c = _primary(module.compressed(*_detached(args), **_detached(kwargs))).float()
                self.terms.append((c - d).square().sum() / d.square().sum().clamp_min(1e-12))

            self.handles.append(blend.dense.register_forward_hook(record))
            self.handles.append(blend.register_forward_hook(finish, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def loss(self) -> torch.Tensor:
        """The mean of the collected terms (0 when no group ran)."""
        return torch.stack(self.terms).mean() if self.terms else torch.zeros(())


def _detached(values):
    if isinstance(values, dict):
        return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in values.items()}
    return tuple(v.detach() if isinstance(v, torch.Tensor) else v for v in values)


def _primary(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output
