"""The `datasets` package, called offline and quietly: imported only when a table is read.

Reading a JSONL / CSV / Parquet file makes `datasets` build an Arrow cache; it goes to a temporary
folder that is deleted after the read (the rows are kept in memory), so nothing is written beside
the user's data or into ~/.cache. Its progress bars and log lines are silenced for the call, the Hub
is never asked (offline mode, packaged builders only), and its exceptions become one-line DataErrors.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import DataError

__all__ = ["load_table", "load_saved", "quiet_datasets"]

# The `datasets` builder that reads each table suffix.
BUILDERS = {".jsonl": "json", ".ndjson": "json", ".csv": "csv", ".parquet": "parquet"}
# datasets.config's switches for offline mode (read when it would reach the Hub, so setting them here counts).
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@contextlib.contextmanager
def quiet_datasets() -> Iterator[Any]:
    """`datasets`, imported, offline, without progress bars or log lines for the block (restored after)."""
    import datasets
    from datasets.utils import logging as ds_logging

    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = ds_logging.get_verbosity()
    offline = {flag: getattr(datasets.config, flag, False) for flag in _OFFLINE_FLAGS}
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # its errors reach the user as our DataError instead
    for flag in _OFFLINE_FLAGS:
        setattr(datasets.config, flag, True)
    try:
        yield datasets
    finally:
        for flag, value in offline.items():
            setattr(datasets.config, flag, value)
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def load_table(path: Path):
    """A JSONL / CSV / Parquet file as an in-memory `datasets.Dataset` (pure: the file is only read).

    Raises:
        DataError: the file cannot be parsed (datasets' own reason, first line), or holds no rows.
    """
    with quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="vcon-fx-data-") as cache:
        try:
            return datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split="train",
                                         cache_dir=cache, keep_in_memory=True)
        except Exception as e:  # datasets raises many kinds (ArrowInvalid, ParserError, DatasetGenerationError…)
            reason = first_line(e)
            if "corresponds to no data" in reason or isinstance(_root(e), StopIteration):
                raise DataError(f"data {path} holds no rows: give a file with at least one example") from None
            raise DataError(f"{path} is not a readable {path.suffix} file ({reason}): fix or re-write it") from None


def load_saved(path: Path):
    """A folder written by `save_to_disk`: an in-memory `datasets.Dataset` or `DatasetDict` (pure).

    Raises:
        DataError: the folder is incomplete or corrupt (datasets' own reason, first line).
    """
    with quiet_datasets() as datasets:
        try:
            return datasets.load_from_disk(str(path), keep_in_memory=True)
        except Exception as e:
            raise DataError(f"{path} is not a readable `datasets` folder ({first_line(e)}): write it again with "
                            "save_to_disk") from None


def first_line(error: BaseException) -> str:
    """The first line of the most telling exception behind `error` (past datasets' generic wrappers)."""
    root = _root(error)
    text = str(root).strip().splitlines()[0][:160] if str(root).strip() else ""
    return f"{type(root).__name__}: {text}" if text else type(root).__name__


def _root(error: BaseException) -> BaseException:
    # DatasetGenerationError only says "An error occurred while generating the dataset"; its cause says which.
    while type(error).__name__ == "DatasetGenerationError" and error.__cause__ is not None:
        error = error.__cause__
    return error
