"""The recipe: everything needed to rebuild a vcon model from its source, as plain JSON.

It travels with the GraphModule in `gm.meta["vcon"]` and is written beside the weights by
`save`. Loading re-applies it to the source (no pickle): capture, the same groups with the
same per-layer decisions, vanish when the stage says so, then the saved weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from ..errors import ArtifactError, StageError
from ..methods.base import LayerPlan, MethodConfig, config_from_dict
from .select import Group

__all__ = ["Recipe", "recipe_of", "input_spec", "inputs_from_spec", "FORMAT", "FORMAT_VERSION"]

FORMAT = "vcon-fx"
FORMAT_VERSION = 1


@dataclass
class Recipe:
    """How a vcon model was made. `stage` is "blended" (β blends present) or "vanished"."""

    config: MethodConfig
    groups: list[Group]
    plans: dict[str, LayerPlan]
    capture: str
    selection: dict[str, Any]
    freeze_dense: bool = False
    stage: str = "blended"
    source: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)  # example-input spec (shapes, dtypes)
    excluded: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # The data finetune read (path and reader options): export's static int8 calibrates on it
    # when no other calibration data is given.
    training: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "stage": self.stage,
            "config": self.config.to_dict(),
            "capture": self.capture,
            "selection": self.selection,
            "freeze_dense": self.freeze_dense,
            "groups": [g.to_dict() for g in self.groups],
            "plans": {p: plan.to_dict() for p, plan in self.plans.items()},
            "source": self.source,
            "inputs": self.inputs,
            "excluded": self.excluded,
            "notes": self.notes,
            "training": self.training,
        }

    @staticmethod
    def from_dict(data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ArtifactError("recipe.json is not a vcon-fx recipe (no 'format': 'vcon-fx'); was it written by vcon-fx?")
        if data.get("format_version", 0) > FORMAT_VERSION:
            raise ArtifactError(f"recipe format {data['format_version']} is newer than this vcon-fx reads ({FORMAT_VERSION}): upgrade vcon-fx")
        try:
            plans = {}
            for path, p in data["plans"].items():
                p = dict(p)
                p["shape"] = tuple(p["shape"])
                plans[path] = LayerPlan(**p)
            return Recipe(
                config=config_from_dict(data["config"]),
                groups=[Group.from_dict(g) for g in data["groups"]],
                plans=plans,
                capture=data["capture"],
                selection=dict(data["selection"]),
                freeze_dense=bool(data.get("freeze_dense", False)),
                stage=data["stage"],
                source=data.get("source"),
                inputs=dict(data.get("inputs") or {}),
                excluded=dict(data.get("excluded") or {}),
                notes=list(data.get("notes") or []),
                training=dict(data["training"]) if data.get("training") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"recipe.json is incomplete or malformed ({type(exc).__name__}: {exc}); re-create it with `vcon-fx transform`") from None

    def replace(self, **changes) -> "Recipe":
        return dataclasses.replace(self, **changes)


def recipe_of(model) -> Recipe:
    """The recipe of a vcon model. Raises StageError when `model` was not made by vcon-fx."""
    recipe = getattr(model, "meta", {}).get("vcon") if isinstance(model, fx.GraphModule) else None
    if not isinstance(recipe, Recipe):
        raise StageError(
            f"{type(model).__name__} is not a vcon model (no recipe); create one with vcon_fx.transform / `vcon-fx transform`"
        )
    return recipe


def input_spec(args: tuple, kwargs: dict) -> dict[str, Any]:
    """Shapes and dtypes of example inputs, enough to synthesize equivalent ones later."""
    def one(t):
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"example inputs must be tensors to be recorded, got {type(t).__name__}")
        spec = {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if not t.is_floating_point() and t.numel():
            spec["low"], spec["high"] = int(t.min()), int(t.max()) + 1
        return spec
    return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in kwargs.items()}}


def inputs_from_spec(spec: dict[str, Any], *, batch: int | None = None, seed: int = 0) -> tuple[tuple, dict]:
    """Example inputs of the recorded shapes (random floats, in-range integers)."""
    gen = torch.Generator().manual_seed(seed)

    def one(s):
        shape = list(s["shape"])
        if batch is not None and shape:
            shape[0] = batch
        dtype = getattr(torch, s["dtype"])
        if dtype.is_floating_point:
            return torch.randn(shape, generator=gen, dtype=dtype)
        low, high = s.get("low", 0), s.get("high", 1)
        if s.get("low") == 1 and high == 2:  # masks of ones stay ones
            return torch.ones(shape, dtype=dtype)
        return torch.randint(low, max(high, low + 1), shape, generator=gen, dtype=dtype)

    return tuple(one(s) for s in spec.get("args", [])), {k: one(s) for k, s in spec.get("kwargs", {}).items()}
