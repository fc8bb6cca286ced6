"""The model-source registry: every kind of source registers itself under the name its spec records.

A kind says how it recognises a source (a name such as `torchvision:NAME`, a folder, or a file
with one of its suffixes), how it loads one, and how it is rebuilt from the `source` spec a
recipe records. `load.py` asks the kinds; adding one = one file with a `SourceKind` subclass
decorated by `register_source`, imported in `load.py`, plus its tests.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import LoadError
from .base import LoadedModel
from .request import SourceRequest

__all__ = ["SourceKind", "register_source", "source_kinds", "SHAPE_KEYS"]

# The keys every spec records besides its kind's own: the example-input settings, and the
# dtype (only when not float32, sources/dtypes.py).
SHAPE_KEYS = ("kind", "input_shape", "seq_len", "batch_size", "dtype")


class SourceKind:
    """A kind of model source. Subclass it, set the attributes, decorate the class with `register_source`.

    Attributes:
        name: the spec's "kind".
        form: "name" (recognised by its text, before any path lookup), "folder" or "file".
        suffixes: file kinds: the suffixes it reads (lower case).
        keys: the spec keys it records besides SHAPE_KEYS.
        required: the keys that must hold a string.
    """

    name: str = ""
    form: str = "file"
    suffixes: tuple[str, ...] = ()
    keys: tuple[str, ...] = ("path", "sha256")
    required: tuple[str, ...] = ("path",)

    def recognises(self, request: SourceRequest) -> bool:
        """Whether this kind reads the request (name kinds: its text; others: its resolved path)."""
        return True

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        """The model and the spec keys recording where it came from (besides kind and SHAPE_KEYS)."""
        raise NotImplementedError

    def source_of(self, spec: Mapping[str, Any]) -> str:
        """What to hand `load_model` again to rebuild from a spec of this kind."""
        return spec["path"]

    def recorded_files(self, spec: Mapping[str, Any]) -> list[tuple[str, str | None]]:
        """(file, key of its recorded sha256 or None) for each local file a spec names."""
        return [(spec[key], sha) for key, sha in (("path", "sha256"), ("weights", "weights_sha256")) if spec.get(key)]


_KINDS: dict[str, SourceKind] = {}


def register_source(cls: type[SourceKind]) -> type[SourceKind]:
    """Class decorator: register a SourceKind subclass under its `name`."""
    if cls.name in _KINDS:
        raise LoadError(f"model source kind {cls.name!r} is registered twice: give the new kind another name")
    _KINDS[cls.name] = cls()
    return cls


def source_kinds(form: str | None = None) -> dict[str, SourceKind]:
    """The registered kinds (of one form), by name, in registration order."""
    return {name: kind for name, kind in _KINDS.items() if form is None or kind.form == form}
