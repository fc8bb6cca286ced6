"""Data for a vcon model: `load_data` told the task, tokenizer and input shapes by the model's recipe."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from .readers import load_data, model_task, tokenizer_folder
from .registry import DEFAULT_LABEL_COLUMN, DEFAULT_TEXT_COLUMN
from ..errors import DataError
from ..graph.recipe import recipe_of

__all__ = ["load_data_for"]


def load_data_for(model: torch.nn.Module, path: str | Path, *, seq_len: int | None = None,
                  num_classes: int | None = None, text_column: str = DEFAULT_TEXT_COLUMN,
                  label_column: str = DEFAULT_LABEL_COLUMN) -> Dataset:
    """`load_data` with the task, tokenizer and input shapes read from a vcon model's recipe (pure).

    Raises:
        DataError: as `load_data`, or a `seq_len` the model cannot take (its sequence length was
            fixed at export).
        StageError: `model` is not a vcon model.
    """
    recipe = recipe_of(model)
    fixed = (recipe.inputs.get("fixed") or {}).get("sequence")
    if fixed is not None and seq_len is not None and seq_len != fixed:
        raise DataError(f"seq_len {seq_len}: the model runs only at sequence length {fixed} (its shapes were fixed "
                        f"when it was exported): leave --seq-len out or pass --seq-len {fixed}")
    return load_data(path, model_task=model_task(recipe), tokenizer_path=tokenizer_folder(recipe), seq_len=seq_len,
                     input_spec=recipe.inputs, num_classes=num_classes, text_column=text_column,
                     label_column=label_column)
