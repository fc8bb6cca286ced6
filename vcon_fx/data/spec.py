"""What a model's recipe says about the data it takes: its task and its tokenizer (pure)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

__all__ = ["model_task", "model_task_from_spec", "tokenizer_folder", "is_float"]


def model_task(recipe) -> str:
    """"vision", "text" or "generic", from a recipe's example inputs (pure)."""
    return model_task_from_spec(recipe.inputs)


def model_task_from_spec(spec: Mapping[str, Any]) -> str:
    """"vision", "text" or "generic", from an example-input spec ({"args": […], "kwargs": {…}}) (pure)."""
    kwargs = spec.get("kwargs") or {}
    if "input_ids" in kwargs:
        return "text"
    if "pixel_values" in kwargs:
        return "vision"
    args = spec.get("args") or []
    if len(args) == 1 and len(args[0]["shape"]) == 4 and is_float(args[0]["dtype"]):
        return "vision"
    if len(args) == 1 and len(args[0]["shape"]) == 2 and not is_float(args[0]["dtype"]):
        return "text"
    return "generic"


def tokenizer_folder(recipe) -> str | None:
    """The Hugging Face folder of a recipe's source, where its tokenizer lives (None otherwise)."""
    source = recipe.source or {}
    if source.get("kind") == "hf":
        return source.get("path")
    if source.get("kind") == "state_dict" and source.get("arch") and Path(source["arch"]).is_dir():
        return source["arch"]
    return None


def is_float(dtype: str) -> bool:
    """Whether a dtype name ("float32", "int64", …) is a floating-point (or complex) type."""
    return dtype.startswith(("float", "bfloat", "complex")) or dtype in ("half", "double")
