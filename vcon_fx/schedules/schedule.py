"""β schedules: how the dense contribution vanishes, per optimizer step.

Every curve is a pure function of the step t and the transition length Q (in steps), with
β = 1 before the transition starts and β = 0 exactly once it has ended:

    linear      β = max(1 − u/Q, 0)                       (the paper)
    cosine      β = ½·(1 + cos(π·u/Q))
    exp         β = β_end^(u/Q)    (β(Q) = β_end, 1e-3 by default), then 0
    step        β = 1 − ⌊n·u/Q⌋/n  (holds at 1, then n equal stairs down to 0 at Q)
    staggered   groups take turns, input side first: group g of G runs its own
                curve (linear by default) over [g·s, g·s + w], with w·(1 + (G−1)(1−overlap)) = Q

where u = t − start. Q = 0 is abrupt compression (the baseline): β = 0 from step `start` on.
`BetaSchedule` applies a curve to a model through `set_beta`, the only writer of β.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping

from torch import nn

from ..errors import ConfigError, StageError
from ..graph.blend import blend_modules, get_betas, set_beta

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
]

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "exp", "step", "staggered")

# Fraction of the fine-tuning steps spent in transition, as in the authors' runs.
_TRANSITION_FRACTION = 0.2
_STATE_VERSION = 1


# ── curve shapes on the open transition 0 ≤ u < q (q > 0); `_curve` handles the ends ──────


def _linear(u: float, q: float) -> float:
    return 1.0 - u / q


def _cosine(u: float, q: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * u / q))


def _exp(u: float, q: float, beta_end: float) -> float:
    # β = exp(−λu) with λ = −ln(β_end)/Q, so that β(Q) = β_end
    return beta_end ** (u / q)


def _step(u: float, q: float, n_steps: int) -> float:
    return (n_steps - math.floor(n_steps * u / q)) / n_steps


_SHAPES: dict[str, Callable[..., float]] = {
    "linear": _linear,
    "cosine": _cosine,
    "exp": _exp,
    "step": _step,
}

# Options each kind accepts, with their defaults.
_CURVE_DEFAULTS: dict[str, dict[str, Any]] = {
    "linear": {},
    "cosine": {},
    "exp": {"beta_end": 1e-3},
    "step": {"n_steps": 4},
}


def _curve(kind: str, u: float, q: float, options: Mapping[str, Any]) -> float:
    """β on local time u = t − start: 1 before the transition, exactly 0 from its end on."""
    if u < 0:
        return 1.0
    if u >= q:  # also covers q = 0: abrupt
        return 0.0
    return min(1.0, max(0.0, _SHAPES[kind](u, q, **options)))


def _staggered(
    u: float, q: int, n_groups: int, overlap: float, curve: str, options: Mapping[str, Any]
) -> list[float]:
    # window width w and stride s = w·(1 − overlap); the last window ends at Q:
    # (G − 1)·s + w = Q
    width = q / ((n_groups - 1) * (1.0 - overlap) + 1.0)
    stride = width * (1.0 - overlap)
    betas = [_curve(curve, u - g * stride, width, options) for g in range(n_groups)]
    # Every group is exactly 0 once the whole transition has ended, whatever the rounding.
    return [0.0 if u >= q else b for b in betas]


# ── validation ──────────────────────────────────────────────────────────────────────────────


def _check_steps(name: str, value: Any) -> int:
    """A non-negative whole number of steps (integral floats accepted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a whole number of steps ≥ 0, got {value!r}")
    if not math.isfinite(value) or value != int(value) or value < 0:
        hint = " (Q = 0 means abrupt compression)" if name == "transition" else ""
        raise ConfigError(f"{name} must be a whole number of steps ≥ 0{hint}, got {value!r}")
    return int(value)


def _check_t(t: Any) -> float:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ConfigError(f"step t must be a number ≥ 0, got {t!r}")
    return t


def _check_kind(kind: Any, valid: tuple[str, ...] = SCHEDULES, what: str = "schedule") -> str:
    if kind not in valid:
        raise ConfigError(f"unknown {what} {kind!r}; choose one of {', '.join(valid)}")
    return kind


def _check_curve_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a single curve, defaults filled in; rejects unknown or invalid ones."""
    defaults = _CURVE_DEFAULTS[kind]
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ConfigError(
            f"schedule {kind!r} has no option {unknown[0]!r}; its options are: {valid}"
        )
    resolved = {**defaults, **options}
    if kind == "exp":
        b = resolved["beta_end"]
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b < 1.0:
            raise ConfigError(
                f"beta_end (β reached at the end of an exp transition) must lie in (0, 1), "
                f"got {b!r}; e.g. beta_end=1e-3"
            )
        resolved["beta_end"] = float(b)
    if kind == "step":
        n = resolved["n_steps"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"n_steps (stairs of a step schedule) must be an integer ≥ 1, got {n!r}")
    return resolved


def _check_options(kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Options for any kind, defaults filled in (staggered: overlap, curve, curve's options)."""
    if kind != "staggered":
        return _check_curve_options(kind, options)
    options = dict(options)
    overlap = options.pop("overlap", 0.0)
    curve = options.pop("curve", "linear")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise ConfigError(
            f"overlap (fraction of a group's window shared with the next) must lie in [0, 1), "
            f"got {overlap!r}"
        )
    _check_kind(curve, tuple(_SHAPES), what="curve for staggered")
    try:
        curve_options = _check_curve_options(curve, options)
    except ConfigError as e:
        valid = ", ".join(["overlap", "curve", *_CURVE_DEFAULTS[curve]])
        raise ConfigError(f"{e} (staggered accepts: {valid})") from None
    return {"overlap": float(overlap), "curve": curve, **curve_options}


# ── pure curves (public) ────────────────────────────────────────────────────────────────────


def linear_beta(t: float, transition: int, *, start: int = 0) -> float:
    """β at step t of the paper's linear schedule, β = max(1 − (t − start)/Q, 0) (pure).

    Example:
        >>> linear_beta(25, 100)
        0.75
    """
    t, q, s = _check_t(t), _check_steps("transition", transition), _check_steps("start", start)
    return _curve("linear", t - s, q, {})


def cosine_beta(t: float, transition: int, *, start: int = 0) -> float:
    """β at step t of a cosine schedule, ½·(1 + cos(π·u/Q)), then 0 (pure).

    Example:
        >>> cosine_beta(50, 100)
        0.5
    """
    t, q, s = _check_t(t), _check_steps("transition", transition), _check_steps("start", start)
    return _curve("cosine", t - s, q, {})


def exp_beta(t: float, transition: int, *, start: int = 0, beta_end: float = 1e-3) -> float:
    """β at step t of an exponential schedule: β_end^(u/Q), reaching β_end at Q, then 0 (pure).

    Example:
        >>> round(exp_beta(50, 100, beta_end=0.01), 6)
        0.1
    """
    t, q, s = _check_t(t), _check_steps("transition", transition), _check_steps("start", start)
    return _curve("exp", t - s, q, _check_curve_options("exp", {"beta_end": beta_end}))


def step_beta(t: float, transition: int, *, start: int = 0, n_steps: int = 4) -> float:
    """β at step t of a staircase: holds at 1, then drops by 1/n every Q/n steps, 0 at Q (pure).

    Example:
        >>> [step_beta(t, 100) for t in (0, 24, 25, 75, 100)]
        [1.0, 1.0, 0.75, 0.25, 0.0]
    """
    t, q, s = _check_t(t), _check_steps("transition", transition), _check_steps("start", start)
    return _curve("step", t - s, q, _check_curve_options("step", {"n_steps": n_steps}))


def staggered_betas(
    t: float,
    transition: int,
    n_groups: int,
    *,
    start: int = 0,
    overlap: float = 0.0,
    curve: str = "linear",
    **curve_options: Any,
) -> list[float]:
    """β of each of `n_groups` groups at step t, input side first; groups take turns (pure).

    With no overlap, group g's transition occupies [g·Q/G, (g+1)·Q/G]; `overlap` in [0, 1)
    is the fraction of a window shared with the next one (windows widen, all end by Q).

    Example:
        >>> staggered_betas(25, 100, 2)
        [0.5, 1.0]
    """
    t, q, s = _check_t(t), _check_steps("transition", transition), _check_steps("start", start)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ConfigError(f"n_groups must be an integer ≥ 1, got {n_groups!r}")
    opts = _check_options("staggered", {"overlap": overlap, "curve": curve, **curve_options})
    overlap, curve = opts.pop("overlap"), opts.pop("curve")
    return _staggered(t - s, q, n_groups, overlap, curve, opts)


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
        if self.kind == "staggered":
            opts = dict(self.options)
            overlap, curve = opts.pop("overlap"), opts.pop("curve")
            values = _staggered(u, self.transition, len(self.groups), overlap, curve, opts)
        else:
            values = [_curve(self.kind, u, self.transition, self.options)] * len(self.groups)
        return dict(zip(self.groups, values))

    def step(self) -> dict[str, float]:
        """Advance one optimizer step and set β in place; returns the new β per group."""
        self.t += 1
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
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved schedule in place and set β for its step.

        Raises:
            ConfigError: the state is malformed, from a newer version, or for other groups.
        """
        kind, transition, start, options, t = _parse_state(state, self.groups)
        self.kind, self.transition, self.start, self.options, self.t = (
            kind, transition, start, options, t,
        )
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
