"""Stable ONNX names for a model's inputs and outputs.

Inputs are named from the forward signature (`x`, `input_ids`, `pair_0` for a list argument),
outputs from the output's pytree path (`output`, `output_0`, `logits`, `hidden_states_1`).
`check.py` feeds onnxruntime by these same names.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..graph.dims import flatten_inputs, key_str, unique_names

__all__ = ["flatten_inputs", "flatten_outputs"]

log = logging.getLogger(__name__)


def flatten_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """List the tensor leaves of a model output (tensor, tuple, dict, ModelOutput), each named (pure).

    Args:
        output: what the model's forward returned.

    Returns:
        `(name, tensor)` pairs in pytree order: `output` for a lone tensor, `output_0`, ... for
        a sequence, the key (`logits`, `hidden_states_0`) for a mapping or ModelOutput.
    """
    named = []
    for path, leaf in pytree.tree_flatten_with_path(output)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [key_str(k) for k in path]
        if not path or not isinstance(path[0], (pytree.MappingKey, pytree.GetAttrKey)):
            parts.insert(0, "output")
        named.append(("_".join(parts), leaf))
    return unique_names(named)


def _output_names(outputs: list, input_names: list[str]) -> list[str]:
    # ONNX value names are global: an output may not reuse an input's name.
    taken = set(input_names)
    names = []
    for name, _ in outputs:
        while name in taken:
            name += "_out"
        taken.add(name)
        names.append(name)
    return names


def _name_values(model, input_names: list[str], output_names: list[str], model_name: str) -> None:
    """Give graph inputs and outputs our stable names, moving aside any value holding one (in place)."""
    graph = model.graph
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        log.warning(
            "ONNX graph of %s has %d inputs and %d outputs, PyTorch %d and %d: keeping the exporter's names",
            model_name, len(graph.inputs), len(graph.outputs), len(input_names), len(output_names),
        )
        return
    import onnx_ir as ir

    by_name = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            by_name[v.name] = v
    for v in [*graph.inputs, *graph.initializers.values()]:
        by_name[v.name] = v
    renamed = set()
    for value, new in [*zip(graph.inputs, input_names), *zip(graph.outputs, output_names)]:
        if value.name == new or id(value) in renamed:
            continue  # an output that is an input unchanged keeps the input's name
        holder = by_name.get(new)
        if holder is not None and holder is not value:
            k = 0
            while f"{new}__{k}" in by_name:
                k += 1
            by_name.pop(new)
            holder.name = f"{new}__{k}"
            by_name[holder.name] = holder
        by_name.pop(value.name, None)
        value.name = new
        by_name[new] = value
        renamed.add(id(value))
