"""Adaptive: each group's β falls faster while its twin tracks the dense output, and pauses while
the gap or the loss rises; every β still reaches 0 at the end of the transition.

It is the one schedule that is not a pure function of the step: it reads what fine-tuning
measured (`observe`: each group's gap ‖dense − compressed‖ / ‖dense‖ and the step's loss), so its
state (each group's progress, the last gaps, the loss average) is saved with checkpoints, and a
resumed run continues it exactly. Given the seed, the observations repeat, and so does β.

Per step, group g's progress p (β = 1 − p) advances by rate/Q:
    rate 0     the loss rose above its running mean by more than `tolerance`, or g's gap rose
    rate fast  g's gap is below `track` (the twin already reproduces the dense output)
    rate 1     otherwise
and never falls behind the deadline: p ≥ (u − Q/2) / (Q/2), so β = 0 by u = Q whatever happened.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from ..errors import ConfigError
from .registry import register_controller

__all__ = ["AdaptiveController"]

_DEFAULTS = {"track": 0.1, "fast": 2.0, "tolerance": 0.02, "loss_momentum": 0.9}


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"schedule 'adaptive' has no option {unknown[0]!r}; its options are: {', '.join(_DEFAULTS)}")
    checked = {**_DEFAULTS, **options}
    for name, value in checked.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"adaptive schedule option {name} must be a number ≥ 0, got {value!r}")
        checked[name] = float(value)
    if checked["fast"] < 1.0 or checked["loss_momentum"] >= 1.0:
        raise ConfigError("adaptive schedule: fast must be ≥ 1 and loss_momentum < 1")
    return checked


@register_controller("adaptive", check_options=_check_options)
class AdaptiveController:
    """The state of an adaptive schedule over `groups` (see the module docstring)."""

    def __init__(self, groups: list[str], transition: int, options: Mapping[str, Any]):
        self.groups, self.q, self.options = list(groups), transition, dict(options)
        self.progress = {g: 0.0 for g in self.groups}
        self.gaps: dict[str, float] = {}       # the newest gap of each group
        self.previous: dict[str, float] = {}   # the gap before it
        self.loss: float | None = None         # the newest loss
        self.mean_loss: float | None = None    # its running mean, before the newest

    def observe(self, gaps: Mapping[str, float], loss: float | None) -> None:
        """Record one step's measurements (in place)."""
        for g, value in gaps.items():
            if g in self.progress:
                if g in self.gaps:
                    self.previous[g] = self.gaps[g]
                self.gaps[g] = float(value)
        if loss is not None and math.isfinite(loss):
            if self.loss is not None:
                m = self.options["loss_momentum"]
                self.mean_loss = self.loss if self.mean_loss is None else m * self.mean_loss + (1 - m) * self.loss
            self.loss = float(loss)

    def advance(self, u: float) -> None:
        """Move every group's progress to local step u = t − start (in place)."""
        if u >= self.q and u >= 0:  # also Q = 0: abrupt from the start
            self.progress = {g: 1.0 for g in self.groups}
            return
        if u <= 0:
            return
        tol = self.options["tolerance"]
        loss_rose = self.mean_loss is not None and self.loss > self.mean_loss * (1 + tol)
        deadline = max(0.0, (u - self.q / 2) / (self.q / 2))
        for g in self.groups:
            gap, before = self.gaps.get(g), self.previous.get(g)
            if loss_rose or (gap is not None and before is not None and gap > before * (1 + tol)):
                rate = 0.0
            elif gap is not None and gap < self.options["track"]:
                rate = self.options["fast"]
            else:
                rate = 1.0
            self.progress[g] = min(1.0, max(self.progress[g] + rate / self.q, deadline))

    def betas(self) -> list[float]:
        return [1.0 - self.progress[g] for g in self.groups]

    def state_dict(self) -> dict[str, Any]:
        return {"progress": dict(self.progress), "gaps": dict(self.gaps), "previous": dict(self.previous),
                "loss": self.loss, "mean_loss": self.mean_loss}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        try:
            self.progress = {g: float(state["progress"][g]) for g in self.groups}
            self.gaps, self.previous = dict(state["gaps"]), dict(state["previous"])
            self.loss, self.mean_loss = state["loss"], state["mean_loss"]
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"adaptive schedule state lacks {exc}: pass what BetaSchedule.state_dict() returned") from None
