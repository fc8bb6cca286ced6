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

__all__ = ["dynamic_shapes", "positional_names", "key_str", "flatten_inputs", "unique_names", "MIN_DYNAMIC_SIZE", "fixed_dims", "dynamic_shapes_call"]

# torch.export specialises sizes 0 and 1 (it cannot tell a broadcast from a batch of one), so an
# example input meant to have a dynamic batch or sequence never uses them.
MIN_DYNAMIC_SIZE = 2


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


def fixed_dims(gm, inputs: list[tuple[str, torch.Tensor]], seq_inputs: tuple[str, ...] = (),
               placeholders: set[str] | None = None) -> dict[str, int]:
    """{"batch": B, "sequence": S} for the batch / sequence dims a torch.export graph fixed (pure).

    An exported graph's placeholders carry fake tensors: an int where a symbol was wanted means the
    graph runs only at that size. torch.fx graphs carry none and are shape-generic: {}.

    Args:
        gm: a captured graph, or an ExportedProgram's graph module.
        inputs: (name, tensor) of its tensor inputs, in placeholder order.
        seq_inputs: names whose dim 1 is a sequence axis.
        placeholders: the names of the input placeholders, where the graph has others (an
            ExportedProgram's lifted weights); None: every placeholder is an input.
    """
    fakes = [n.meta.get("val") for n in gm.graph.nodes
             if n.op == "placeholder" and (placeholders is None or n.name in placeholders)]
    fakes = [v for v in fakes if isinstance(v, torch.Tensor)]
    if len(fakes) != len(inputs):
        return {}
    fixed: dict[str, int] = {}
    for (name, _), fake in zip(inputs, fakes):
        if fake.dim() >= 1 and _pinned(fake.shape[0]) is not None:
            fixed["batch"] = _pinned(fake.shape[0])
        if name in seq_inputs and fake.dim() >= 2 and _pinned(fake.shape[1]) is not None:
            fixed["sequence"] = _pinned(fake.shape[1])
    return fixed


def _pinned(dim) -> int | None:
    """The one size a dim allows: an int, or a symbol whose range the graph pinned to one value."""
    if isinstance(dim, int):
        return dim
    node = getattr(dim, "node", None)
    env = getattr(node, "shape_env", None)
    bounds = env.var_to_range.get(node.expr) if env is not None else None
    if bounds is not None and bounds.lower == bounds.upper and bounds.lower.is_finite:
        return int(bounds.lower)
    return None


def dynamic_shapes_call(names: list[str], seq_inputs: tuple[str, ...] = ()) -> str:
    """The `dynamic_shapes=` argument that makes batch (and sequence) dynamic, with these input names (pure).

    Example:
        >>> dynamic_shapes_call(["x"])
        'dynamic_shapes={"x": {0: Dim.AUTO}}'
    """
    parts = [f'"{n}": {{0: Dim.AUTO, 1: Dim.AUTO}}' if n in seq_inputs else f'"{n}": {{0: Dim.AUTO}}' for n in names]
    return "dynamic_shapes={" + ", ".join(parts) + "}"


def flatten_inputs(model: nn.Module, args: tuple, kwargs: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """List the tensor inputs in the order the exporter flattens them, each with its ONNX name (pure).

    Args:
        model: the model whose `forward` signature names the positional inputs.
        args: positional inputs.
        kwargs: keyword inputs.

    Returns:
        `(name, tensor)` pairs; non-tensor inputs (None, ints, flags) are left out, as the
        exporter bakes them into the graph.
    """
    params = positional_names(model)
    named = []
    for path, leaf in pytree.tree_flatten_with_path((tuple(args), dict(kwargs or {})))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        top, *rest = path[1:]
        if path[0].idx == 0:
            head = params[top.idx] if top.idx < len(params) else f"input_{top.idx}"
        else:
            head = str(top.key)
        named.append(("_".join([head, *(key_str(k) for k in rest)]), leaf))
    return unique_names(named)


def unique_names(named: list) -> list:
    """(name, value) pairs with repeated names numbered: `x`, `x_1` (pure)."""
    # two leaves can flatten to one name (`x_0` the argument, `x` a list); number the later one
    seen: set[str] = set()
    result = []
    for name, value in named:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}_{k}"
        seen.add(new)
        result.append((new, value))
    return result
