"""The curves: one β for every group, as a function of u = t − start on 0 ≤ u < Q.

    linear      β = 1 − u/Q                               (the paper)
    cosine      β = ½·(1 + cos(π·u/Q))
    exp         β = β_end^(u/Q)    (β(Q) = β_end, 1e-3 by default), then 0
    step        β = 1 − ⌊n·u/Q⌋/n  (holds at 1, then n equal stairs down to 0 at Q)

Each registers itself (`register_curve`); `curve_beta` adds the ends: β = 1 before the
transition, exactly 0 from Q on, so Q = 0 is abrupt compression.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError
from .checks import check_steps, check_t
from .registry import check_curve_options, curve_beta, register_curve

__all__ = ["linear_beta", "cosine_beta", "exp_beta", "step_beta"]


def _beta_end_in_open_unit(options: dict[str, Any]) -> dict[str, Any]:
    b = options["beta_end"]
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0.0 < b < 1.0:
        raise ConfigError(
            f"beta_end (β reached at the end of an exp transition) must lie in (0, 1), "
            f"got {b!r}; e.g. beta_end=1e-3"
        )
    return {**options, "beta_end": float(b)}


def _whole_stairs(options: dict[str, Any]) -> dict[str, Any]:
    n = options["n_steps"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"n_steps (stairs of a step schedule) must be an integer ≥ 1, got {n!r}")
    return options


@register_curve("linear")
def _linear(u: float, q: float) -> float:
    return 1.0 - u / q


@register_curve("cosine")
def _cosine(u: float, q: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * u / q))


@register_curve("exp", defaults={"beta_end": 1e-3}, check=_beta_end_in_open_unit)
def _exp(u: float, q: float, beta_end: float) -> float:
    # β = exp(−λu) with λ = −ln(β_end)/Q, so that β(Q) = β_end
    return beta_end ** (u / q)


@register_curve("step", defaults={"n_steps": 4}, check=_whole_stairs)
def _step(u: float, q: float, n_steps: int) -> float:
    return (n_steps - math.floor(n_steps * u / q)) / n_steps


# ── pure curves (public) ────────────────────────────────────────────────────────────────────


def _at(name: str, t: float, transition: int, start: int, **options: Any) -> float:
    t, q, s = check_t(t), check_steps("transition", transition), check_steps("start", start)
    return curve_beta(name, t - s, q, check_curve_options(name, options))


def linear_beta(t: float, transition: int, *, start: int = 0) -> float:
    """β at step t of the paper's linear schedule, β = max(1 − (t − start)/Q, 0) (pure).

    Example:
        >>> linear_beta(25, 100)
        0.75
    """
    return _at("linear", t, transition, start)


def cosine_beta(t: float, transition: int, *, start: int = 0) -> float:
    """β at step t of a cosine schedule, ½·(1 + cos(π·u/Q)), then 0 (pure).

    Example:
        >>> cosine_beta(50, 100)
        0.5
    """
    return _at("cosine", t, transition, start)


def exp_beta(t: float, transition: int, *, start: int = 0, beta_end: float = 1e-3) -> float:
    """β at step t of an exponential schedule: β_end^(u/Q), reaching β_end at Q, then 0 (pure).

    Example:
        >>> round(exp_beta(50, 100, beta_end=0.01), 6)
        0.1
    """
    return _at("exp", t, transition, start, beta_end=beta_end)


def step_beta(t: float, transition: int, *, start: int = 0, n_steps: int = 4) -> float:
    """β at step t of a staircase: holds at 1, then drops by 1/n every Q/n steps, 0 at Q (pure).

    Example:
        >>> [step_beta(t, 100) for t in (0, 24, 25, 75, 100)]
        [1.0, 1.0, 0.75, 0.25, 0.0]
    """
    return _at("step", t, transition, start, n_steps=n_steps)
