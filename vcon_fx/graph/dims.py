"""Which input dims are dynamic: dim 0 of every tensor input (batch), dim 1 of sequence inputs.

One policy for both places that ask torch.export for dynamic dims: capture (graph/capture_export.py)
and the ONNX export (export/). Inputs are named as the ONNX file names them: the forward
parameter, then the pytree path (`x_0`, `batch_input_ids`), so `seq_inputs` means the same in both.
"""

from __future__ import annotations

import inspect
import re

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import UsageError

__all__ = ["dynamic_shapes", "positional_names", "key_str"]


def dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, *, dynamic_batch: bool = True,
                   seq_inputs: tuple[str, ...] = ()) -> dict:
    """dynamic_shapes keyed by forward parameter name, mirroring each input's structure (pure).

    Dim.AUTO, neither named Dims nor Dim.DYNAMIC: when the model pins a size (a branch on
    x.shape, a literal reshape), a named Dim makes the ONNX exporter quietly retry with that
    dim static, and DYNAMIC fails with torch.export's long message; AUTO keeps the symbol and
    records the pin as a range [2, 2], which the ONNX export's axis check turns into a clear error.
    Named Dims shared by inputs also force their sizes equal, an error when they are not.
    """
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise UsageError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from None
    params = inspect.signature(model.forward).parameters
    positional = positional_names(model)
    auto = torch.export.Dim.AUTO

    def spec(head: str, value):
        def leaf(path, t):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return None
            dims = {0: auto} if dynamic_batch else {}
            if "_".join([head, *(key_str(k) for k in path)]) in seq_inputs and t.dim() >= 2:
                dims[1] = auto
            return dims or None
        return pytree.tree_map_with_path(leaf, value)

    shapes = {}
    for pname, value in bound.arguments.items():
        kind = params[pname].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[pname] = tuple(spec(f"input_{len(positional) + i}", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[pname] = {k: spec(k, v) for k, v in value.items()}
        else:
            shapes[pname] = spec(pname, value)
    return shapes


def positional_names(model: nn.Module) -> list[str]:
    """The names of `model.forward`'s positional parameters, in order (pure)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def key_str(key) -> str:
    """One pytree path key as a name part: an index, a dict key or an attribute (pure)."""
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.MappingKey):
        return re.sub(r"\W", "_", str(key.key))
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return re.sub(r"\W", "_", str(key))
