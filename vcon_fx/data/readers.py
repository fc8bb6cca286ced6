"""Fine-tuning data from files: `load_data` asks the format registry which reader reads a path.

Every dataset yields one of the item forms `finetune` reads:

    (x, y)        a tensor input and its integer label       (tensor files, image folders)
    x             a tensor input alone                        (tensor files without labels)
    {name: x, …}  keyword inputs, plus "labels" when labelled (text files; tensor files keyed by
                  the model's input names, e.g. input_ids / attention_mask)

Tables (JSONL / CSV / Parquet, tables.py; `save_to_disk` folders, hf_datasets.py) give any of
these, from named columns (rows.py). The readers (tensors.py, images.py, text.py, tables.py,
hf_datasets.py) register themselves (`registry.py`); a new format is one file, imported below.
Checks happen once, at load: missing file, NaN/Inf inputs, shapes the model cannot take, labels
that are not whole numbers or lie outside [0, num_classes), an empty dataset, a missing column.
Each raises a one-line DataError that names the fix.

Example:
    >>> ds = load_data("train.npz", input_spec=vm.meta["vcon"].inputs)
    >>> x, y = ds[0]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from torch.utils.data import Dataset

from ..errors import DataError
from .labels import check_labels, dataset_labels
from .registry import DEFAULT_LABEL_COLUMN, DEFAULT_TEXT_COLUMN, ReadRequest, accepted, reader_for
from .spec import model_task, model_task_from_spec, tokenizer_folder
# Importing a reader's file registers it, in the order error messages list them: a new format is
# one file, imported here.
from .tensors import TENSOR_SUFFIXES, TensorData
from .images import read_image_folder
from .text import TEXT_SUFFIXES, TextLines
from .tables import TABLE_SUFFIXES, read_table
from .hf_datasets import read_saved_dataset

__all__ = [
    "load_data",
    "TensorData",
    "TextLines",
    "dataset_labels",
    "check_labels",
    "model_task",
    "tokenizer_folder",
    "TENSOR_SUFFIXES",
    "TEXT_SUFFIXES",
    "read_image_folder",
    "TABLE_SUFFIXES",
    "read_table",
    "read_saved_dataset",
]

log = logging.getLogger(__name__)


def load_data(
    path: str | Path,
    *,
    model_task: str | None = None,
    tokenizer_path: str | Path | None = None,
    seq_len: int | None = None,
    input_spec: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
    text_column: str = DEFAULT_TEXT_COLUMN,
    label_column: str = DEFAULT_LABEL_COLUMN,
) -> Dataset:
    """Read a data file or folder into a Dataset, checked against the model (pure: files are only read).

    Args:
        path: a `.safetensors` / `.npz` tensor file (key `inputs`, or the model's input names,
            plus optional `labels`); an image folder (one sub-folder per class, read with
            torchvision's ImageFolder); a text file, one example per line (`LABEL<TAB>text`
            lines are labelled); a `.jsonl` / `.ndjson` / `.csv` / `.parquet` table, or a folder
            written by `datasets`' `save_to_disk` (a DatasetDict's "train" split), one example per row.
        model_task: "vision", "text" or "generic" (guessed from `input_spec` when omitted).
        tokenizer_path: a Hugging Face folder holding the model's tokenizer (text files).
        seq_len: pad / truncate text to this many tokens (default: the model's example length).
        input_spec: the recipe's example-input spec (`vm.meta["vcon"].inputs`): shapes and dtypes
            to check tensor files against and to resize images to.
        num_classes: labels must lie in [0, num_classes).
        text_column: a table's column holding a text model's text (when the default "text" is
            absent, the table's only text column is read).
        label_column: a table's column of class indices or class names (the model's label2id);
            when the default "label" is absent the data is unlabelled, a name given otherwise must exist.

    Returns:
        A Dataset whose items are `(x, y)`, `x`, or dicts of keyword inputs (see the module doc).

    Raises:
        DataError: missing or unreadable data, NaN/Inf inputs, a shape the model cannot take,
            labels that are not whole numbers or are out of range, an empty dataset, a table
            column that is missing or holds the wrong kind of values.

    Example:
        >>> ds = load_data("train.safetensors", input_spec={"args": [{"shape": [1, 16], "dtype": "float32"}]})
        >>> len(ds)
        256
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path} does not exist: {accepted()}")
    spec = dict(input_spec or {})
    task = model_task or model_task_from_spec(spec)
    reader = reader_for(path, task)
    if reader is None:
        raise DataError(f"data {path} has an unknown format ({path.suffix or 'no suffix'}): {accepted()}")
    ds = reader.read(ReadRequest(path, spec, task, tokenizer_path, seq_len, text_column, label_column))
    if len(ds) == 0:
        raise DataError(f"data {path} holds no examples: give a file or folder with at least one")
    check_labels(path, dataset_labels(ds), num_classes)
    log.info("loaded %d example(s) from %s (%s)", len(ds), path, type(ds).__name__)
    return ds
