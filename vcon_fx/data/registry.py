"""The data-format registry: one reader per format, each saying how it recognises a path.

`load_data` asks the readers in registration order; a `catch_all` reader (any folder, any file
of a text model) is asked only after every other has declined. Adding a format = one file with
a function decorated by `register_reader`, imported in `readers.py`, plus its tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from torch.utils.data import Dataset

from ..errors import DataError

__all__ = ["DataReader", "ReadRequest", "register_reader", "registered_readers", "reader_for", "accepted",
           "DEFAULT_TEXT_COLUMN", "DEFAULT_LABEL_COLUMN"]

DEFAULT_TEXT_COLUMN = "text"
DEFAULT_LABEL_COLUMN = "label"


@dataclass(frozen=True)
class ReadRequest:
    """What a reader gets: the path and what the model says about its inputs.

    Attributes:
        path: the data file or folder (it exists).
        spec: the recipe's example-input spec ({"args": [...], "kwargs": {...}}), or {}.
        task: "vision", "text" or "generic".
        tokenizer_path: a Hugging Face folder holding the model's tokenizer, or None.
        seq_len: tokens per text example, or None (the model's example length).
        text_column: the column of a table holding a text model's text (default "text"; when absent,
            the table's only text column).
        label_column: the column holding class labels (default "label"; when absent, the data is unlabelled).
    """

    path: Path
    spec: Mapping[str, Any] = field(default_factory=dict)
    task: str = "generic"
    tokenizer_path: str | Path | None = None
    seq_len: int | None = None
    text_column: str = DEFAULT_TEXT_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN


@dataclass(frozen=True)
class DataReader:
    """One registered data format.

    Attributes:
        name: the format's name ("tensors", "image folder", …).
        describes: how error messages name what it reads, e.g. "an image folder (one sub-folder per class)".
        recognises: (path, task) → whether this reader reads the path.
        read: ReadRequest → Dataset; raises DataError naming the path and the fix.
        catch_all: asked only after every other reader declined (it recognises broadly).
    """

    name: str
    describes: str
    recognises: Callable[[Path, str], bool]
    read: Callable[[ReadRequest], Dataset]
    catch_all: bool = False


_READERS: dict[str, DataReader] = {}


def register_reader(name: str, *, describes: str, recognises: Callable[[Path, str], bool], catch_all: bool = False):
    """Decorator: register `read(request) -> Dataset` as the reader of the format `name`."""
    def wrap(read: Callable[[ReadRequest], Dataset]) -> Callable[[ReadRequest], Dataset]:
        if name in _READERS:
            raise DataError(f"data format {name!r} is registered twice: give the new reader another name")
        _READERS[name] = DataReader(name, describes, recognises, read, catch_all)
        return read

    return wrap


def registered_readers() -> tuple[DataReader, ...]:
    """Every reader, in the order they are asked (catch-all readers last)."""
    readers = list(_READERS.values())
    return tuple([r for r in readers if not r.catch_all] + [r for r in readers if r.catch_all])


def reader_for(path: Path, task: str) -> DataReader | None:
    """The first reader that recognises `path` for a model of `task`, or None."""
    return next((r for r in registered_readers() if r.recognises(path, task)), None)


def accepted() -> str:
    """What the readers accept, for error messages: "give A, B, or C"."""
    described = [r.describes for r in _READERS.values()]
    if len(described) == 1:
        return f"give {described[0]}"
    return f"give {', '.join(described[:-1])}, or {described[-1]}"
