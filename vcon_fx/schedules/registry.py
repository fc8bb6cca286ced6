"""The schedule registry: every kind of β schedule registers itself under its name.

A *curve* (linear, cosine, …) gives every group the same β; it registers its shape on the open
transition 0 ≤ u < Q with `register_curve`, and `curve_beta` adds the ends (1 before, exactly 0
from Q on). A kind that gives each group its own β (staggered) registers a `betas` function with
`register_schedule`. Adding a schedule = one decorated function in a file of this folder, its
import in `schedule.py`, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError

__all__ = [
    "ScheduleKind",
    "register_curve",
    "register_schedule",
    "register_controller",
    "registered_schedules",
    "registered_curves",
    "schedule_kind",
    "check_kind",
    "check_curve_options",
    "curve_beta",
]

Options = Mapping[str, Any]


@dataclass(frozen=True)
class ScheduleKind:
    """One registered kind of schedule.

    Attributes:
        name: what users write (`schedule="cosine"`, `--schedule cosine`).
        betas: (u, Q, n_groups, checked options) → β of each group at local time u = t − start.
        check_options: the options a user gave → the options with defaults filled in, checked
            (raises ConfigError); the result is what `BetaSchedule.state_dict` records.
        shape: curves only: β on the open transition, `shape(u, Q, **options)`.
        defaults: curves only: the options the curve takes, with their defaults.
        check_values: curves only: checks the values of the options (defaults filled in) and
            returns them normalised.
    """

    name: str
    betas: Callable[[float, float, int, Options], list[float]]
    check_options: Callable[[Options], dict[str, Any]]
    shape: Callable[..., float] | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    check_values: Callable[[dict[str, Any]], dict[str, Any]] = dict
    controller: type | None = None  # schedules that read what training measured (adaptive)


_KINDS: dict[str, ScheduleKind] = {}


def register_curve(name: str, *, defaults: Options | None = None,
                   check: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
    """Decorator: register `shape(u, q, **options)` (β on 0 ≤ u < q) as the curve `name`.

    Args:
        name: the schedule's name.
        defaults: the options the curve takes, with their defaults (none by default).
        check: validates the options (defaults filled in) and returns them normalised.
    """
    def wrap(shape: Callable[..., float]) -> Callable[..., float]:
        def betas(u: float, q: float, n_groups: int, options: Options) -> list[float]:
            return [curve_beta(name, u, q, options)] * n_groups

        _add(ScheduleKind(name, betas, lambda options: check_curve_options(name, options), shape,
                          dict(defaults or {}), check or dict))
        return shape

    return wrap


def register_schedule(name: str, *, check_options: Callable[[Options], dict[str, Any]]):
    """Decorator: register `betas(u, q, n_groups, options)` (β per group) as the schedule `name`."""
    def wrap(betas: Callable[[float, float, int, Options], list[float]]):
        _add(ScheduleKind(name, betas, check_options))
        return betas

    return wrap


def register_controller(name: str, *, check_options: Callable[[Options], dict[str, Any]]):
    """Decorator: register a class as the schedule `name` whose β follows what training measures.

    The class is built as `cls(groups, transition, options)` and has `observe(gaps, loss)`,
    `advance(u)`, `betas()`, `state_dict()` and `load_state_dict(state)`.
    """
    def wrap(cls: type) -> type:
        def betas(u: float, q: float, n_groups: int, options: Options) -> list[float]:
            raise ConfigError(f"schedule {name!r} depends on what fine-tuning measures: only its current β is known")
        _add(ScheduleKind(name, betas, check_options, controller=cls))
        return cls
    return wrap


def _add(kind: ScheduleKind) -> None:
    if kind.name in _KINDS:
        raise ConfigError(f"schedule {kind.name!r} is registered twice: give the new one another name")
    _KINDS[kind.name] = kind


def registered_schedules() -> tuple[str, ...]:
    """The name of every registered schedule, in registration order."""
    return tuple(_KINDS)


def registered_curves() -> tuple[str, ...]:
    """The schedules that are one curve for every group (what staggered can run per group)."""
    return tuple(name for name, kind in _KINDS.items() if kind.shape is not None)


def check_kind(kind: Any, valid: tuple[str, ...] | None = None, what: str = "schedule") -> str:
    """`kind` when it is one of `valid` (default: every registered schedule).

    Raises:
        ConfigError: naming the choices.
    """
    valid = registered_schedules() if valid is None else valid
    if kind not in valid:
        raise ConfigError(f"unknown {what} {kind!r}; choose one of {', '.join(valid)}")
    return kind


def schedule_kind(name: str) -> ScheduleKind:
    """The registered kind `name`. Raises ConfigError naming the choices."""
    return _KINDS[check_kind(name)]


def check_curve_options(name: str, options: Options) -> dict[str, Any]:
    """The options of the curve `name`, defaults filled in; rejects unknown or invalid ones.

    Raises:
        ConfigError: an option the curve does not take, or a value its check refuses.
    """
    kind = _KINDS[name]
    defaults = kind.defaults
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = ", ".join(defaults) if defaults else "none"
        raise ConfigError(f"schedule {name!r} has no option {unknown[0]!r}; its options are: {valid}")
    return kind.check_values({**defaults, **options})


def curve_beta(name: str, u: float, q: float, options: Options) -> float:
    """β of the curve `name` at local time u = t − start: 1 before, exactly 0 from Q on (pure)."""
    if u < 0:
        return 1.0
    if u >= q:  # also covers q = 0: abrupt
        return 0.0
    return min(1.0, max(0.0, _KINDS[name].shape(u, q, **options)))
