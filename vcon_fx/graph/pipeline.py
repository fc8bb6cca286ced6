"""The public pipeline, one call a step: transform → (fine-tune) → vanish.

These entry points copy once at the boundary: the caller's model is never changed. `plan` is
`transform` without the compression: it returns a `CompressionPlan` holding one `LayerPlan`
per selected layer.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .capture import capture as capture_graph
from ..errors import ArtifactError, ConfigError, LoadError
from ..methods.base import LayerPlan, LayerSite, MethodConfig, method_for
from ..methods.tied import tie_plans
from . import contracts
from .blend import set_beta
from .allocate import calibrate_and_allocate, check_allocation
from .calibrate import calibrate, input_rms, with_input_rms
from .duplicate import duplicate, plan_blocks
from .normalize import normalize
from .select import Group, Selection, SelectionConfig, find_sites, select
from .vanish import vanish_graph
from .dims import fixed_dims, flatten_inputs
from .precision import match_input_dtype
from .recipe import Recipe, input_spec, recipe_of
from .statistics import DEFAULT_SAMPLES

__all__ = ["transform", "plan", "vanish", "CompressionPlan", "Plan", "rebuild"]

log = logging.getLogger(__name__)


@dataclass
class CompressionPlan:
    """What `transform` would do to a whole model, without doing it (for `inspect`).

    `plans` maps each selected layer path to its `LayerPlan`; `groups` are the blend groups
    that compress at least one layer; `extra` holds the captured graph and its sites. `config`
    is the method config as planned: its `init` settled for calibration data given or not.
    """

    capture: str
    notes: list[str]
    selection: Selection
    plans: dict[str, LayerPlan]
    groups: list[Group]
    total_params: int
    extra: dict = field(default_factory=dict)
    config: MethodConfig | None = None

    @property
    def params_after(self) -> int:
        saved = sum(p.params_before - p.params_after for p in self.plans.values() if not p.skipped)
        return self.total_params - saved


# The class was called `Plan` before 0.2; user code that names it keeps working.
Plan = CompressionPlan


def plan(
    model: nn.Module,
    config: MethodConfig,
    *,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    selection: SelectionConfig | None = None,
    capture: str = "auto",
    seq_inputs: tuple[str, ...] = (),
    calibration=None,
    calibration_samples: int = DEFAULT_SAMPLES,
    copy_model: bool = True,
    **select_options,
) -> CompressionPlan:
    """Capture, select and plan every layer (pure: nothing is compressed).

    `selection` (or its fields as keyword options: targets=…, ignore=…) says which layers;
    `calibration` whether data-aware starts will have data. It is read here only with
    `allocate` (graph/allocate.py), which measures every layer's settings on it. `copy_model=False`
    captures the model's own weights instead of a copy (nothing is written to them here).

    Raises:
        CaptureError, SelectionError, ConfigError: as `transform`.
    """
    config = config.calibrated(calibration is not None)
    chosen = SelectionConfig.of(selection, **select_options)
    check_allocation(config, calibration, chosen.allocate)
    gm, notes, path, sites = _captured(model, example_inputs, example_kwargs, capture, seq_inputs, copy_model)
    selection = select(gm, sites, chosen)
    method = method_for(config)
    method.check_groups(selection.groups)
    for g in selection.groups:
        for p in g.layers:
            _refuse_non_finite(sites[p], config.method)
    plans = {p: method.plan(sites[p]) for g in selection.groups for p in g.layers}
    plan_blocks(gm, selection.groups, method, plans, sites)  # methods that couple layers refine block plans
    tie_plans(selection.ties, plans)  # a head tied to an embedding computes with its compressed table
    extra = {"gm": gm, "sites": sites}
    if chosen.allocate:  # the statistics (XᵀX) are gathered here once; transform reuses them
        fixed = fixed_dims(gm, flatten_inputs(model, example_inputs, example_kwargs), tuple(seq_inputs)).get("batch")
        sites, allocated = calibrate_and_allocate(gm, config, plans, sites, selection, chosen.allocate, calibration,
                                                  samples=calibration_samples, positional=max(len(example_inputs), 1),
                                                  fixed_batch=fixed)
        notes = [*notes, *allocated]
        extra.update(sites=sites, calibrated=True)
    groups = [g for g in selection.groups if any(not plans[p].skipped for p in g.layers)]
    total = sum(p.numel() for p in gm.parameters())
    return CompressionPlan(path, notes, selection, plans, groups, total, extra, config)


def transform(
    model: nn.Module,
    config: MethodConfig,
    *,
    freeze_dense: bool = False,
    example_inputs: tuple = (),
    example_kwargs: dict | None = None,
    selection: SelectionConfig | None = None,
    capture: str = "auto",
    seq_inputs: tuple[str, ...] = (),
    source: dict | None = None,
    calibration=None,
    calibration_samples: int = DEFAULT_SAMPLES,
    copy_model: bool = True,
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
        calibration: data to measure each selected layer's inputs on, one streaming pass: a
            Dataset (`vcon_fx.load_data`), a tensor, or an iterable of input batches. With it every
            method whose `init` is "auto" starts data-aware (docs/methods.md).
        calibration_samples: how many samples of `calibration` to read at most (default 128).
        copy_model: True (default) works on a copy of `model`. False makes `model`'s own weights the
            dense branch (and, for prune and quant, the twins' latent weights): no second copy of the
            model in memory, but training the result changes `model`'s weights. The CLI passes False.

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
    example_inputs, example_kwargs = tuple(example_inputs), dict(example_kwargs or {})
    selection = SelectionConfig.of(selection, **select_options)
    compression_plan = plan(model, config, example_inputs=example_inputs, example_kwargs=example_kwargs,
                            selection=selection, capture=capture, seq_inputs=seq_inputs, calibration=calibration,
                            calibration_samples=calibration_samples, copy_model=copy_model)
    config = compression_plan.config
    _refuse_all_skipped(compression_plan, config)
    gm, sites = compression_plan.extra["gm"], compression_plan.extra["sites"]
    layers = [p for g in compression_plan.groups for p in g.layers if not compression_plan.plans[p].skipped]
    if calibration is not None:
        if "calibrated" not in compression_plan.extra:  # --allocate gathered them already
            sites, note = _calibrated(model, gm, sites, layers, calibration, calibration_samples, config.needs_gram,
                                      example_inputs, example_kwargs, seq_inputs)
            compression_plan.notes.append(note)
    elif uses_input_statistics(config):
        sites = with_input_rms(sites, input_rms(gm, layers, example_inputs, example_kwargs))
    duplicate(gm, compression_plan.groups, method_for(config), compression_plan.plans, sites, freeze_dense=freeze_dense)
    compression_plan.notes.extend(_shift_notes(compression_plan.plans))
    if contracts.active() and (example_inputs or example_kwargs):
        contracts.ensure_blend_branches_agree(gm, example_inputs, example_kwargs)
    gm.meta["vcon"] = _recipe(compression_plan, config, selection, seq_inputs, freeze_dense, source,
                              _inputs_record(model, gm, example_inputs, example_kwargs, seq_inputs))
    log.info("transformed %d group(s) with %s (capture: %s)", len(compression_plan.groups), config.method,
             compression_plan.capture)
    return gm


def _calibrated(model, gm, sites, layers, calibration, samples, gram, example_inputs, example_kwargs, seq_inputs):
    """`calibrate` on the graph as captured: whole batches where the graph fixed its batch size."""
    fixed = fixed_dims(gm, flatten_inputs(model, example_inputs, example_kwargs), tuple(seq_inputs)).get("batch")
    return calibrate(gm, sites, layers, calibration, samples=samples, gram=gram,
                     positional=max(len(example_inputs), 1), fixed_batch=fixed)


def _inputs_record(model, gm, example_inputs, example_kwargs, seq_inputs) -> dict:
    """The example-input spec, plus the batch / sequence sizes the captured graph fixed (see dims.fixed_dims).

    Fine-tuning trains at a fixed batch and the ONNX export keeps fixed dims static, instead of
    both failing later for a reason known now.
    """
    spec = input_spec(example_inputs, example_kwargs)
    fixed = fixed_dims(gm, flatten_inputs(model, example_inputs, example_kwargs), tuple(seq_inputs))
    if fixed:
        spec["fixed"] = fixed
    return spec


def _shift_notes(plans: dict[str, LayerPlan]) -> list[str]:
    """One note per layer whose XᵀX was shifted to be positive-definite (methods/whitening.py)."""
    return [f"layer {path}: XᵀX of its calibration inputs was not positive-definite; shifted by "
            f"{plan.detail['gram_shift']:.3g} (fewer samples than its {math.prod(plan.shape[1:])} input columns?)"
            for path, plan in plans.items() if plan.detail.get("gram_shift")]


def _refuse_all_skipped(compression_plan: CompressionPlan, config: MethodConfig) -> None:
    if not compression_plan.groups:
        first = next(iter(compression_plan.plans.values()))
        raise ConfigError(
            f"{config.method} would leave every matched layer dense (e.g. {first.path}: {first.skip_reason}); "
            "choose a stronger compression"
        )


def _recipe(compression_plan: CompressionPlan, config: MethodConfig, selection: SelectionConfig,
            seq_inputs: tuple[str, ...], freeze_dense: bool, source: dict | None, inputs: dict) -> Recipe:
    """The recipe `transform` records: the plan, plus everything `load` needs to redo it."""
    excluded = dict(compression_plan.selection.excluded)
    excluded.update({p: pl.skip_reason for p, pl in compression_plan.plans.items() if pl.skipped})
    return Recipe(
        config=config,
        groups=compression_plan.groups,
        plans=dict(compression_plan.plans),
        capture=compression_plan.capture,
        selection={**selection.to_dict(), "seq_inputs": list(seq_inputs)},
        freeze_dense=freeze_dense,
        source=source,
        inputs=inputs,
        excluded=excluded,
        notes=compression_plan.notes,
    )


def vanish(model: fx.GraphModule, *, force: bool = False, copy_model: bool = True) -> fx.GraphModule:
    """The compressed model alone: dense branches and blends removed (pure: returns a copy).

    `copy_model=False` vanishes `model` itself (in place, returned): no second copy in memory.

    Raises:
        StageError: not a vcon model, already vanished, or β > 0 in some group without `force`.

    Example:
        >>> small = vcon_fx.vanish(vcon_model)  # after β has reached 0
    """
    recipe = recipe_of(model)
    gm = match_input_dtype(copy.deepcopy(model)) if copy_model else model
    vanish_graph(gm, method_for(recipe.config), force=force)
    gm.meta["vcon"] = recipe.replace(stage="vanished")
    return gm


def rebuild(model: nn.Module, recipe: Recipe, example_args: tuple, example_kwargs: dict, *,
            copy_model: bool = True) -> fx.GraphModule:
    """Re-apply a recorded recipe to its source model without initializing twins (for `load`).

    `copy_model=False` builds on `model`'s own weights (a model built only for this: no second copy).
    """
    gm, _notes, _path, sites = _captured(model, example_args, example_kwargs, recipe.capture,
                                         tuple(recipe.selection.get("seq_inputs") or ()), copy_model)
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


def _captured(model, example_inputs, example_kwargs, mode, seq_inputs, copy_model: bool = True):
    # The one full copy at the boundary keeps the caller's model unchanged; without it the capture
    # shares the model's weights (both tracers keep the module's own Parameters).
    model = copy.deepcopy(model) if copy_model else model
    captured = capture_graph(model, tuple(example_inputs), dict(example_kwargs or {}), mode=mode, seq_inputs=seq_inputs)
    gm = match_input_dtype(normalize(captured.gm))  # a bf16 / fp16 model takes float32 data as its own dtype
    sites: dict[str, LayerSite] = find_sites(gm, tuple(example_inputs), dict(example_kwargs or {}))
    return gm, captured.notes, captured.path, sites
