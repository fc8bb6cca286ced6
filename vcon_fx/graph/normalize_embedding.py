"""Normalize embeddings: a functional lookup on a parameter becomes a `call_module` of an nn.Embedding.

torch.export (the route Hugging Face models take) records `nn.Embedding` as
`aten.embedding.default(weight, ids, padding_idx, scale_grad_by_freq, sparse)` on a `get_attr`
weight, and a traced graph may call `F.embedding(ids, self.weight)`. Each is lifted into an
nn.Embedding holding the very same Parameter (nothing copied), so selection sees the token
embedding as a layer (the stem), and an LM head whose weight is that table is found tied to it
by identity, as for an eager model. The lookup options travel with it: `padding_idx` (aten's −1
means none), `max_norm` (F.embedding only), `scale_grad_by_freq`, `sparse`.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["embedding_calls", "lift_embeddings"]

_aten = torch.ops.aten
_ATEN_ARGS = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")
_EMBEDDING = {
    _aten.embedding.default: _ATEN_ARGS,
    torch.embedding: _ATEN_ARGS,
    F.embedding: ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
}
_OPTIONS = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")


def lift_embeddings(gm: fx.GraphModule, tied: dict[str, str],
                    is_layer_call: Callable[[fx.Node], bool]) -> dict[str, nn.Parameter]:
    """Replace every embedding lookup on a parameter by a call of an nn.Embedding holding it (in place).

    The same lookup twice (one weight, the same options) is one layer called twice. A table also
    read by something other than a lookup or a liftable layer call (`is_layer_call`: a Linear
    head is one) is recorded in `tied` (layer path → reason), so selection refuses it.

    Returns:
        The lifted layers: path → the Parameter each now holds.
    """
    lifted: dict[tuple, str] = {}
    layers: dict[str, nn.Parameter] = {}
    for node in list(gm.graph.nodes):
        spec = _embedding_spec(gm, node)
        if spec is None:
            continue
        ids, weight_node, options = spec
        weight = attrgetter(weight_node.target)(gm)
        key = (id(weight), tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in lifted:
            path = _place(gm, node, weight)
            gm.set_submodule(path, _make_embedding(weight, options), strict=False)
            lifted[key], layers[path] = path, weight
            others = [u for u in weight_node.users
                      if u is not node and _embedding_spec(gm, u) is None and not is_layer_call(u)]
            if others:
                tied[path] = f"its table {weight_node.target} is also read by node {others[0].name} ({others[0].target})"
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(lifted[key], (ids,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        if not weight_node.users:
            gm.graph.erase_node(weight_node)
    return layers


def embedding_calls(gm: fx.GraphModule) -> list[fx.Node]:
    """Functional embedding lookups on a parameter, which `lift_embeddings` always lifts (pure)."""
    return [n for n in gm.graph.nodes if _embedding_spec(gm, n) is not None]


def _attr(gm: fx.GraphModule, target: str):
    try:
        return attrgetter(target)(gm)
    except AttributeError:
        return None


def _embedding_spec(gm: fx.GraphModule, node: fx.Node):
    """(ids node, weight node, nn.Embedding options) when `node` is a liftable lookup, else None."""
    if node.op != "call_function" or node.target not in _EMBEDDING:
        return None
    values = dict(zip(_EMBEDDING[node.target], node.args))
    values.update(node.kwargs)
    ids, weight_node = values.get("input"), values.get("weight")
    if not isinstance(ids, fx.Node) or not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
        return None
    weight = _attr(gm, weight_node.target)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        return None
    options = {k: values[k] for k in _OPTIONS if values.get(k) is not None}
    if node.target is not F.embedding and options.get("padding_idx", -1) < 0:
        options.pop("padding_idx", None)  # aten / torch.embedding: a negative padding_idx means none
    return ids, weight_node, options


def _place(gm: fx.GraphModule, node: fx.Node, weight: nn.Parameter) -> str:
    """The source module's path when it is a bare holder of just this table, else a new path.

    The table is compared by identity, not name: an exported tied model may read the token
    embedding's table under the head's name (`lm_head.weight`).
    """
    stack = node.meta.get("nn_module_stack") or {}
    candidates = [path for path, _cls in reversed(list(stack.values())) if path]
    owner = next((n.rpartition(".")[0] for n, p in gm.named_parameters(remove_duplicate=False) if p is weight), "")
    for path in candidates[:1] + ([owner] if owner else []):
        if _bare_holder_of(gm, path, weight):
            return path
    base = f"{owner}.weight_embedding" if owner else "weight_embedding"
    path, i = base, 1
    while _exists(gm, path):
        path, i = f"{base}{i}", i + 1
    return path


def _bare_holder_of(gm: fx.GraphModule, path: str, weight: nn.Parameter) -> bool:
    """True when `path` is a plain module holding only `weight` (safe to replace by the Embedding)."""
    try:
        holder = gm.get_submodule(path)
    except AttributeError:
        return False
    if type(holder) is not nn.Module or list(holder.children()) or list(holder.buffers(recurse=False)):
        return False
    own = list(holder.parameters(recurse=False))
    return len(own) == 1 and own[0] is weight


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False


def _make_embedding(weight: nn.Parameter, options: dict) -> nn.Embedding:
    """An nn.Embedding around the existing Parameter (built on the meta device: nothing allocated)."""
    layer = nn.Embedding(weight.shape[0], weight.shape[1], device="meta", **options)
    layer.weight = weight
    return layer
