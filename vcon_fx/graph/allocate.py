"""`--allocate`: the given ratio / sparsity / bits as one budget for all the selected layers, spread by sensitivity.

`plan` calls `allocate_plans` once the layers are planned uniformly and the calibration statistics
(with XᵀX) are gathered. Each measurable layer (a Linear / Conv1d / Conv2d with statistics, not
tied to another) gets one setting of its method's candidate set (methods/allocation.py), chosen by
methods/budget.py so that the layers together hold no more than the uniform setting asks, nor more
than it would hold: parameters (quant: weight bits; `--allocate flops`: FLOPs, low-rank only). Its
plan then records the setting and the measured error (`detail["allocated"]`, `detail["error"]`):
the recipe keeps the plans, so a saved model rebuilds with the same per-layer settings without the
data. Other layers keep the uniform setting and are left out of the budget.
"""

from __future__ import annotations

import logging

from ..errors import ConfigError
from ..methods.allocation import Option, layer_budget, layer_options, measurable, space_for
from ..methods.base import LayerPlan, LayerSite, MethodConfig
from ..methods.budget import Infeasible, spread
from .select import Selection

__all__ = ["allocate_plans", "check_allocation"]

log = logging.getLogger(__name__)


def check_allocation(config: MethodConfig, calibration, unit: str | None) -> None:
    """Refuse `--allocate` before any work when it cannot run: no calibration data (the error is measured on
    it), or a method / setting it does not spread (pure).

    Raises:
        ConfigError: naming the flag to give or drop.
    """
    if not unit:
        return
    space_for(config, unit)
    if calibration is None:
        raise ConfigError("--allocate measures each layer's output error on calibration data: give "
                          "--calibration-data FILE (calibration= in Python), or drop --allocate")


def allocate_plans(config: MethodConfig, plans: dict[str, LayerPlan], sites: dict[str, LayerSite],
                   selection: Selection, unit: str) -> list[str]:
    """Give every measurable selected layer its setting within the uniform setting's budget (in place on `plans`).

    Args:
        config: the method config as planned (its `init` settled), holding the uniform setting.
        plans: layer path → its uniform plan; the allocated layers' are replaced.
        sites: the layers with their calibration statistics (XᵀX included).
        selection: the groups; tied layers keep the uniform setting.
        unit: "params" or "flops".

    Returns:
        The notes to show: what was spread, and which layers were left out of it.

    Raises:
        ConfigError: a method or setting that cannot be spread, or a budget below what the most
            compressed setting of every layer holds.
    """
    space = space_for(config, unit)
    tied = set(selection.ties) | set(selection.ties.values())
    paths = [p for g in selection.groups for p in g.layers]
    chosen = [p for p in paths if p not in tied and measurable(sites[p])]
    left_out = [p for p in paths if p not in chosen]
    options = {}
    for path in chosen:
        measured = layer_options(config, space, sites[path], unit)
        if len(measured) > 1:
            options[path] = measured
        else:  # nothing to choose between (every setting skipped but one)
            left_out.append(path)
    if not options:
        raise ConfigError(f"--allocate found no layer to measure among {len(paths)} selected (it measures Linear, "
                          "Conv1d and Conv2d layers on their calibration inputs); drop --allocate")
    budget = sum(layer_budget(space, config, plans[p], unit) for p in options)
    try:
        picks = spread(options, budget)
    except Infeasible as exc:
        raise ConfigError(_infeasible(config, space.field, exc.least, budget, unit)) from None
    for path, index in picks.items():
        plans[path] = _recorded(options[path][index], options[path][0])
    total = sum(options[p][i].cost for p, i in picks.items())
    return [_summary(space.field, getattr(config, space.field), unit, total, budget, options, picks)] + \
        ([f"--allocate left {len(left_out)} layer(s) at the uniform setting (no XᵀX to measure on, tied, or one "
          f"setting only): {', '.join(left_out[:4])}{' …' if len(left_out) > 4 else ''}"] if left_out else [])


def _recorded(option: Option, dense: Option) -> LayerPlan:
    """The chosen option's plan, carrying the setting and its measured error."""
    plan = option.plan
    if option.label == "dense":
        plan.skip_reason = (f"kept dense by --allocate: its output error grows fastest per unit saved "
                            f"(at its mildest setting: {dense.error:.3g})")
    plan.detail = {**plan.detail, "allocated": option.label, "error": round(option.error, 5)}
    return plan


def _summary(field: str, value, unit: str, total: float, budget: float, options, picks) -> str:
    what = {"flops": "FLOPs", "params": "weight bits" if field == "bits" else "parameters"}[unit]
    counts: dict[str, int] = {}
    for path, index in picks.items():
        label = options[path][index].label
        counts[label] = counts.get(label, 0) + 1
    spread_text = ", ".join(f"{n}× {label}" for label, n in sorted(counts.items()))
    return (f"allocation: {len(picks)} layer(s) hold {total:,.0f} {what} of a {budget:,.0f} budget "
            f"(uniform {field} {value}), spread by output error on the calibration data: {spread_text}")


def _infeasible(config: MethodConfig, field: str, least: float, budget: float, unit: str) -> str:
    value = getattr(config, field)
    needed = {"ratio": f"--ratio of at least {float(value) * least / budget:.3g}",
              "sparsity": "a lower --sparsity", "bits": "more --bits"}[field]
    return (f"--allocate cannot meet the budget of {field} {value}: even the most compressed setting of every layer "
            f"holds {least:,.0f} {unit}, over the {budget:,.0f} budget; give {needed}, or drop --allocate")
