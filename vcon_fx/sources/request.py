"""What a user asked `load_model` for: the source, its options, and what reading it has cost so far.

Every kind of source reads its request: the resolved path, the options (`arch`, `weights`,
input shape …), the file's content (read once, without running code unless `trust_pickle`),
and a sha256 memo so that a rebuild hashes each file once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError, UsageError
from .base import LoadedModel, load_weights_into, read_state_dict, sha256_file, sha256_files, torch_load_safely, \
    unwrap_checkpoint

__all__ = ["SourceRequest", "hash_file", "hash_files"]

_UNREAD = object()


@dataclass
class SourceRequest:
    """One `load_model` call.

    Attributes:
        source: the source as given (a name like "torchvision:resnet18", or a path).
        path: the resolved path, once `load_model` has found it (None for named sources).
        weights / arch / trust_pickle / input_shape / seq_len / batch_size / dtype: `load_model`'s options.
        hashes: resolved path → sha256, shared with `rebuild_model`'s checks.
    """

    source: str | os.PathLike
    weights: str | os.PathLike | None = None
    arch: str | None = None
    trust_pickle: bool = False
    input_shape: tuple[int, ...] | None = None
    seq_len: int | None = None
    batch_size: int = 2
    hashes: dict[str, str] = field(default_factory=dict)
    dtype: torch.dtype | None = None
    path: Path | None = None
    _content: Any = field(default=_UNREAD, repr=False)

    @property
    def text(self) -> str:
        return os.fspath(self.source)

    @property
    def inputs(self) -> dict[str, Any]:
        """The example-input options, as the builders take them."""
        return {"input_shape": self.input_shape, "seq_len": self.seq_len, "batch_size": self.batch_size}

    @property
    def content(self) -> Any:
        """The file's object: a state dict, or (trusted) an unpickled object; read once.

        Raises:
            LoadError: the file is not readable.
            UnsafeFileError: it needs unpickling and `trust_pickle` is false.
        """
        if self._content is _UNREAD:
            path = self.path
            if path.suffix.lower() == ".safetensors":
                self._content = read_state_dict(path)
            else:
                self._content = unwrap_checkpoint(torch_load_safely(path, trust_pickle=self.trust_pickle), path)
        return self._content

    def refuse(self, flag: str, why: str) -> None:
        """Raise UsageError when the option `flag` ("arch" or "weights") was given to a source that takes none."""
        if getattr(self, flag) is not None:
            where = self.path if self.path is not None else self.text
            raise UsageError(f"--{flag} does not apply to {where}: {why}")

    def hash(self, path: Path) -> str:
        return hash_file(path, self.hashes)

    def hash_many(self, paths: list[Path]) -> str:
        return hash_files(paths, self.hashes)

    def load_weights(self, lm: LoadedModel, where) -> dict[str, str | None]:
        """Load the `weights=` state dict into a freshly built architecture (in place on `lm.module`).

        Returns:
            The spec keys recording them: weights and weights_sha256 (None when not given).

        Raises:
            LoadError: the file is missing or its weights do not fit.
        """
        if self.weights is None:
            return {"weights": None, "weights_sha256": None}
        path = Path(self.weights).expanduser()
        if not path.is_file():
            raise LoadError(f"weights file {os.fspath(self.weights)!r} does not exist: give a .safetensors or .pt "
                            "state dict")
        path = path.resolve()
        load_weights_into(lm.module, read_state_dict(path, trust_pickle=self.trust_pickle), f"{path} into {where}")
        return {"weights": str(path), "weights_sha256": self.hash(path)}


def hash_file(path: Path, hashes: dict[str, str]) -> str:
    """The sha256 of a file, memoised in `hashes` by resolved path."""
    key = str(path.resolve())
    if key not in hashes:
        hashes[key] = sha256_file(path)
    return hashes[key]


def hash_files(paths: list[Path], hashes: dict[str, str]) -> str:
    """One sha256 over several files (a folder's config and shards); one file's is its own."""
    if len(paths) == 1:
        return hash_file(paths[0], hashes)
    return sha256_files(paths)
