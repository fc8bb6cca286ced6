"""Folders written by `datasets`' `save_to_disk`: a Dataset, or a DatasetDict whose split is chosen.

A DatasetDict gives its "train" split, or its only one (a log line says which); the folder of one
split (`folder/test`) is itself such a folder, for reading another. Rows become examples in rows.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .offline_datasets import load_saved
from .registry import ReadRequest, register_reader
from .rows import rows_to_dataset

__all__ = ["read_saved_dataset", "is_saved_dataset"]

log = logging.getLogger(__name__)


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


@register_reader("datasets folder", describes="a folder written by datasets' save_to_disk",
                 recognises=lambda path, task: is_saved_dataset(path))
def read_saved_dataset(request: ReadRequest) -> Dataset:
    """A `save_to_disk` folder's rows (the "train" split, or the only one, of a DatasetDict) (pure).

    Raises:
        DataError: an unreadable folder, a DatasetDict with several splits and none "train", or rows
            the model cannot take (see rows.py).
    """
    path = request.path
    loaded = load_saved(path)
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return rows_to_dataset(loaded, request, str(path))
    splits = list(loaded.keys())
    if "train" in splits or len(splits) == 1:
        split = "train" if "train" in splits else splits[0]
        if len(splits) > 1:
            other = next(s for s in splits if s != "train")
            log.warning("%s: reading the split 'train' (of %s); give %s to read another",
                        path, ", ".join(splits), path / other)
        elif split != "train":  # a lone "test" split may not be what the user meant to train on
            log.warning("%s: reading its only split, '%s'", path, split)
        return rows_to_dataset(loaded[split], request, f"{path} (split '{split}')")
    raise DataError(f"{path} holds the splits {', '.join(splits) or 'none'} and none is 'train': give the folder of "
                    f"one, e.g. {path / (splits[0] if splits else 'train')}")
