"""Class labels: read without the inputs, turned from class names into indices, checked against the model."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["dataset_labels", "check_labels", "class_names", "class_indices"]


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """All labels of a dataset without reading its inputs, when it keeps them apart (None otherwise)."""
    labels = getattr(ds, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    targets = getattr(ds, "targets", None)  # torchvision ImageFolder and friends
    if targets is not None and not isinstance(targets, torch.Tensor):
        try:
            return torch.as_tensor(list(targets))
        except (TypeError, ValueError):
            return None
    return targets if isinstance(targets, torch.Tensor) else None


def check_labels(path: str | Path, labels: torch.Tensor | None, num_classes: int | None) -> None:
    """Labels must be class indices in [0, num_classes). Raises DataError naming `path` and the fix."""
    if labels is None or not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"{path}: labels must be class indices ≥ 0, found {low}: renumber the classes from 0")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"{path}: label {high} is out of range for a model with {num_classes} outputs "
                        f"(classes 0…{num_classes - 1}): renumber the labels or use a model with more outputs")


def class_names(folder: str | Path | None) -> dict[str, int]:
    """The model's class names → indices: `label2id` in a Hugging Face folder's config.json ({} without one)."""
    config = Path(folder) / "config.json" if folder is not None else None
    if config is None or not config.is_file():
        return {}
    try:
        label2id = json.loads(config.read_text(encoding="utf-8")).get("label2id") or {}
        return {str(name): int(index) for name, index in label2id.items()}
    except (ValueError, TypeError, AttributeError):
        return {}  # an odd config: names then fail below with the fix, indices still work


def class_indices(source: str, column: str, values: Sequence[Any], names: Mapping[str, int]) -> torch.Tensor:
    """One class index per value: integers (or whole floats) as they are, class names through `names` (pure).

    Args:
        source: the file (and split) the values come from, for error messages.
        column: the column they come from.
        values: the column's values, one per example.
        names: the model's class names → indices (`class_names`), possibly empty.

    Returns:
        A long tensor of the indices (their range is checked by `check_labels`).

    Raises:
        DataError: an empty cell, a fraction, a name the model does not have, or indices mixed with names.
    """
    known = ", ".join(sorted(names, key=names.get)) if names else ""
    fix = (f"give class indices 0…C−1 or the model's class names ({known})" if names else
           "give class indices 0…C−1 (the model's config.json has no label2id to look class names up in)")
    indices, kinds = [], set()
    for row, value in enumerate(values):
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            indices.append(value)
            kinds.add("index")
        elif isinstance(value, str) and value in names:
            indices.append(names[value])
            kinds.add("name")
        else:
            what = "an empty cell" if value is None else f"{value!r}, not a class index or known class name"
            raise DataError(f"{source}: column '{column}' holds {what} (row {row + 1}): {fix}")
        if len(kinds) > 1:
            raise DataError(f"{source}: column '{column}' mixes class indices and class names (row {row + 1} holds "
                            f"{values[row]!r}): {fix}, one kind for every row")
    return torch.tensor(indices, dtype=torch.long)
