"""Normalize: every compressible op becomes a `call_module` of a real Linear / Conv1d / Conv2d.

An exported graph calls `aten.linear` / `aten.conv2d` on `get_attr` weights, and a traced
graph may call `F.linear` on a parameter. Both are lifted into modules that hold the very same
Parameter objects, so nothing is copied and later passes see one dialect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["normalize"]

_aten = torch.ops.aten
_LINEAR = {_aten.linear.default, F.linear, torch._C._nn.linear}
_CONV = {
    _aten.conv1d.default: nn.Conv1d, _aten.conv2d.default: nn.Conv2d,
    _aten.conv1d.padding: nn.Conv1d, _aten.conv2d.padding: nn.Conv2d,
    torch.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d, F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lift functional linear/conv calls on parameters into call_module nodes (in place).

    Weights used by anything else as well (a tied embedding) are lifted too but recorded in
    `gm.meta["vcon_tied"]`, so selection can refuse them with the reason.

    Returns:
        gm, linted and recompiled.
    """
    lifted: dict[int, str] = {}  # id(weight) -> module path, so a weight used twice is one layer
    tied: dict[str, str] = dict(gm.meta.get("vcon_tied", {}))
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        spec = _layer_spec(gm, node)
        if spec is None:
            continue
        layer_type, x, weight_node, bias_node, options = spec
        weight = _fetch(gm, weight_node.target)
        key = id(weight)
        if key not in lifted:
            path = _place(gm, node, weight_node, bias_node, layer_type)
            bias = _fetch(gm, bias_node.target) if bias_node is not None else None
            gm.set_submodule(path, _make_layer(layer_type, weight, bias, options), strict=False)
            lifted[key] = path
            others = [u for u in weight_node.users if u is not node and _layer_spec(gm, u) is None]
            if others:
                tied[path] = f"its weight {weight_node.target} is also used by {others[0].name} (tied weights)"
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(lifted[key], (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr_node in (weight_node, bias_node):
            if attr_node is not None and not attr_node.users:
                gm.graph.erase_node(attr_node)
    gm.meta["vcon_tied"] = tied
    gm.graph.lint()
    gm.recompile()
    return gm


def _layer_spec(gm: fx.GraphModule, node: fx.Node):
    """(layer type, input, weight node, bias node, conv options) when `node` is liftable."""
    target = node.target
    if target in _LINEAR:
        args = list(node.args) + [None] * 3
        x = args[0] if args[0] is not None else node.kwargs.get("input")
        weight = args[1] if args[1] is not None else node.kwargs.get("weight")
        bias = args[2] if args[2] is not None else node.kwargs.get("bias")
        layer_type, options = nn.Linear, {}
    elif target in _CONV:
        values = dict(zip(_CONV_ARGS, node.args))
        values.update(node.kwargs)
        x, weight, bias = values.get("input"), values.get("weight"), values.get("bias")
        layer_type = _CONV[target]
        options = {k: values[k] for k in ("stride", "padding", "dilation", "groups") if k in values}
    else:
        return None
    if not _is_param_attr(gm, weight) or (bias is not None and not _is_param_attr(gm, bias)):
        return None
    w = _fetch(gm, weight.target)
    expected_dim = {nn.Linear: 2, nn.Conv1d: 3, nn.Conv2d: 4}[layer_type]
    if w.dim() != expected_dim:
        return None
    return layer_type, x, weight, bias, options


def _is_param_attr(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        return isinstance(_fetch(gm, node.target), nn.Parameter)
    except AttributeError:
        return False


def _fetch(gm: fx.GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _place(gm: fx.GraphModule, node: fx.Node, weight_node: fx.Node, bias_node, layer_type) -> str:
    """Where the lifted layer lives: the source layer's own path when the graph knows it."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, cls in reversed(list(stack.values())):
        cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        if path and cls_name.rsplit(".", 1)[-1] == layer_type.__name__ and _fits(gm, path, weight_node, bias_node):
            return path
    owner, _, attr = weight_node.target.rpartition(".")
    if owner and _fits(gm, owner, weight_node, bias_node):
        return owner
    base = f"{owner}.{attr}_{layer_type.__name__.lower()}" if owner else f"{attr}_{layer_type.__name__.lower()}"
    path, i = base, 1
    while not _is_new(gm, path):
        path, i = f"{base}{i}", i + 1
    return path


def _fits(gm: fx.GraphModule, path: str, weight_node, bias_node) -> bool:
    """True when `path` is a bare holder of exactly this weight (and bias): safe to replace."""
    try:
        holder = gm.get_submodule(path)
    except AttributeError:
        return False
    if isinstance(holder, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        return False  # already a real layer: the functional call is a second use, not this layer
    if type(holder) is not nn.Module or list(holder.children()) or list(holder.buffers(recurse=False)):
        return False
    names = {f"{path}.{n}" for n, _ in holder.named_parameters(recurse=False)}
    wanted = {weight_node.target} | ({bias_node.target} if bias_node is not None else set())
    return names == wanted


def _is_new(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return False
    except AttributeError:
        return True


def _make_layer(layer_type, weight: nn.Parameter, bias, options) -> nn.Module:
    """A real layer around existing Parameters (built on the meta device: nothing allocated)."""
    if layer_type is nn.Linear:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        groups = int(options.get("groups", 1))
        layer = layer_type(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
            stride=_tuple(options.get("stride", 1)), padding=_padding(options.get("padding", 0)),
            dilation=_tuple(options.get("dilation", 1)), groups=groups,
            bias=bias is not None, device="meta",
        )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _padding(value):
    return value if isinstance(value, str) else _tuple(value)
