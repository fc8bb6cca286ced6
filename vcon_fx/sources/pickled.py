"""A pickled nn.Module (`torch.save(model)`), and example inputs for modules of unknown origin.

Unpickling runs code from the file, so the caller reaches `load_pickled_module` only with
`trust_pickle=True`. Inputs are guessed from the first layer when no `input_shape` is given.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError
from .base import STATE_DICT_SUFFIXES, LoadedModel, example_generator, is_state_dict
from .registry import SourceKind, register_source
from .request import SourceRequest

__all__ = ["module_from_object", "guess_inputs", "PickledSource"]

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 16


def module_from_object(obj, path: Path, *, input_shape: tuple[int, ...] | None = None,
                       seq_len: int | None = None, batch_size: int = 2) -> LoadedModel:
    """Wrap an unpickled nn.Module with example inputs.

    Args:
        obj: what `torch.load(path, weights_only=False)` returned.
        path: the file, named in errors.
        input_shape: the full example input shape; guessed from the first layer otherwise.
        seq_len: the sequence length when the first layer is an Embedding.
        batch_size: the batch of a guessed input.

    Returns:
        A LoadedModel in eval mode with one positional input.

    Raises:
        LoadError: the object is not an nn.Module, or no input shape can be guessed.
    """
    if not isinstance(obj, nn.Module):
        raise LoadError(
            f"{path} holds a {type(obj).__name__}, not an nn.Module or a state dict: save the model with "
            "torch.export.save (a .pt2) or its state_dict() plus --arch"
        )
    obj.eval()
    args, task, seq = guess_inputs(obj, path, input_shape=input_shape, seq_len=seq_len, batch_size=batch_size)
    return LoadedModel(module=obj, example_args=args, task=task, seq_inputs=seq)


def guess_inputs(module: nn.Module, where, *, input_shape=None, seq_len=None, batch_size=2):
    """One example input: `input_shape` if given, else shaped for the first layer.

    Returns:
        (args, task, seq_inputs).

    Raises:
        LoadError: no Conv/Linear/Embedding layer to guess from and no `input_shape`.
    """
    gen = example_generator()
    first = next((m for m in module.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding))), None)
    if input_shape is not None:
        task = "vision" if len(input_shape) == 4 else "generic"
        if isinstance(first, nn.Embedding):
            return (torch.zeros(input_shape, dtype=torch.long),), "text", _first_arg(module)
        return (torch.randn(input_shape, generator=gen),), task, ()
    if first is None:
        raise LoadError(f"{where}: cannot guess an input shape (no Conv, Linear or Embedding layer): pass --input-shape, e.g. 1x3x224x224")
    if isinstance(first, nn.Embedding):
        shape = (batch_size, seq_len or DEFAULT_SEQ_LEN)
        args = (torch.randint(0, first.num_embeddings, shape, generator=gen),)
        task, seq = "text", _first_arg(module)
    elif isinstance(first, nn.Linear):
        shape = (batch_size, first.in_features)
        args, task, seq = (torch.randn(shape, generator=gen),), "generic", ()
    else:
        spatial = (224, 224) if isinstance(first, nn.Conv2d) else (16, 112, 112) if isinstance(first, nn.Conv3d) else (64,)
        shape = (batch_size, first.in_channels, *spatial)
        args = (torch.randn(shape, generator=gen),)
        task, seq = ("vision" if isinstance(first, nn.Conv2d) else "generic"), ()
    log.info("%s: guessed input shape %s from its first layer (%s); pass --input-shape to change it",
             where, "x".join(map(str, shape)), type(first).__name__)
    return args, task, seq


def _first_arg(module: nn.Module) -> tuple[str, ...]:
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return (params[0].name,) if params else ()


@register_source
class PickledSource(SourceKind):
    """A whole pickled nn.Module (`torch.save(model)`): read only with `trust_pickle`."""

    name, form, suffixes = "pickle", "file", (".safetensors", *STATE_DICT_SUFFIXES)

    def recognises(self, request: SourceRequest) -> bool:
        return not is_state_dict(request.content)

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        request.refuse("arch", "it holds a whole pickled module")
        lm = module_from_object(request.content, request.path, **request.inputs)
        return lm, {"path": str(request.path), "sha256": request.hash(request.path)}
