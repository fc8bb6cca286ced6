"""Rows of a table → a Dataset for the model: text tokenized, numbers shaped to its input, labels as indices.

The table readers (tables.py: JSONL / CSV / Parquet; hf_datasets.py: a `save_to_disk` folder) read
the rows with `datasets` and hand them here. The columns used:

    text models   the text column (`text_column`, default "text"; when absent, the table's only
                  text column), tokenized as text files are (`text.tokenize_texts`)
    other models  a column of images (`datasets`' Image feature), decoded and resized as image
                  folders are (image_rows.py); else a column of lists / arrays, named like the
                  model's keyword input or one of INPUT_COLUMNS (else the table's only such
                  column); else every numeric column but the label's, side by side; reshaped to
                  the model's per-example input
    labels        `label_column` (default "label", else "labels"; absent: unlabelled), class indices
                  or the model's class names (config.json's label2id)
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .image_rows import ImageRows, image_column
from .labels import class_indices, class_names
from .registry import DEFAULT_LABEL_COLUMN, DEFAULT_TEXT_COLUMN, ReadRequest
from .spec import is_float
from .tensors import TensorData, check_input
from .text import TextLines, tokenize_texts

__all__ = ["rows_to_dataset", "INPUT_COLUMNS"]

log = logging.getLogger(__name__)

# Column names taken as a model's input, after its own keyword-input name.
INPUT_COLUMNS = ("pixel_values", "x", "input", "inputs", "features")
_ARRAY_FEATURES = {"List", "LargeList", "Sequence", "Array2D", "Array3D", "Array4D", "Array5D"}


def rows_to_dataset(table, request: ReadRequest, source: str) -> Dataset:
    """The rows of a `datasets.Dataset` as the examples the model takes (pure).

    Args:
        table: the rows, in memory.
        request: the model's task, input spec, tokenizer folder and the column names asked for.
        source: the file (and split) the rows come from, for messages.

    Returns:
        TextLines for a text model, ImageRows for a column of images, else TensorData: `(x, y)` /
        `x` items, or dicts for keyword inputs.

    Raises:
        DataError: no rows, a missing column, text that is not text, numbers of the wrong size,
            empty cells, or labels that are neither class indices nor the model's class names.
    """
    if table.num_rows == 0:
        raise DataError(f"data {source} holds no rows: give a file with at least one example")
    label_column = _label_column(table, request, source)
    if request.task == "text":
        texts = _texts(table, _text_column(table, request, source, label_column), source)
        inputs = tokenize_texts(request.path, texts, request)
        return TextLines(inputs, _labels(table, label_column, request, source), texts)
    images = image_column(table, label_column, source)
    if images is not None:
        return ImageRows(table, images, _labels(table, label_column, request, source), request, source)
    inputs = _model_inputs(table, request, source, label_column)
    return TensorData(inputs, _labels(table, label_column, request, source))


def _labels(table, column: str | None, request: ReadRequest, source: str) -> torch.Tensor | None:
    if column is None:
        return None
    return class_indices(source, column, list(table[column]), class_names(request.tokenizer_path))


def _missing(source: str, column: str, flag: str, table) -> DataError:
    return DataError(f"{source} has no column '{column}' (its columns: {', '.join(table.column_names)}): "
                     f"name the right one with {flag}")


def _label_column(table, request: ReadRequest, source: str) -> str | None:
    name = request.label_column
    if name in table.column_names:
        return name
    if name != DEFAULT_LABEL_COLUMN:  # named on purpose: it must be there
        raise _missing(source, name, "--label-column", table)
    if "labels" in table.column_names:
        log.warning("%s has no column 'label': reading the labels from 'labels'", source)
        return "labels"
    return None


def _text_column(table, request: ReadRequest, source: str, label_column: str | None) -> str:
    name = request.text_column
    strings = [c for c in table.column_names if c != label_column and _is_text(table.features[c])]
    if name in table.column_names:
        if name not in strings:
            raise DataError(f"{source}: column '{name}' holds {table.features[name]}, not text: name the text "
                            f"column with --text-column (text columns: {', '.join(strings) or 'none'})")
        return name
    if name != DEFAULT_TEXT_COLUMN or len(strings) != 1:
        raise _missing(source, name, "--text-column", table)
    log.warning("%s has no column 'text': reading the text from '%s', its only text column", source, strings[0])
    return strings[0]


def _texts(table, column: str, source: str) -> list[str]:
    texts = list(table[column])
    empty = next((row for row, text in enumerate(texts) if text is None), None)
    if empty is not None:
        raise DataError(f"{source}: column '{column}' has an empty cell (row {empty + 1}): fill or drop that row")
    return texts


def _model_inputs(table, request: ReadRequest, source: str, label_column: str | None) -> Any:
    args, kwargs = list(request.spec.get("args") or []), dict(request.spec.get("kwargs") or {})
    if len(args) + len(kwargs) > 1 and args:
        raise DataError(f"{source}: the model takes {len(args) + len(kwargs)} inputs, one of them positional; a "
                        "table gives one: save the inputs in a .safetensors / .npz file instead")
    if len(kwargs) > 1:  # one column per keyword input, named like it
        absent = [name for name in kwargs if name not in table.column_names]
        if absent:
            raise DataError(f"{source} has no column {absent[0]!r} (its columns: {', '.join(table.column_names)}): "
                            f"the model takes {', '.join(kwargs)}; give one column per input, named like it")
        return {name: _input(table, [name], spec, source) for name, spec in kwargs.items()}
    name, spec = next(iter(kwargs.items())) if kwargs else (None, args[0] if args else None)
    columns = _input_columns(table, name, source, label_column)
    x = _input(table, columns, spec, source)
    return {name: x} if name is not None else x


def _input_columns(table, name: str | None, source: str, label_column: str | None) -> list[str]:
    """The column of arrays holding the model's input, or else every numeric column but the label's."""
    others = [c for c in table.column_names if c != label_column]
    arrays = [c for c in others if type(table.features[c]).__name__ in _ARRAY_FEATURES]
    named = [c for c in ([name] if name else []) + list(INPUT_COLUMNS) if c in arrays]
    if named or len(arrays) == 1:
        return (named or arrays)[:1]
    wanted = name or INPUT_COLUMNS[1]
    if arrays:
        raise DataError(f"{source}: columns {', '.join(arrays)} all hold lists, and none is named like the model's "
                        f"input: rename the input column to '{wanted}'")
    numeric = [c for c in others if _is_number(_dtype(table.features[c]))]
    if not numeric:
        raise DataError(f"{source} has no numeric column for the model's input (its columns: "
                        f"{', '.join(table.column_names)}): give numbers, or one column '{wanted}' of lists")
    ignored = [c for c in others if c not in numeric]
    if ignored:
        log.warning("%s: ignoring the non-numeric column(s) %s", source, ", ".join(ignored))
    return numeric


def _input(table, columns: list[str], spec: dict | None, source: str) -> torch.Tensor:
    """The numbers of `columns` as one N×… tensor of the model's input shape and dtype."""
    named = ", ".join(columns)
    values = table.with_format("numpy", columns=columns)[:]
    try:
        if len(columns) == 1 and values[columns[0]].dtype == object:  # lists: one array per row
            x = np.stack([np.asarray(row) for row in values[columns[0]]])
        else:
            x = np.stack([values[c] for c in columns], axis=1) if len(columns) > 1 else values[columns[0]]
        x = x.astype(np.float64) if x.dtype == object else x
    except (ValueError, TypeError):
        raise DataError(f"{source}: the rows of column '{named}' differ in size or have empty cells: give every "
                        "row the same count of numbers") from None
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: column(s) {named} hold {x.dtype.name} values, not numbers: give numbers")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{source}: column(s) {named} hold an empty cell or NaN/Inf (row {row + 1}): fill or drop "
                        "those rows")
    x = x.reshape(len(x), -1)
    if spec is not None:
        want = list(spec["shape"][1:])
        need = math.prod(want)
        free_length = not is_float(spec["dtype"]) and len(want) == 1  # token ids: any sequence length
        if x.shape[1] != need and not free_length:
            shape = f" ({'×'.join(map(str, want))})" if len(want) > 1 else ""
            raise DataError(f"{source}: column(s) {named} give {x.shape[1]} number(s) per example, but the model "
                            f"takes {need}{shape} per example: give {need} numbers per row")
        x = x if free_length else x.reshape(len(x), *want)
    return check_input(source, named, torch.from_numpy(np.ascontiguousarray(x)), spec)


def _dtype(feature) -> str | None:
    """The element dtype of a `datasets` feature: Value("int64") → "int64", ClassLabel → "int64", a list → its items."""
    while hasattr(feature, "feature"):  # List / Sequence wrap their element feature
        feature = feature.feature
    if type(feature).__name__ == "ClassLabel":
        return "int64"
    return getattr(feature, "dtype", None)


def _is_text(feature) -> bool:
    return type(feature).__name__ == "Value" and feature.dtype in ("string", "large_string")


def _is_number(dtype: str | None) -> bool:
    return bool(dtype) and dtype.startswith(("int", "uint", "float", "bool"))
