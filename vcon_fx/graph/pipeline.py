"""The public pipeline, one call a step: transform → (fine-tune) → vanish.

These entry points copy once at the boundary: the caller's model is never changed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .capture import capture as capture_graph
from ..errors import ArtifactError, ConfigError, LoadError
from ..methods.base import LayerPlan, LayerSite, MethodConfig, method_for
from .blend import set_beta
from .calibrate import input_rms, with_input_rms
from .duplicate import duplicate, plan_blocks
from .normalize import normalize
from .select import Group, Selection, SelectionConfig, find_sites, select
from .vanish import vanish_graph
from ..io.recipe import Recipe, input_spec, recipe_of

__all__ = ["transform", "plan", "vanish", "Plan", "rebuild"]

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What `transform` would do, without doing it: for `inspect`."""

    capture: str
    notes: list[str]
    selection: Selection
    plans: dict[str, LayerPlan]
    groups: list[Group]
    total_params: int
    extra: dict = field(default_factory=dict)

    @property
    def params_after(self) -> int:
        saved = sum(p.params_before - p.params_after for p in self.plans.values() if not p.skipped)
        return self.total_params - saved


def plan(
    model: nn.Module,
    config: MethodConfig,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    selection: SelectionConfig | None = None,
    capture: str = "auto",
    seq_inputs: tuple[str, ...] = (),
    **select_options,
) -> Plan:
    """Capture, select and plan every layer (pure: nothing is compressed).

    `selection` (or its fields as keyword options: targets=…, ignore=…) says which layers.

    Raises:
        CaptureError, SelectionError, ConfigError: as `transform`.
    """
    chosen = SelectionConfig.of(selection, **select_options)
    gm, notes, path, sites = _captured(model, example_inputs, example_kwargs, capture, seq_inputs)
    selection = select(gm, sites, chosen)
    method = method_for(config)
    method.check_groups(selection.groups)
    for g in selection.groups:
        for p in g.layers:
            _refuse_non_finite(sites[p], config.method)
    plans = {p: method.plan(sites[p]) for g in selection.groups for p in g.layers}
    plan_blocks(gm, selection.groups, method, plans, sites)  # methods that couple layers refine block plans
    groups = [g for g in selection.groups if any(not plans[p].skipped for p in g.layers)]
    total = sum(p.numel() for p in gm.parameters())
    result = Plan(path, notes, selection, plans, groups, total, {"gm": gm, "sites": sites})
    return result


def transform(
    model: nn.Module,
    config: MethodConfig,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    selection: SelectionConfig | None = None,
    freeze_dense: bool = False,
    capture: str = "auto",
    seq_inputs: tuple[str, ...] = (),
    source: dict | None = None,
    **select_options,
) -> fx.GraphModule:
    """Build the blended model: every selected layer or block gets a compressed twin, β = 1 (pure).

    Args:
        model: any nn.Module; it is copied, never changed.
        config: e.g. `LowRankConfig(rank=64)`.
        example_inputs / example_kwargs: inputs the model runs on (for capture and shapes).
        selection: which layers (`SelectionConfig`); or its fields as keyword options
            (targets=…, ignore=…, granularity=…, blocks=…, include_stem=…, include_head=…).
        freeze_dense: the dense branch does not train (default: it does, as in the paper).
        capture: "auto", "fx" or "export".
        seq_inputs: input names with a sequence axis (dim 1).
        source: how to rebuild `model` (set by the CLI), so `load` needs no model.

    Returns:
        A GraphModule whose outputs equal the model's at β = 1, with its recipe in `.meta["vcon"]`.

    Raises:
        CaptureError, SelectionError, ConfigError, UsageError.

    Example:
        >>> import torch, vcon_fx
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64),
        ...                           torch.nn.ReLU(), torch.nn.Linear(64, 2))
        >>> vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=4), example_inputs=(torch.randn(1, 8),))
        >>> sorted(vcon_fx.get_betas(vm))
        ['2']
    """
    example_kwargs = dict(example_kwargs or {})
    selection = SelectionConfig.of(selection, **select_options)
    the_plan = plan(model, config, example_inputs=example_inputs, example_kwargs=example_kwargs, selection=selection,
                    capture=capture, seq_inputs=seq_inputs)
    if not the_plan.groups:
        first = next(iter(the_plan.plans.values()))
        raise ConfigError(
            f"{config.method} would leave every matched layer dense (e.g. {first.path}: {first.skip_reason}); "
            "choose a stronger compression"
        )
    gm = the_plan.extra["gm"]
    method = method_for(config)
    sites = the_plan.extra["sites"]
    if uses_input_statistics(config):
        layers = [p for g in the_plan.groups for p in g.layers if not the_plan.plans[p].skipped]
        sites = with_input_rms(sites, input_rms(gm, layers, tuple(example_inputs), example_kwargs))
    duplicate(gm, the_plan.groups, method, the_plan.plans, sites, freeze_dense=freeze_dense)
    excluded = dict(the_plan.selection.excluded)
    excluded.update({p: pl.skip_reason for p, pl in the_plan.plans.items() if pl.skipped})
    gm.meta["vcon"] = Recipe(
        config=config,
        groups=the_plan.groups,
        plans={p: pl for p, pl in the_plan.plans.items()},
        capture=the_plan.capture,
        selection={**selection.to_dict(), "seq_inputs": list(seq_inputs)},
        freeze_dense=freeze_dense,
        source=source,
        inputs=input_spec(tuple(example_inputs), example_kwargs),
        excluded=excluded,
        notes=the_plan.notes,
    )
    log.info("transformed %d group(s) with %s (capture: %s)", len(the_plan.groups), config.method, the_plan.capture)
    return gm


