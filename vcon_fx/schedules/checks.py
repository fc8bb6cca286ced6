"""Checks shared by every schedule: whole numbers of steps and the step t (pure)."""

from __future__ import annotations

import math
from typing import Any

from ..errors import ConfigError

__all__ = ["check_steps", "check_t"]


def check_steps(name: str, value: Any) -> int:
    """A non-negative whole number of steps (integral floats accepted).

    Raises:
        ConfigError: not a number, fractional, negative or not finite.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a whole number of steps ≥ 0, got {value!r}")
    if not math.isfinite(value) or value != int(value) or value < 0:
        hint = " (Q = 0 means abrupt compression)" if name == "transition" else ""
        raise ConfigError(f"{name} must be a whole number of steps ≥ 0{hint}, got {value!r}")
    return int(value)


def check_t(t: Any) -> float:
    """A step t ≥ 0 (fractions allowed: curves are defined between steps).

    Raises:
        ConfigError: not a finite number ≥ 0.
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ConfigError(f"step t must be a number ≥ 0, got {t!r}")
    return t
