"""What `--allocate` chooses among, per layer, and what each choice costs and loses on calibration data.

With `--ratio 0.5 --allocate` (or `--sparsity`, `--bits`) the given setting becomes a budget for all
the selected layers together; each layer gets one setting from a small candidate set (`Space`):

    low-rank   ratios 15/16, 14/16 … 1/16 (and the given one, and half of it), or dense
    prune      sparsities 0.2, 0.25 … 0.95 (and the given one, and half way from it to 1), or dense
    quant      8, 4 or 2 bits (and the given width)

Each candidate is measured once: the twin is built as `transform` would build it (the same
data-aware start, from the same statistics) and its output error on the calibration inputs is read
off the layer's Gram matrix G = XᵀX, with no second pass over the data:

    ‖X(W − Ŵ)ᵀ‖² = tr((W − Ŵ)·G·(W − Ŵ)ᵀ),    error = ‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖

(the bias is the same in both branches, so it cancels). Only one twin is alive at a time; the
low-rank candidates of a layer are the truncations of one factorization at its largest rank.
budget.py then spends the budget where the error grows least per unit saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import LayerPlan, LayerSite, MethodConfig, method_for, unchanged_plan
from .lowrank import LowRank, LowRankConfig
from .prune import PruneConfig
from .quant import QuantConfig
from .twin import WeightTwin

__all__ = ["Space", "Option", "UNITS", "space_for", "layer_options", "layer_budget", "relative_output_error",
           "twin_matrix", "measurable", "quiet_whitening"]

UNITS = ("params", "flops")
_FLOAT_BITS = 32
_MEASURED = (nn.Linear, nn.Conv1d, nn.Conv2d)  # the layers whose Gram matrix the statistics hold


@dataclass(frozen=True)
class Space:
    """The settings one method may give a layer: the config `field` takes one of `values`, or it stays dense.

    Args:
        field: "ratio", "sparsity" or "bits".
        values: the candidates, least compressed first.
        dense: whether a layer may be left dense.
    """

    field: str
    values: tuple
    dense: bool


@dataclass
class Option:
    """One setting of one layer: its config and plan, its cost in the budget's unit, its measured output error.

    `layer_error` is the layer's own relative output error; `error`, what the spread compares, is the
    model's output error it predicts (the layer error times the layer's gain, graph/sensitivity.py).
    """

    label: str
    config: MethodConfig | None
    plan: LayerPlan
    cost: float
    layer_error: float
    error: float = 0.0


def space_for(config: MethodConfig, unit: str) -> Space:
    """The candidate settings for `config` (pure).

    Raises:
        ConfigError: a method or setting --allocate does not spread (the message names what does).
    """
    if unit not in UNITS:
        raise ConfigError(f"--allocate takes {' or '.join(UNITS)}, got {unit!r}")
    if isinstance(config, LowRankConfig) and config.ratio is not None:
        base = float(config.ratio)
        grid = {k / 16 for k in range(1, 16)} | {base, base / 2}
        return Space("ratio", tuple(sorted(grid, reverse=True)), dense=True)
    if unit == "flops":
        raise ConfigError("--allocate flops spreads a FLOP budget, and only low-rank (--ratio) changes FLOPs; "
                          "use --allocate params (the default) with prune or quant")
    if isinstance(config, PruneConfig) and config.sparsity is not None and not config.structured:
        base = float(config.sparsity)
        grid = {k / 20 for k in range(4, 20)} | {base, (1 + base) / 2}
        return Space("sparsity", tuple(sorted(grid)), dense=True)
    if isinstance(config, QuantConfig) and config.act_bits is None:
        return Space("bits", tuple(sorted({8, 4, 2, config.bits}, key=_bits, reverse=True)), dense=False)
    raise ConfigError(f"--allocate spreads one budget over the layers: give it as low-rank --ratio, unstructured "
                      f"prune --sparsity or quant --bits (without --act-bits), not {_described(config)}; "
                      "or drop --allocate")


def _described(config: MethodConfig) -> str:
    fields = {k: v for k, v in config.to_dict().items() if k not in ("method", "version") and v not in (None, False)}
    return config.method + "".join(f" {k}={v}" for k, v in fields.items() if k in ("rank", "energy", "pattern",
                                                                                   "structured", "act_bits", "configs"))


def _bits(value) -> int:
    return 2 if value == "ternary" else int(value)


def layer_budget(space: Space, config: MethodConfig, uniform: LayerPlan, unit: str) -> float:
    """This layer's share of the budget, in its unit (pure): what the uniform setting asks of it (ratio × its
    weights, …), or what the uniform plan holds where that is less (a rank rounded down)."""
    value = getattr(config, space.field)
    weights = math.prod(uniform.shape)
    if unit == "flops":
        asked = float(value) * uniform.flops_before
    elif space.field == "bits":
        asked = weights * _bits(value) + (uniform.params_before - weights) * _FLOAT_BITS
    else:
        kept = float(value) if space.field == "ratio" else 1.0 - float(value)
        asked = weights * kept + (uniform.params_before - weights)
    return min(asked, _cost(space, uniform, unit))


def _cost(space: Space, plan: LayerPlan, unit: str) -> float:
    if unit == "flops":
        return float(plan.flops_after)
    if space.field == "bits":
        weights = math.prod(plan.shape)
        bits = _bits(plan.detail.get("bits", 32)) if not plan.skipped else _FLOAT_BITS
        return weights * bits + (plan.params_before - weights) * _FLOAT_BITS
    return float(plan.params_after)


def measurable(site: LayerSite) -> bool:
    """True when the layer's statistics hold the Gram matrix its output error is read from."""
    stats = site.statistics
    return isinstance(site.module, _MEASURED) and stats is not None and stats.gram is not None \
        and stats.gram.shape[0] == site.module.weight[0].numel()


