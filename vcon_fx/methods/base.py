"""Compression configs and the method registry.

A method is one file under `methods/`: a frozen config dataclass that validates itself, and a
builder registered for that config type. The builder plans each layer cheaply (what would the
method make of it?), builds the compressed twin, and materializes it when the dense branch
vanishes. Configs round-trip through JSON with their method name and a version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from .declarations import CliOption, MethodExamples
from .layer_types import LAYER_TYPES, channel_first, dense_flops, input_positions

if TYPE_CHECKING:
    from .calibration import InputStatistics

__all__ = [
    "CliOption",
    "MethodExamples",
    "MethodConfig",
    "LayerSite",
    "LayerPlan",
    "Method",
    "register_method",
    "method_for",
    "registered_methods",
    "config_from_dict",
    "declared_options",
    "layer_params",
    "unchanged_plan",
    "COMPRESSIBLE",
]

# The layer types every method understands (layer_types.py groups them by weight layout);
# normalize() lifts functional linear / conv calls into these.
COMPRESSIBLE = LAYER_TYPES


@dataclass(frozen=True)
class MethodConfig:
    """Base of every compression config: JSON round-trip with method name and version.

    A subclass also declares its CLI flags (`cli_options`, shown with `cli_label` in front of
    their help) and may answer the hooks below; callers ask the config, never its method name.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1
    cli_label: ClassVar[str] = ""  # the method's name in help texts (default: `method`)
    cli_options: ClassVar[tuple[CliOption, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"method": self.method, "version": self.version, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MethodConfig":
        return config_from_dict(data)

    @property
    def uses_input_statistics(self) -> bool:
        """True when building the twin reads statistics of the example inputs (they must be real data)."""
        return False

    @property
    def needs_gram(self) -> bool:
        """True when a data-aware twin reads each layer's Gram matrix XᵀX (not only per-feature moments)."""
        from .calibration import nested_configs

        return any(part.needs_gram for part in nested_configs(self))

    def calibrated(self, given: bool) -> "MethodConfig":
        """This config with its `init` settled for calibration data given or not (pure; calibration.py).

        Raises:
            ConfigError: a data-aware start asked for without calibration data.
        """
        from .calibration import map_nested

        return map_nested(self, lambda part: part.calibrated(given))

    def deployment_note(self) -> str | None:
        """What the exported model does not gain on onnxruntime's CPU provider, said plainly (or None)."""
        return None

    @classmethod
    def examples(cls) -> MethodExamples | None:
        """The method's representative configs (None: not declared, which the tests refuse)."""
        return None


def _jsonable(value):
    if isinstance(value, MethodConfig):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class LayerSite:
    """One compressible layer as found in the graph: its path, module and observed shapes."""

    path: str
    module: nn.Module
    out_shape: tuple[int, ...] | None = None  # from shape propagation on the example inputs
    calls: int = 1  # how many graph nodes call it (a layer called twice has 2)
    input_rms: torch.Tensor | None = None  # RMS per input feature / channel (activation-aware methods)
    statistics: "InputStatistics | None" = None  # from calibration data (calibration.py), for data-aware twins

    @property
    def kind(self) -> str:
        return type(self.module).__name__

    @property
    def positions(self) -> int:
        """Positions per forward at which the weight is applied (tokens × batch, or H×W × batch; a
        transposed conv's input positions, a recurrent layer's time steps): FLOPs scale with it."""
        if self.out_shape is None or len(self.out_shape) == 0:
            return 1
        per_channel_dim = 1 if channel_first(self.module) else -1
        total = 1
        for i, d in enumerate(self.out_shape):
            if i != (per_channel_dim % len(self.out_shape)):
                total *= int(d)
        return max(input_positions(self.module, total), 1) * self.calls


@dataclass
class LayerPlan:
    """What a method would make of one layer: sizes before/after, or why it is skipped."""

    path: str
    kind: str
    shape: tuple[int, ...]
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    bytes_before: int
    bytes_after: int
    detail: dict[str, Any] = field(default_factory=dict)  # e.g. {"rank": 16}
    skip_reason: str | None = None

    @property
    def skipped(self) -> bool:
        return self.skip_reason is not None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "LayerPlan":
        """The plan `to_dict` wrote (pure)."""
        return LayerPlan(**{**data, "shape": tuple(data["shape"])})


class Method:
    """Builder for one config type. Subclasses implement plan / build / materialize."""

    config_type: ClassVar[type[MethodConfig]]
    # Plan detail keys worth showing at the top of a composed plan (e.g. "rank", "bits").
    summary_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: MethodConfig):
        self.config = config

    def plan(self, site: LayerSite) -> LayerPlan:
        """Decide what to do with one layer, cheaply and without changing it (pure)."""
        raise NotImplementedError

    def build(self, site: LayerSite, plan: LayerPlan, *, init: bool = True) -> nn.Module:
        """Build the compressed twin of `site.module`; `init=False` only allocates (for load)."""
        raise NotImplementedError

    def materialize(self, compressed: nn.Module) -> nn.Module:
        """The deployable form of a trained twin (masks applied, integers stored). Default: as is."""
        return compressed

    def inner_statistics(self, site: LayerSite, twin: nn.Module) -> dict[str, "InputStatistics"]:
        """Input statistics of the layers inside a built twin, from the layer's (for a composed second method)."""
        return {}

    def share_dense_weights(self) -> bool:
        """True when the twin computes its weights from the dense layer's own parameters."""
        return False

    # ── block-level hooks (a method that couples several layers of a block uses them) ──────

    def check_groups(self, groups: list) -> None:
        """Raise ConfigError when the method cannot work on these groups (default: any will do)."""

    def plan_block(self, block: nn.Module, plans: dict[str, LayerPlan], sites: dict[str, LayerSite]) -> None:
        """Refine the plans of one block's layers from its graph (in place on `plans`). Default: no-op.

        Args:
            block: the block's dense GraphModule (targets relative to the block).
            plans / sites: the block's layers, keyed by their path inside `block`.
        """

    def build_block(self, dense: nn.Module, compressed: nn.Module, plans: dict[str, LayerPlan],
                    sites: dict[str, LayerSite], *, init: bool = True) -> None:
        """Called once per block after its per-layer twins are built (in place on `compressed`
        and `plans`). Default: no-op.

        With `init=False` (loading) the plans come from a recipe: re-apply them, recompute nothing.
        """

    def materialize_block(self, compressed: nn.Module) -> None:
        """Deployable form of a block's compressed branch, before each module's `materialize`
        (in place). Default: no-op."""


_REGISTRY: dict[type[MethodConfig], type[Method]] = {}
_BY_NAME: dict[str, type[MethodConfig]] = {}


def register_method(method_cls: type[Method]) -> type[Method]:
    """Class decorator: register a Method subclass for its `config_type`."""
    config_type = method_cls.config_type
    _REGISTRY[config_type] = method_cls
    _BY_NAME[config_type.method] = config_type
    return method_cls


def method_for(config: MethodConfig) -> Method:
    """The builder for `config`. Raises ConfigError for an unregistered config type."""
    try:
        return _REGISTRY[type(config)](config)
    except KeyError:
        raise ConfigError(
            f"no compression method is registered for {type(config).__name__}; "
            f"known methods: {sorted(_BY_NAME)}"
        ) from None


def registered_methods() -> dict[str, type[MethodConfig]]:
    """Method name → config type, for every registered method."""
    return dict(_BY_NAME)


def config_from_dict(data: dict[str, Any]) -> MethodConfig:
    """Rebuild a config from `to_dict()` output; rejects unknown methods and keys."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a method config needs a 'method' key, got {data!r}")
    name = data["method"]
    if name not in _BY_NAME:
        raise ConfigError(f"unknown method {name!r}; choose one of {sorted(_BY_NAME)}")
    cls = _BY_NAME[name]
    version = data.get("version", cls.version)
    if version > cls.version:
        raise ConfigError(f"{name} config version {version} is newer than this vcon-fx ({cls.version}): upgrade vcon-fx")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields) - {"method", "version"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} for method {name!r}; allowed: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        if key in ("method", "version"):
            continue
        if isinstance(value, dict) and "method" in value:
            value = config_from_dict(value)
        elif isinstance(value, list):
            value = tuple(config_from_dict(v) if isinstance(v, dict) else v for v in value)
        kwargs[key] = value
    return cls(**kwargs)


def declared_options() -> list[tuple[CliOption, tuple[str, ...]]]:
    """Every registered method's CLI flags, each once, with the labels of the methods declaring it (pure).

    Flags of a single method come in registry order; flags several methods share come last.

    Raises:
        ConfigError: two methods declare one flag differently.
    """
    owners: dict[str, list[type[MethodConfig]]] = {}
    options: dict[str, CliOption] = {}
    for config_type in _BY_NAME.values():
        for option in config_type.cli_options:
            if options.setdefault(option.flag, option) != option:
                raise ConfigError(f"{config_type.__name__} declares {option.flag} unlike another method: "
                                  "a shared flag must be declared the same way (one CliOption)")
            owners.setdefault(option.flag, []).append(config_type)
    ordered = sorted(options, key=lambda flag: len(owners[flag]) > 1)  # stable: registry order within each
    return [(options[flag], tuple(c.cli_label or c.method for c in owners[flag])) for flag in ordered]


def layer_params(module: nn.Module) -> int:
    """Parameters of a layer (weight + bias)."""
    return sum(p.numel() for p in module.parameters(recurse=True))


def unchanged_plan(site: LayerSite, reason: str) -> LayerPlan:
    """The plan of a layer a method leaves dense, with the reason (pure)."""
    params = layer_params(site.module)
    weight = getattr(site.module, "weight", None)
    shape = tuple(weight.shape) if weight is not None else tuple(next(site.module.parameters()).shape)
    flops = dense_flops(site.module, site.positions)
    return LayerPlan(path=site.path, kind=site.kind, shape=shape, params_before=params, params_after=params,
                     flops_before=flops, flops_after=flops, bytes_before=4 * params, bytes_after=4 * params,
                     skip_reason=reason)
