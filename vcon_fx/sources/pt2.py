"""Load a torch.export archive (.pt2): already a graph, and safe (no unpickling of code).

Example inputs come from the program's stored `example_inputs` when the archive has them;
otherwise they are rebuilt from the placeholder metadata (shape and dtype of each user input,
with symbolic dims set to their recorded hint, or the smallest size the range allows ≥ 2).
"""

from __future__ import annotations

import contextlib
import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from ..errors import LoadError, UsageError, first_line
from .base import LoadedModel, example_generator
from .pt2_dynamic import make_dynamic
from .registry import SourceKind, register_source
from .request import SourceRequest

__all__ = ["load_pt2", "TEXT_INPUT_NAMES", "Pt2Source"]

log = logging.getLogger(__name__)

# Input names that mark a sequence axis at dim 1 (the Hugging Face conventions).
TEXT_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids",
                    "decoder_attention_mask")


def load_pt2(path: Path, *, input_shape: tuple[int, ...] | None = None) -> LoadedModel:
    """Load a .pt2 archive written by `torch.export.save`.

    Args:
        path: the archive.
        input_shape: replaces the example input's shape (only for a single-tensor input).

    Returns:
        A LoadedModel with `exported` set; `source` is filled in by the caller.

    Raises:
        LoadError: the archive is truncated, corrupt or not a torch.export archive.
        UsageError: `input_shape` given for a program with several tensor inputs.
    """
    # Checked first so a damaged file gives one line instead of torch's logged traceback.
    if not zipfile.is_zipfile(path):
        raise LoadError(
            f"{path} is not a torch.export archive (no zip directory found: the file is truncated or "
            "of another format): re-create it with torch.export.save(ep, path)"
        )
    with _quiet_export_log() as records:
        try:
            ep = torch.export.load(str(path))
        except Exception as e:
            # torch logs the real failure (with a traceback) and raises a generic "see the warnings above".
            cause = next((r.exc_info[1] for r in reversed(records) if r.exc_info and r.exc_info[1]), e)
            raise LoadError(
                f"{path} could not be read as a torch.export archive ({first_line(cause)}): re-create it with "
                "torch.export.save from this torch version"
            ) from e

    if ep.example_inputs is not None:
        args, kwargs = ep.example_inputs
        args, kwargs = tuple(args), dict(kwargs)
    else:
        log.info("%s stores no example inputs: building them from the graph's input shapes", path)
        args, kwargs = _inputs_from_specs(ep)
    if input_shape is not None:
        args, kwargs = _reshape_single_input(args, kwargs, input_shape, path)

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    names += list(kwargs)
    seq_inputs = tuple(n for n in TEXT_INPUT_NAMES if n in names)
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if seq_inputs:
        task = "text"
    elif len(tensors) == 1 and tensors[0].dim() == 4 and tensors[0].is_floating_point():
        task = "vision"
    else:
        task = "generic"
    freed = make_dynamic(ep, args, kwargs, _tensor_input_names(ep), seq_inputs, path)
    ep, args, kwargs = freed.ep, freed.args, freed.kwargs
    module = ep.module()
    # Unlifted export modules reject .eval() in some versions; train/eval was fixed at export time.
    try:
        module.eval()
    except NotImplementedError:
        pass
    return LoadedModel(module=module, example_args=args, example_kwargs=kwargs, seq_inputs=seq_inputs,
                       task=task, exported=ep, notes=[freed.note] if freed.note else [])


def _tensor_input_names(ep) -> list[str]:
    """The names of the program's tensor inputs, in placeholder order."""
    user = set(ep.graph_signature.user_inputs)
    return [n.name for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in user and isinstance(n.meta.get("val"), torch.Tensor)]


class _Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _quiet_export_log():
    """Collect the records of the `torch.export` logger instead of printing them (the library never prints)."""
    logger = logging.getLogger("torch.export")
    keep, saved = _Keep(), (logger.handlers[:], logger.propagate)
    logger.handlers, logger.propagate = [keep], False
    try:
        yield keep.records
    finally:
        logger.handlers, logger.propagate = saved


def _inputs_from_specs(ep) -> tuple[tuple, dict]:
    """Build inputs matching each user placeholder's recorded shape and dtype."""
    bounds = {str(sym): vr for sym, vr in ep.range_constraints.items()}
    user = set(ep.graph_signature.user_inputs)
    gen = example_generator()
    leaves = []
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            shape = [_concrete(d, bounds) for d in val.shape]
            leaves.append(_fill(shape, val.dtype, gen))
        else:
            leaves.append(val)  # a constant input (int, float, None) is stored as itself
    args, kwargs = pytree.tree_unflatten(leaves, ep.call_spec.in_spec)
    return tuple(args), dict(kwargs)


def _concrete(dim: Any, bounds: dict) -> int:
    if isinstance(dim, int):
        return dim
    hint = getattr(getattr(dim, "node", None), "hint", None)
    if hint is not None:
        return int(hint)
    vr = bounds.get(str(dim))
    lower = int(vr.lower) if vr is not None and vr.lower.is_finite else 2
    upper = int(vr.upper) if vr is not None and vr.upper.is_finite else None
    # ≥ 2 because export specialises dims of size 0 and 1.
    size = max(lower, 2)
    return min(size, upper) if upper is not None else size


def _fill(shape: list[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    # Integer inputs are usually indices (token ids, masks): 0 is valid for every embedding.
    return torch.zeros(shape, dtype=dtype)


def _reshape_single_input(args: tuple, kwargs: dict, shape: tuple[int, ...], path: Path):
    leaves, spec = pytree.tree_flatten((args, kwargs))
    idx = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    if len(idx) != 1:
        raise UsageError(
            f"--input-shape gives one shape but {path} takes {len(idx)} tensor inputs: "
            "leave --input-shape out to use the inputs stored in the archive"
        )
    old = leaves[idx[0]]
    leaves[idx[0]] = _fill(list(shape), old.dtype, example_generator())
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


@register_source
class Pt2Source(SourceKind):
    """A torch.export archive: safest, and already a graph."""

    name, form, suffixes = "pt2", "file", (".pt2",)

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        request.refuse("arch", "a .pt2 archive holds its graph already")
        lm = load_pt2(request.path, input_shape=request.input_shape)
        return lm, {"path": str(request.path), "sha256": request.hash(request.path)}
