"""Staggered: groups take turns, input side first, each running its own curve.

Group g of G runs the curve (linear by default) over the window [g·s, g·s + w], with stride
s = w·(1 − overlap) and w·(1 + (G−1)(1−overlap)) = Q, so the last window ends at Q.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import ConfigError
from .checks import check_steps, check_t
from .registry import check_curve_options, check_kind, curve_beta, register_schedule, registered_curves, schedule_kind

__all__ = ["staggered_betas"]


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """overlap, curve and the curve's options, defaults filled in."""
    options = dict(options)
    overlap = options.pop("overlap", 0.0)
    curve = options.pop("curve", "linear")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise ConfigError(
            f"overlap (fraction of a group's window shared with the next) must lie in [0, 1), "
            f"got {overlap!r}"
        )
    check_kind(curve, registered_curves(), what="curve for staggered")
    try:
        curve_options = check_curve_options(curve, options)
    except ConfigError as e:
        valid = ", ".join(["overlap", "curve", *schedule_kind(curve).defaults])
        raise ConfigError(f"{e} (staggered accepts: {valid})") from None
    return {"overlap": float(overlap), "curve": curve, **curve_options}


@register_schedule("staggered", check_options=_check_options)
def _staggered(u: float, q: float, n_groups: int, options: Mapping[str, Any]) -> list[float]:
    curve_options = dict(options)
    overlap, curve = curve_options.pop("overlap"), curve_options.pop("curve")
    # window width w and stride s = w·(1 − overlap); the last window ends at Q:
    # (G − 1)·s + w = Q
    width = q / ((n_groups - 1) * (1.0 - overlap) + 1.0)
    stride = width * (1.0 - overlap)
    betas = [curve_beta(curve, u - g * stride, width, curve_options) for g in range(n_groups)]
    # Every group is exactly 0 once the whole transition has ended, whatever the rounding.
    return [0.0 if u >= q else b for b in betas]


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
    t, q, s = check_t(t), check_steps("transition", transition), check_steps("start", start)
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ConfigError(f"n_groups must be an integer ≥ 1, got {n_groups!r}")
    options = _check_options({"overlap": overlap, "curve": curve, **curve_options})
    return _staggered(t - s, q, n_groups, options)
