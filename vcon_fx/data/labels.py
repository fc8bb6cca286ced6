"""Class labels, read without the inputs and checked against the model's class count."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["dataset_labels", "check_labels"]


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
