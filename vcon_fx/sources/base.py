"""Shared pieces of the model loaders: the LoadedModel record, hashing, safe state-dict reads.

Everything here reads files without running code (safetensors, or `torch.load` with
`weights_only=True`), except `torch_load_safely` when the caller passed `trust_pickle`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError, UnsafeFileError, first_line
from .pickle_scan import unsafe_globals

__all__ = [
    "LoadedModel",
    "ACCEPTED",
    "ARCH_HINT",
    "STATE_DICT_SUFFIXES",
    "sha256_file",
    "sha256_files",
    "seeded",
    "example_generator",
    "is_state_dict",
    "read_state_dict",
    "load_weights_into",
    "unsafe_error",
    "torch_load_safely",
    "unwrap_checkpoint",
]

log = logging.getLogger(__name__)

# Said by every "what is this?" error, so the user always sees the full menu.
ACCEPTED = (
    "accepted sources: a torch.export archive (.pt2), a Hugging Face model folder (config.json + "
    "model.safetensors), torchvision:NAME (e.g. torchvision:resnet18), a state dict (.safetensors, "
    ".pt, .pth, .bin) with --arch, or a pickled nn.Module (.pt/.pth) with --trust-pickle"
)
# The suffixes of torch.save files: state dicts, checkpoints, or (trusted) pickled modules.
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
ARCH_HINT = "give the architecture with --arch torchvision:resnet18 or --arch path/to/hf-folder (arch= in Python)"

# Random init and example inputs use this seed, so a rebuild gives the same tensors.
SEED = 0


@dataclass
class LoadedModel:
    """A model ready for capture: the module in eval mode plus example inputs.

    Attributes:
        module: the model, in eval() mode.
        example_args: positional example inputs.
        example_kwargs: keyword example inputs (Hugging Face: input_ids, attention_mask, ...).
        source: JSON-able spec; `rebuild_model(source)` rebuilds the same architecture.
        seq_inputs: names of inputs whose dim 1 is a sequence axis (text models).
        task: "vision", "text" or "generic".
        tokenizer_path: the Hugging Face folder holding a tokenizer, if any.
        exported: the ExportedProgram for .pt2 sources (already a graph), else None.
        notes: what loading assumed or changed, said once by `vcon-fx transform`.
    """

    module: nn.Module
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    seq_inputs: tuple[str, ...] = ()
    task: str = "generic"
    tokenizer_path: str | None = None
    exported: torch.export.ExportedProgram | None = None
    notes: list[str] = field(default_factory=list)


def sha256_file(path: str | Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """Return one sha256 over several files (names + contents), for folders and shards."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        h.update(f"{p.name}:{sha256_file(p)}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Run a block with torch's CPU RNG seeded, restoring the caller's RNG state after."""
    # fork_rng keeps the caller's global RNG untouched; devices=[] avoids initialising CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        yield


def example_generator() -> torch.Generator:
    """A private, seeded generator for example inputs (never the global RNG)."""
    return torch.Generator().manual_seed(SEED)


def is_state_dict(obj: Any) -> bool:
    """True for a non-empty Mapping of str → Tensor (what `module.state_dict()` returns)."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unsafe_error(path: Path, names: list[str]) -> UnsafeFileError:
    """The one UnsafeFileError text: why unpickling is refused and the safe alternatives."""
    return UnsafeFileError(
        f"{path} holds pickled Python objects ({', '.join(names[:3])}), not just tensors; "
        "unpickling it would run code from the file, so vcon-fx refused. Safe alternatives: a .pt2 "
        "from torch.export.save, a Hugging Face folder (save_pretrained), or a state dict with "
        f"--arch ({ARCH_HINT}). If you trust this file, pass --trust-pickle (trust_pickle=True)."
    )


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or a torch.save file, without running code.

    Args:
        path: the weights file.
        trust_pickle: allow a full unpickle when the safe load refuses the file.

    Returns:
        A dict of parameter name → tensor.

    Raises:
        UnsafeFileError: the file holds pickled objects and `trust_pickle` is false.
        LoadError: the file is corrupt, empty, or not a state dict.
    """
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own SafetensorError for bad headers
            raise LoadError(f"{path} is not a readable .safetensors file ({first_line(e)}): re-save it") from e
    obj = torch_load_safely(path, trust_pickle=trust_pickle)
    obj = unwrap_checkpoint(obj, path)
    if not is_state_dict(obj):
        raise LoadError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors): "
            "save model.state_dict() instead"
        )
    return dict(obj)


def torch_load_safely(path: Path, *, trust_pickle: bool = False) -> Any:
    """`torch.load` with weights_only=True; full unpickling only when `trust_pickle` is true.

    Raises:
        UnsafeFileError: the safe load refused pickled objects and `trust_pickle` is false.
        LoadError: the file is not a readable torch.save file.
    """
    try:
        with warnings.catch_warnings():
            # Plain pickle.dump files trip this; the refusal below explains them better.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        names = unsafe_globals(e, path)
        if names is None:
            raise LoadError(
                f"{path} is not a readable torch.save file ({first_line(e)}): it may be truncated "
                f"or of another format; {ACCEPTED}"
            ) from e
        if not trust_pickle:
            raise unsafe_error(path, names) from None
    log.warning("unpickling %s with weights_only=False (--trust-pickle): this runs code from the file", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise LoadError(f"could not unpickle {path} ({first_line(e)}): the classes it names must be importable") from e


def unwrap_checkpoint(obj: Any, path: Path) -> Any:
    # Training scripts often save {"epoch": ..., "state_dict": ...}; take the weights inside.
    if isinstance(obj, Mapping) and not is_state_dict(obj):
        for key in ("state_dict", "model_state_dict", "model"):
            if is_state_dict(obj.get(key)):
                log.info("%s is a checkpoint dict: using its %r entry", path, key)
                return obj[key]
    return obj


def load_weights_into(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Load a state dict strictly, turning key and shape mismatches into one LoadError.

    Args:
        module: the freshly built architecture (changed in place).
        state: the weights.
        where: names the weights and the architecture in the error message.

    Raises:
        LoadError: missing or unexpected keys, or a tensor of the wrong shape.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    # Non-persistent buffers and tied weights may legitimately be absent from a state dict.
    missing = [k for k in missing if not _tied_or_buffer(module, k, state)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of the wrong shape (e.g. {'; '.join(wrong[:2])}: file vs model)")
        raise LoadError(
            f"{where}: the weights do not fit the architecture: {'; '.join(parts)} keys; "
            "check that --arch names the architecture the weights were saved from"
        )
    module.load_state_dict(state, strict=False)


def _tied_or_buffer(module: nn.Module, key: str, state: Mapping[str, torch.Tensor]) -> bool:
    # A tied weight (e.g. lm_head.weight = embeddings) is saved once; save_pretrained drops the copy.
    params = dict(module.named_parameters(remove_duplicate=False))
    target = params.get(key)
    if target is None:
        return False
    return any(name in state and p is target for name, p in params.items() if name != key)
