"""β schedules: how the dense contribution vanishes, per optimizer step.

Every schedule is a pure function of the step t and the transition length Q (in steps), with
β = 1 before the transition starts and β = 0 exactly once it has ended (u = t − start):

    linear, cosine, exp, step    one curve for every group                 (curves.py)
    staggered                    groups take turns, input side first      (staggered.py)
    adaptive                     each group as fast as its twin tracks    (adaptive.py: reads the
                                 gaps and loss fine-tuning measures, `observe`)

Each kind registers itself by name (`registry.py`); Q = 0 is abrupt compression (the baseline):
β = 0 from step `start` on. `BetaSchedule` applies a schedule to a model through `set_beta`, the
only writer of β.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError, StageError
from ..graph.blend import blend_modules, get_betas, set_beta
from .checks import check_steps as _check_steps, check_t as _check_t
from .registry import check_kind as _check_kind, registered_schedules, schedule_kind
# Importing a schedule's file registers it: a new schedule is one file, imported here.
from .curves import cosine_beta, exp_beta, linear_beta, step_beta
from .staggered import staggered_betas
from .adaptive import AdaptiveController

__all__ = [
    "SCHEDULES",
    "BetaSchedule",
    "make_schedule",
    "default_transition",
    "linear_beta",
    "cosine_beta",
    "exp_beta",
    "step_beta",
    "staggered_betas",
    "AdaptiveController",
]

logger = logging.getLogger(__name__)

# The registered names, in order (the CLI's --schedule choices).
SCHEDULES = registered_schedules()

# Fraction of the fine-tuning steps spent in transition, as in the authors' runs.
_TRANSITION_FRACTION = 0.2
_STATE_VERSION = 1


def _check_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options for any kind, defaults filled in and checked."""
    return schedule_kind(kind).check_options(options)


def default_transition(total_steps: int) -> int:
    """The authors' transition length: 20% of the fine-tuning steps, rounded (pure).

    Example:
        >>> default_transition(1000)
        200
    """
    total = _check_steps("total_steps", total_steps)
    return round(total * _TRANSITION_FRACTION)


