"""Tables: JSON-lines (.jsonl, .ndjson), CSV (.csv) and Parquet (.parquet) files, one example per row.

Read with `datasets` (offline_datasets.py), turned into examples by rows.py: a text model reads the
`text` column, other models a column of arrays or the numeric columns; `label` holds class indices
or names. (.tsv stays a text-lines file: `LABEL<TAB>text`, text.py.)
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DataError
from .offline_datasets import BUILDERS, load_table
from .registry import ReadRequest, register_reader
from .rows import rows_to_dataset

__all__ = ["read_table", "TABLE_SUFFIXES"]

TABLE_SUFFIXES = tuple(BUILDERS)


@register_reader("table", describes="a .jsonl, .csv or .parquet table (columns 'text' or numbers, optional 'label')",
                 recognises=lambda path, task: path.is_file() and path.suffix.lower() in TABLE_SUFFIXES)
def read_table(request: ReadRequest) -> Dataset:
    """A JSONL / CSV / Parquet file, one example per row (pure: the file is only read).

    Raises:
        DataError: an empty or unreadable file, or rows the model cannot take (see rows.py).
    """
    path = request.path
    if _blank(path):
        raise DataError(f"data {path} holds no rows (the file is empty): give a file with at least one example")
    return rows_to_dataset(load_table(path), request, str(path))


def _blank(path: Path) -> bool:
    """Whether the file is empty or, for the text formats, only white space (read no more than 64 KiB)."""
    with path.open("rb") as f:
        head = f.read(1 << 16)
    return not head or (path.suffix.lower() != ".parquet" and len(head) < (1 << 16) and not head.strip())
