"""`--allocate`: the given ratio / sparsity / bits as one budget for all the selected layers, spread by sensitivity.

`plan` calls `calibrate_and_allocate` once the layers are planned uniformly: one pass of the
calibration data gathers every selected layer's statistics (XᵀX included). Each measurable layer
(a Linear / Conv1d / Conv2d with statistics, not tied to another) gets one setting of its method's
candidate set, each candidate's own output error read off XᵀX (methods/allocation.py) and turned
into the model's output error it predicts by the layer's gain, measured end to end at the uniform
setting (sensitivity.py). methods/budget.py then spends the budget: the layers together hold no
more than the uniform setting asks, nor more than it would hold: parameters (quant: weight bits;
`--allocate flops`: FLOPs, low-rank only). Each plan records the setting, the layer's error and
the predicted model error (`detail["allocated"]`, `["error"]`, `["model_error"]`):
the recipe keeps the plans, so a saved model rebuilds with the same per-layer settings without the
data. Other layers keep the uniform setting and are left out of the budget.
"""

from __future__ import annotations

import logging

from torch import fx

from ..errors import ConfigError
from ..methods.allocation import Option, layer_budget, layer_options, measurable, space_for
from ..methods.base import LayerPlan, LayerSite, MethodConfig
from ..methods.budget import Infeasible, spread
from .calibrate import with_statistics
from .select import Selection
from .sensitivity import layer_gains, predicted
from .statistics import BATCH, _batch_size, calibration_batches, gather_statistics

__all__ = ["calibrate_and_allocate", "check_allocation"]

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


def calibrate_and_allocate(gm: fx.GraphModule, config: MethodConfig, plans: dict[str, LayerPlan],
                           sites: dict[str, LayerSite], selection: Selection, unit: str, calibration, *,
                           samples: int, positional: int, fixed_batch: int | None) -> tuple[dict[str, LayerSite], list[str]]:
    """Gather the statistics (XᵀX included), then give every measurable layer its setting (in place on `plans`).

    Args:
        config: the method config as planned (its `init` settled), holding the uniform setting.
        plans: layer path → its uniform plan; the allocated layers' are replaced.
        selection: the groups; tied layers keep the uniform setting.
        unit: "params" or "flops".
        calibration / samples / positional / fixed_batch: as `calibrate` takes them.

    Returns:
        The sites with their statistics (transform builds the twins from them), and the notes to show.

    Raises:
        ConfigError: a method or setting that cannot be spread, or a budget below what the most
            compressed setting of every layer holds.
        DataError: calibration data of a form the model cannot take.
    """
    # kept as a list: the statistics pass and the end-to-end pass read the same batches
    batches = list(calibration_batches(calibration, samples=samples, batch_size=fixed_batch or BATCH,
                                       positional=positional, pad=fixed_batch is not None))
    paths = [p for g in selection.groups for p in g.layers]
    sites = with_statistics(sites, gather_statistics(gm, paths, batches, gram=True))
    read = sum(_batch_size(args, kwargs) for args, kwargs in batches)
    note = (f"calibration: {read} sample(s) in {len(batches)} batch(es); input statistics of {len(paths)} layer(s) "
            "with XᵀX (for --allocate)")
    return sites, [note, *_allocate(gm, config, plans, sites, selection, unit, batches, paths)]


def _allocate(gm, config, plans, sites, selection, unit, batches, paths) -> list[str]:
    space = space_for(config, unit)
    tied = set(selection.ties) | set(selection.ties.values())
    left_out = [p for p in paths if p in tied or not measurable(sites[p])]
    options = {}
    for path in (p for p in paths if p not in left_out):
        measured = layer_options(config, space, sites[path], unit)
        if len(measured) > 1:
            options[path] = measured
        else:  # nothing to choose between (every setting skipped but one)
            left_out.append(path)
    if not options:
        raise ConfigError(f"--allocate found no layer to measure among {len(paths)} selected (it measures Linear, "
                          "Conv1d and Conv2d layers on their calibration inputs); drop --allocate")
    probes = {p: _probe(opts, space.field, getattr(config, space.field)) for p, opts in options.items()}
    gains = layer_gains(gm, sites, probes, batches)
    for path, opts in options.items():
        predicted(opts, gains[path])
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


def _probe(options: list[Option], field: str, uniform) -> Option:
    """The option whose end-to-end error gives the layer's gain: the uniform setting, else the strongest."""
    same = [o for o in options if o.config is not None and getattr(o.config, field) == uniform]
    return same[0] if same else options[-1]


def _recorded(option: Option, mildest: Option) -> LayerPlan:
    """The chosen option's plan, carrying the setting, its measured error and the model error it predicts."""
    plan = option.plan
    if option.label == "dense":
        plan.skip_reason = ("kept dense by --allocate: the model's output error grows fastest per unit saved here")
    plan.detail = {**plan.detail, "allocated": option.label, "error": round(option.layer_error, 5),
                   "model_error": round(option.error, 5)}
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