def vanish(model: fx.GraphModule, *, force: bool = False) -> fx.GraphModule:
    """The compressed model alone: dense branches and blends removed (pure: returns a copy).

    Raises:
        StageError: not a vcon model, already vanished, or β > 0 in some group without `force`.

    Example:
        >>> small = vcon_fx.vanish(vcon_model)  # after β has reached 0
    """
    recipe = recipe_of(model)
    gm = copy.deepcopy(model)
    vanish_graph(gm, method_for(recipe.config), force=force)
    gm.meta["vcon"] = recipe.replace(stage="vanished")
    return gm


def rebuild(model: nn.Module, recipe: Recipe, example_args: tuple, example_kwargs: dict) -> fx.GraphModule:
    """Re-apply a recorded recipe to its source model without initializing twins (for `load`)."""
    gm, _notes, _path, sites = _captured(model, example_args, example_kwargs, recipe.capture,
                                         tuple(recipe.selection.get("seq_inputs") or ()))
    method = method_for(recipe.config)
    missing = [p for g in recipe.groups for p in g.layers if p not in sites]
    if missing:
        raise ArtifactError(f"the source model has no layer {missing[0]} that the recipe compresses: was the source changed?")
    duplicate(gm, recipe.groups, method, recipe.plans, sites, freeze_dense=recipe.freeze_dense, init=False)
    gm.meta["vcon"] = recipe
    if recipe.stage == "vanished":
        set_beta(gm, 0.0)  # the saved model is past its transition
        vanish_graph(gm, method)
    return gm


def uses_input_statistics(config: MethodConfig) -> bool:
    """True when the config (or a part of a composed one) initializes from input statistics."""
    return config.uses_input_statistics


def _refuse_non_finite(site: LayerSite, method: str) -> None:
    # Every twin starts from the dense weights (SVD, magnitudes, scales): NaN/Inf there gives garbage or a LinAlgError.
    for name, tensor in site.module.named_parameters(recurse=False):
        bad = ~torch.isfinite(tensor.detach())
        if bad.any():
            raise LoadError(f"layer {site.path}: its {name} holds {int(bad.sum())} NaN/Inf value(s), so {method} cannot "
                            f"compress it: fix or retrain the model, or leave the layer dense with --ignore {site.path}")


def _captured(model, example_inputs, example_kwargs, mode, seq_inputs):
    model = copy.deepcopy(model)
    captured = capture_graph(model, tuple(example_inputs), dict(example_kwargs or {}), mode=mode, seq_inputs=seq_inputs)
    gm = normalize(captured.gm)
    sites: dict[str, LayerSite] = find_sites(gm, tuple(example_inputs), dict(example_kwargs or {}))
    return gm, captured.notes, captured.path, sites
