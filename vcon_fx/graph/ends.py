"""The stem and the head of a model, by graph position: the first weight layer reached from the
inputs and the last one before the outputs.

Weight layers are every op that reads a weight matrix (a module holding one, or a function on a
parameter such as a functional embedding), compressible or not, so a model whose first weights
sit in a layer vcon-fx does not compress has no stem among its compressible layers: a classifier
Linear after Conv3d layers is the head, never the stem.
"""

from __future__ import annotations

import contextlib
import operator

from torch import fx

from ..methods.base import LayerSite

__all__ = ["stem_and_head"]


def stem_and_head(gm: fx.GraphModule, sites: dict[str, LayerSite]) -> tuple[str | None, str | None]:
    """The first weight layer reached from the inputs and the last one before the outputs, when
    they are compressible layers (pure).

    Weight layers are every op that reads a weight matrix (a module holding one, or a function on
    a parameter such as a functional embedding), compressible or not.
    """
    weighted = _weight_nodes(gm)
    from_inputs: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in from_inputs for a in node.all_input_nodes):
            from_inputs.add(node)
    to_outputs: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op == "output" or any(u in to_outputs for u in node.users):
            to_outputs.add(node)
    first = next((n for n in weighted if n in from_inputs), None)
    last = next((n for n in reversed(weighted) if n in to_outputs), None)

    def as_site(node):
        return node.target if node is not None and node.op == "call_module" and node.target in sites else None
    return as_site(first), as_site(last)


def _weight_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Nodes that compute with a weight matrix (≥ 2-D parameter), in graph order."""
    params = {id(p) for p in gm.parameters() if p.dim() >= 2}

    def holds(node: fx.Node) -> bool:
        if node.op == "call_module":
            return any(id(p) in params for p in gm.get_submodule(node.target).parameters())
        if node.op in ("call_function", "call_method"):
            return any(a.op == "get_attr" and id(_attr(gm, a.target)) in params for a in node.all_input_nodes)
        return False
    return [n for n in gm.graph.nodes if holds(n)]


def _attr(gm: fx.GraphModule, target: str):
    with contextlib.suppress(AttributeError):
        return operator.attrgetter(target)(gm)
    return None