def layer_options(config: MethodConfig, space: Space, site: LayerSite, unit: str) -> list[Option]:
    """Every distinct setting of one layer, least compressed first, each measured once (pure on the layer).

    Settings the method would skip (they save nothing) are dropped; two of equal cost keep the one
    with the smaller error.
    """
    options: list[Option] = []
    if space.dense:
        dense = unchanged_plan(site, "kept dense by --allocate")
        options.append(Option("dense", None, dense, _cost(space, dense, unit), 0.0))
    widest: LowRank | None = None  # low-rank: one factorization at the largest rank, truncated for the others
    for value in space.values:
        candidate = dataclasses.replace(config, **{space.field: value})
        method = method_for(candidate)
        plan = method.plan(site)
        if plan.skipped:
            continue
        with torch.no_grad(), quiet_whitening():
            if widest is not None:
                matrix = _truncated(widest, plan.detail["rank"])
            else:
                twin = method.build(site, plan, init=True)
                matrix = twin_matrix(twin)
                widest = twin if isinstance(twin, LowRank) else None
            error = relative_output_error(site.module.weight, matrix, site.statistics.gram)
        options.append(Option(f"{space.field} {value:g}" if isinstance(value, float) else f"{space.field} {value}",
                              candidate, plan, _cost(space, plan, unit), error))
    by_cost: dict[float, Option] = {}
    for option in options:
        if option.cost not in by_cost or option.layer_error < by_cost[option.cost].layer_error:
            by_cost[option.cost] = option
    return sorted(by_cost.values(), key=lambda o: -o.cost)


def _truncated(twin: LowRank, rank: int) -> torch.Tensor:
    """The rank-`rank` twin's weight from a wider one: its factors' leading singular directions (pure).

    The SVD's (and whitening's) truncations are nested, so this is the twin that rank would build.
    """
    up, down = twin.up.weight, twin.down.weight
    return up.reshape(up.shape[0], -1)[:, :rank] @ down.reshape(down.shape[0], -1)[:rank]


@contextlib.contextmanager
def quiet_whitening():
    """A shifted XᵀX is said once, when the chosen twin is built (and noted in its plan), not per candidate."""
    logger = logging.getLogger(f"{__package__}.whitening")
    was, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = was


def twin_matrix(twin: nn.Module) -> torch.Tensor:
    """The (out, in·k…) weight a Linear / Conv twin computes with (low-rank: up·down) (pure)."""
    if isinstance(twin, LowRank):
        up, down = twin.up.weight, twin.down.weight
        return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    if isinstance(twin, WeightTwin):
        weight = twin.compressed_weight()
        return weight.reshape(weight.shape[0], -1)
    raise ConfigError(f"--allocate cannot measure a {type(twin).__name__} twin; leave the layer out with --ignore")


def relative_output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """‖X(W − Ŵ)ᵀ‖ / ‖XWᵀ‖ over the rows X the Gram matrix G = XᵀX sums (pure, float64)."""
    dense = weight.detach().reshape(weight.shape[0], -1).to(gram)
    diff = dense - approx.detach().to(gram)
    lost = float(((diff @ gram) * diff).sum().clamp_min(0))
    held = float(((dense @ gram) * dense).sum())
    return math.sqrt(lost / held) if held > 0 else 0.0
