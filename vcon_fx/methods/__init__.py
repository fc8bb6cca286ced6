"""Compression methods. Adding one = one file here + one import line below."""

from .base import (
    COMPRESSIBLE,
    LayerPlan,
    LayerSite,
    Method,
    MethodConfig,
    config_from_dict,
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
    "LayerPlan",
    "LayerSite",
    "Method",
    "MethodConfig",
    "config_from_dict",
    "method_for",
    "register_method",
    "registered_methods",
    "LowRankConfig",
    "PruneConfig",
    "QuantConfig",
    "ComposeConfig",
]
