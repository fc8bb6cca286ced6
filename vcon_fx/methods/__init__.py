"""Compression methods. Adding one = one file here (its config, with CLI flags and examples, and its
builder) + one import line below."""

from .base import (
    COMPRESSIBLE,
    CliOption,
    LayerPlan,
    LayerSite,
    Method,
    MethodConfig,
    MethodExamples,
    config_from_dict,
    declared_options,
    method_for,
    register_method,
    registered_methods,
)
from .lowrank import LowRankConfig
from .prune import PruneConfig
from .quant import QuantConfig
from .compose import ComposeConfig

__all__ = [
    "COMPRESSIBLE",
    "CliOption",
    "LayerPlan",
    "LayerSite",
    "Method",
    "MethodConfig",
    "MethodExamples",
    "config_from_dict",
    "declared_options",
    "method_for",
    "register_method",
    "registered_methods",
    "LowRankConfig",
    "PruneConfig",
    "QuantConfig",
    "ComposeConfig",
]
