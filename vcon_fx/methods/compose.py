"""Composition: one method, then a second on every Linear / Conv inside the first's twin.

`lowrank+quant` factorizes each layer, then quantizes both factors: the twin is a LowRank
whose `down` and `up` are quantized twins (sharing the factors' Parameters). Materialize
applies the second method to those inner twins, then the first to the result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError
from .base import (
    COMPRESSIBLE,
    LayerPlan,
    LayerSite,
    Method,
    MethodConfig,
    MethodExamples,
    layer_params,
    method_for,
    register_method,
    registered_methods,
)

__all__ = ["ComposeConfig", "ComposeMethod", "compose_config"]


@dataclass(frozen=True)
class ComposeConfig(MethodConfig):
    """Two methods in sequence, e.g. `ComposeConfig((LowRankConfig(rank=16), QuantConfig(bits=8)))`.

    Args:
        configs: (first, second); the second is applied to each Linear / Conv inside the
            first's twin, so the first must build one (low-rank does; prune and quant do not).
    """

    method = "compose"
    version = 1
    configs: tuple[MethodConfig, ...] = ()

    def __post_init__(self):
        configs = tuple(self.configs) if isinstance(self.configs, (list, tuple)) else None
        if configs is None or len(configs) != 2:
            raise ConfigError(f"compose needs exactly two method configs (first, second), got {self.configs!r}")
        for c in configs:
            if not isinstance(c, MethodConfig):
                raise ConfigError(f"compose takes method configs such as LowRankConfig(...), got {type(c).__name__}")
            if isinstance(c, ComposeConfig):
                raise ConfigError("compose cannot nest another compose; give two plain methods")
        object.__setattr__(self, "configs", configs)

    @property
    def name(self) -> str:
        """The CLI spelling, e.g. "lowrank+quant"."""
        return "+".join(c.method for c in self.configs)

    @property
    def uses_input_statistics(self) -> bool:
        return any(c.uses_input_statistics for c in self.configs)

    def deployment_note(self) -> str | None:
        return next((note for c in self.configs if (note := c.deployment_note())), None)

    @classmethod
    def examples(cls) -> MethodExamples:
        from .lowrank import LowRankConfig  # the composition worth showing: factorize, then quantize the factors
        from .quant import QuantConfig

        return MethodExamples(test=cls((LowRankConfig(ratio=0.25), QuantConfig(bits=8))),
                              cuda=cls((LowRankConfig(rank=8), QuantConfig(bits=8))),
                              demo=cls((LowRankConfig(rank=8), QuantConfig(bits=2))), demo_setting="rank 8, 2-bit")


def compose_config(names: str, options: dict[str, Any]) -> MethodConfig:
    """A config from a CLI method spelling: "lowrank" → LowRankConfig, "lowrank+quant" → ComposeConfig.

    Each method takes the options that are fields of its config; options none takes → ConfigError.

    Example:
        >>> compose_config("lowrank+quant", {"rank": 8, "bits": 4}).name
        'lowrank+quant'
    """
    methods = registered_methods()
    parts = [p.strip() for p in names.split("+")]
    unknown = [p for p in parts if p not in methods or p == ComposeConfig.method]
    if unknown:
        raise ConfigError(f"unknown method {unknown[0]!r}; choose from {sorted(set(methods) - {'compose'})}, "
                          "or two joined by '+' (e.g. lowrank+quant)")
    options = {k: v for k, v in options.items() if v is not None}
    configs, used = [], set()
    for name in parts:
        fields = {f.name for f in dataclasses.fields(methods[name])}
        mine = {k: v for k, v in options.items() if k in fields}
        used |= set(mine)
        configs.append(methods[name](**mine))
    unused = sorted(set(options) - used)
    if unused:
        raise ConfigError(f"option(s) {unused} do not apply to method {names!r}")
    return configs[0] if len(configs) == 1 else ComposeConfig(tuple(configs))


def _plan_from(data: dict) -> LayerPlan:
    data = dict(data)
    data["shape"] = tuple(data["shape"])
    return LayerPlan(**data)


@register_method
class ComposeMethod(Method):
    config_type = ComposeConfig

    def __init__(self, config: ComposeConfig):
        super().__init__(config)
        self.first = method_for(config.configs[0])
        self.second = method_for(config.configs[1])

    def share_dense_weights(self) -> bool:
        return self.first.share_dense_weights()

    def plan(self, site: LayerSite) -> LayerPlan:
        first = self.first.plan(site)
        plan = dataclasses.replace(first, detail={"first": first.to_dict(), "second": {}})
        if first.skipped:
            return plan
        twin = self.first.build(site, first, init=False)  # allocation only: the inner layers' shapes
        inner = _inner_layers(twin)
        if not inner:
            raise ConfigError(
                f"{self.config.name}: the {self.first.config.method} twin of {site.path} holds no Linear/Conv "
                f"for {self.second.config.method} to compress; put a method that builds layers first (lowrank)"
            )
        params, nbytes = 0, 0
        for path, layer in inner.items():
            sub = self.second.plan(LayerSite(_join(site.path, path), layer, site.out_shape, site.calls))
            plan.detail["second"][path] = sub.to_dict()
            params += sub.params_before if sub.skipped else sub.params_after
            nbytes += sub.bytes_before if sub.skipped else sub.bytes_after
        # parameters of the twin outside its inner layers (a recurrent twin's biases) stay as they are
        outside = 0 if "" in inner else layer_params(twin) - sum(layer_params(m) for m in inner.values())
        plan.params_after = params + outside
        plan.bytes_after = nbytes + 4 * outside
        for key in (*self.first.summary_keys, *self.second.summary_keys):  # a readable summary
            for d in (first.detail, *(s["detail"] for s in plan.detail["second"].values())):
                if key in d:
                    plan.detail.setdefault(key, d[key])
        return plan

    def build(self, site: LayerSite, plan: LayerPlan, *, init: bool = True) -> nn.Module:
        twin = self.first.build(site, _plan_from(plan.detail["first"]), init=init)
        twin.train(site.module.training)  # new modules start in train mode; follow the dense layer's
        inner = self.first.inner_statistics(site, twin) if init else {}  # calibration data reaches the inner layers
        for path, data in plan.detail["second"].items():
            sub_plan = _plan_from(data)
            if sub_plan.skipped:
                continue
            layer = twin if path == "" else twin.get_submodule(path)
            built = self.second.build(LayerSite(_join(site.path, path), layer, site.out_shape, site.calls,
                                                statistics=inner.get(path)), sub_plan, init=init)
            if path == "":
                twin = built
            else:
                twin.set_submodule(path, built)
        return twin

    def materialize(self, compressed: nn.Module) -> nn.Module:
        done = self.second.materialize(compressed)
        if done is not compressed:
            return self.first.materialize(done)
        for path, module in list(compressed.named_modules()):
            if path and (inner := self.second.materialize(module)) is not module:
                compressed.set_submodule(path, inner)
        return self.first.materialize(compressed)


def _inner_layers(twin: nn.Module) -> dict[str, nn.Module]:
    return {path: m for path, m in twin.named_modules() if isinstance(m, COMPRESSIBLE)}


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if path else prefix
