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
branch gets no gradient, kept 0.999). `hold_teacher` keeps the dense branch's own weights fixed
for such a run. Weights a twin shares with it (prune, quant) keep training: the twin needs
them; `--separate-weights` gives the twin its own copy so the teacher stays exactly the original.
"""

from __future__ import annotations

import torch
from torch import nn

from ..graph.blend import Blend, blend_modules
from ..graph.modes import eval_mode

__all__ = ["teacher_active", "GroupMatch", "hold_teacher"]


def teacher_active(betas: dict[str, float], after: bool) -> bool:
    """Whether the teacher terms apply at a step with these β: during the transition, or always if `after`."""
    return after or any(b > 0.0 for b in betas.values())


def hold_teacher(model: nn.Module) -> list[nn.Parameter]:
    """Stop every trainable weight that only a dense branch uses from training (in place); returns them.

    Give the returned parameters `requires_grad_(True)` back when the run ends.
    """
    held = []
    for blend in blend_modules(model).values():
        shared = {id(p) for p in blend.compressed.parameters()}
        for p in blend.dense.parameters():
            if p.requires_grad and id(p) not in shared:
                p.requires_grad_(False)
                held.append(p)
    return held


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