def _parse_state(state: Any, groups: list[str]) -> tuple[str, int, int, dict[str, Any], int]:
    """Validate a saved schedule state against the model's groups."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"a schedule state must be a dict, got {type(state).__name__}")
    missing = [k for k in ("kind", "transition", "start", "options", "t") if k not in state]
    if missing:
        raise ConfigError(
            f"schedule state is missing {', '.join(missing)}; pass what "
            f"BetaSchedule.state_dict() returned"
        )
    version = state.get("version", _STATE_VERSION)
    if version != _STATE_VERSION:
        raise ConfigError(
            f"schedule state has version {version!r}, this vcon-fx reads version "
            f"{_STATE_VERSION}; upgrade vcon-fx"
        )
    saved = list(state.get("groups", groups))
    if saved != groups:
        raise ConfigError(
            f"schedule state is for groups {saved[:8]}, but the model has {groups[:8]}; "
            f"load it into the model it was saved with"
        )
    kind = _check_kind(state["kind"])
    if not isinstance(state["options"], Mapping):
        raise ConfigError(f"schedule state options must be a dict, got {state['options']!r}")
    return (
        kind,
        _check_steps("transition", state["transition"]),
        _check_steps("start", state["start"]),
        _check_options(kind, state["options"]),
        _check_steps("t", state["t"]),
    )


# ── the stateful schedule ───────────────────────────────────────────────────────────────────


class BetaSchedule:
    """Drives β of every blend group of a model, one optimizer step at a time.

    Construction sets β for step 0 (so Q = 0 compresses abruptly right away); call `step()`
    after each `optimizer.step()`.

    Args:
        model: a model holding Blend modules (from `vcon_fx.transform`); DDP wrappers are fine.
        kind: one of SCHEDULES.
        transition: Q, the length of the transition in optimizer steps (0: abrupt).
        start: the step at which the transition begins (β = 1 before it).
        **options: exp: `beta_end`; step: `n_steps`; staggered: `overlap`, `curve` and that
            curve's options.

    Raises:
        ConfigError: unknown kind or option, negative transition or start, bad option value.
        StageError: the model has no Blend modules.

    Example:
        >>> from vcon_fx.graph.blend import Blend
        >>> vcon_model = nn.Sequential(Blend(nn.Linear(4, 4), nn.Linear(4, 4), group="fc"))
        >>> sched = BetaSchedule(vcon_model, "linear", transition=4)
        >>> for _ in range(2):  # in a training loop: right after optimizer.step()
        ...     betas = sched.step()
        >>> betas
        {'fc': 0.5}
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "linear",
        *,
        transition: int,
        start: int = 0,
        **options: Any,
    ):
        self.model = model
        self.kind = _check_kind(kind)
        self.transition = _check_steps("transition", transition)
        self.start = _check_steps("start", start)
        self.options = _check_options(self.kind, options)
        self.groups = list(blend_modules(model))
        if not self.groups:
            raise StageError(
                f"{type(model).__name__} has no Blend modules, so there is no β to schedule; "
                f"run vcon_fx.transform on it first"
            )
        self.t = 0
        factory = schedule_kind(self.kind).controller
        self.controller = factory(self.groups, self.transition, self.options) if factory else None
        if self.controller is not None:
            self.controller.advance(self.t - self.start)
        self._apply()
        logger.debug(
            "β schedule %s over %d groups: Q=%d from step %d, options %s",
            self.kind, len(self.groups), self.transition, self.start, self.options,
        )

    @property
    def end(self) -> int:
        """The first step at which every group's β is 0."""
        return self.start + self.transition

    @property
    def done(self) -> bool:
        """Whether the transition has ended (β = 0 everywhere; the model can be vanished)."""
        return self.t >= self.end

    @property
    def betas(self) -> dict[str, float]:
        """β of every group at the current step (pure)."""
        return self.beta_at(self.t)

    def beta_at(self, t: float) -> dict[str, float]:
        """β of every group at step t, without changing anything (pure).

        Raises:
            ConfigError: t is negative or not a number.
        """
        u = _check_t(t) - self.start
        if self.controller is not None and t == self.t:
            return dict(zip(self.groups, self.controller.betas()))
        values = schedule_kind(self.kind).betas(u, self.transition, len(self.groups), self.options)
        return dict(zip(self.groups, values))

    @property
    def wants_feedback(self) -> bool:
        """Whether β follows what training measures (call `observe` before each `step`)."""
        return self.controller is not None

    def observe(self, gaps: Mapping[str, float], loss: float | None) -> None:
        """Give an adaptive schedule this step's per-group gaps and loss (in place; others ignore it)."""
        if self.controller is not None:
            self.controller.observe(gaps, loss)

    def step(self) -> dict[str, float]:
        """Advance one optimizer step and set β in place; returns the new β per group."""
        self.t += 1
        if self.controller is not None:
            self.controller.advance(self.t - self.start)
        return self._apply()

    def _apply(self) -> dict[str, float]:
        betas = self.beta_at(self.t)
        current = get_betas(self.model)
        # Write only what changed: after the transition, steps cost no buffer writes.
        changed = {g: b for g, b in betas.items() if current.get(g) != b}
        if changed:
            set_beta(self.model, changed)
        return betas

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as JSON-able values (pure)."""
        return {
            "version": _STATE_VERSION,
            "kind": self.kind,
            "transition": self.transition,
            "start": self.start,
            "options": dict(self.options),
            "groups": list(self.groups),
            "t": self.t,
        } | ({"controller": self.controller.state_dict()} if self.controller is not None else {})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved schedule in place and set β for its step.

        Raises:
            ConfigError: the state is malformed, from a newer version, or for other groups.
        """
        kind, transition, start, options, t = _parse_state(state, self.groups)
        self.kind, self.transition, self.start, self.options, self.t = (
            kind, transition, start, options, t,
        )
        factory = schedule_kind(kind).controller
        self.controller = factory(self.groups, transition, options) if factory else None
        if self.controller is not None:
            self.controller.load_state_dict(state.get("controller") or {})
        self._apply()

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: Mapping[str, Any]) -> "BetaSchedule":
        """A schedule for `model` resumed from `state`; sets β in place for its step.

        Raises:
            ConfigError: the state is malformed, from a newer version, or for other groups.
            StageError: the model has no Blend modules.
        """
        kind, transition, start, options, _ = _parse_state(state, list(blend_modules(model)))
        sched = cls(model, kind, transition=transition, start=start, **options)
        sched.load_state_dict(state)
        return sched

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return (
            f"BetaSchedule({self.kind!r}, transition={self.transition}, start={self.start}"
            f"{opts}, t={self.t}, groups={len(self.groups)})"
        )


def make_schedule(
    name: str, model: nn.Module, *, transition: int, start: int = 0, **options: Any
) -> BetaSchedule:
    """A `BetaSchedule` of kind `name` for `model` (sets β for step 0 in place).

    Raises:
        ConfigError: `name` is not one of SCHEDULES, or a parameter is invalid.

    Example:
        >>> from vcon_fx.graph.blend import Blend
        >>> vcon_model = nn.Sequential(Blend(nn.Linear(4, 4), nn.Linear(4, 4), group="fc"))
        >>> make_schedule("cosine", vcon_model, transition=200)
        BetaSchedule('cosine', transition=200, start=0, t=0, groups=1)
    """
    return BetaSchedule(model, _check_kind(name), transition=transition, start=start, **options)
