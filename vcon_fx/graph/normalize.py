"""Normalize: every compressible op becomes a `call_module` of a real Linear / Conv{1,2,3}d / ConvTranspose{1,2,3}d / Embedding.

An exported graph calls `aten.linear` / `aten.conv2d` on `get_attr` weights, and a traced
graph may call `F.linear` on a parameter. Both are lifted into modules that hold the very same
Parameter objects, so nothing is copied and later passes see one dialect.

    addmm(b, x, W)  =  x·W + b  =  Linear(weight=Wᵀ, bias=b)(x)

is lifted too (Hugging Face `Conv1D`, as in GPT-2): its weight is stored transposed, so the
Linear gets a transposed copy, and only when nothing else reads W (a copy would untie it).
A lifted weight that is no longer read under its old name is unregistered there, so it has
one name, and one owner, afterwards. Embedding lookups are lifted first (normalize_embedding.py),
so a Linear head reading the token embedding's table shares it with a real nn.Embedding: a tie
that selection compresses as one table, not a foreign reader that forbids compressing the head.
"""

from __future__ import annotations

from operator import attrgetter

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import contracts
from .normalize_embedding import embedding_calls, lift_embeddings

__all__ = ["normalize", "unlifted_layers"]

_aten = torch.ops.aten
_LINEAR = {_aten.linear.default, F.linear, torch._C._nn.linear}
_ADDMM = {_aten.addmm.default, torch.addmm}
_CONV = {
    _aten.conv1d.default: nn.Conv1d, _aten.conv2d.default: nn.Conv2d, _aten.conv3d.default: nn.Conv3d,
    _aten.conv1d.padding: nn.Conv1d, _aten.conv2d.padding: nn.Conv2d, _aten.conv3d.padding: nn.Conv3d,
    torch.conv1d: nn.Conv1d, torch.conv2d: nn.Conv2d, torch.conv3d: nn.Conv3d,
    F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d,
}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = {
    _aten.conv_transpose1d.default: nn.ConvTranspose1d, _aten.conv_transpose2d.input: nn.ConvTranspose2d,
    _aten.conv_transpose3d.input: nn.ConvTranspose3d, F.conv_transpose1d: nn.ConvTranspose1d,
    F.conv_transpose2d: nn.ConvTranspose2d, F.conv_transpose3d: nn.ConvTranspose3d,
}
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_WEIGHT_DIMS = {nn.Linear: 2, nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5,
                nn.ConvTranspose1d: 3, nn.ConvTranspose2d: 4, nn.ConvTranspose3d: 5}
_LAYERS = tuple(_WEIGHT_DIMS)


def normalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Lift functional embedding/linear/conv/addmm calls on parameters into call_module nodes (in place).

    Weights used by anything else as well (a matmul on the table) are lifted too but recorded in
    `gm.meta["vcon_tied"]` (layer path → reason), so selection can refuse them with the reason.

    Returns:
        gm, linted and recompiled.
    """
    # (weight, bias, type, options) -> module path: the same call twice is one layer called twice;
    # the same weight with another bias or stride is a second layer sharing that weight (tied).
    lifted: dict[tuple, str] = {}
    first_path: dict[int, str] = {}  # id(weight) -> the first layer lifted around it
    moved: set[int] = set()  # ids of every Parameter a lifted layer took over (or copied, transposed)
    tied: dict[str, str] = dict(gm.meta.get("vcon_tied", {}))
    embeddings = lift_embeddings(gm, tied, lambda n: _layer_spec(gm, n) is not None)
    moved.update(id(p) for p in embeddings.values())
    names = _param_names(gm)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        spec = _layer_spec(gm, node)
        if spec is None:
            continue
        layer_type, x, weight_node, bias_node, options, transposed = spec
        weight = attrgetter(weight_node.target)(gm)
        if transposed and (len(names.get(id(weight), ())) > 1 or id(weight) in first_path
                           or any(u is not node for u in weight_node.users)):
            continue  # a transposed copy would untie the weight from its other use: leave it functional
        bias_param = attrgetter(bias_node.target)(gm) if bias_node is not None else None
        key = (id(weight), id(bias_param), layer_type, tuple(sorted((k, repr(v)) for k, v in options.items())))
        if key not in lifted:
            path = _place(gm, node, weight_node, bias_node, layer_type)
            bias = attrgetter(bias_node.target)(gm) if bias_node is not None else None
            moved.update(id(p) for p in (weight, bias) if p is not None)
            if transposed:
                weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=weight.requires_grad)
            gm.set_submodule(path, _make_layer(layer_type, weight, bias, options), strict=False)
            lifted[key] = path
            others = _other_users(gm, weight_node, node)
            if others:
                tied[path] = f"its weight {weight_node.target} is also used by {_describe(others[0])} (tied weights)"
            sibling = first_path.setdefault(id(weight), path)
            if sibling != path:
                why = "with another bias or stride/padding (shared weight)"
                tied[path] = f"its weight {weight_node.target} is also used by {sibling} {why}"
                tied.setdefault(sibling, f"its weight {weight_node.target} is also used by {path} {why}")
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(lifted[key], (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for attr_node in (weight_node, bias_node):
            if attr_node is not None and not attr_node.users:
                gm.graph.erase_node(attr_node)
    _drop_stale_names(gm, set(lifted.values()) | set(embeddings), moved)
    gm.meta["vcon_tied"] = tied
    gm.graph.lint()
    gm.recompile()
    if contracts.active():
        contracts.ensure_normalized(gm)
    return gm


def unlifted_layers(gm: fx.GraphModule) -> list[fx.Node]:
    """Functional linear/conv calls and embedding lookups on parameters that `normalize` always lifts (pure).

    An addmm is left out: normalize keeps it functional when its weight is read elsewhere.
    """
    return [n for n in gm.graph.nodes
            if n.op == "call_function" and (spec := _layer_spec(gm, n)) is not None and not spec[-1]] + embedding_calls(gm)


def _layer_spec(gm: fx.GraphModule, node: fx.Node):
    """(layer type, input, weight node, bias node, conv options, transposed) when liftable."""
    target = node.target
    transposed = False
    if target in _LINEAR:
        args = list(node.args) + [None] * 3
        x = args[0] if args[0] is not None else node.kwargs.get("input")
        weight = args[1] if args[1] is not None else node.kwargs.get("weight")
        bias = args[2] if args[2] is not None else node.kwargs.get("bias")
        layer_type, options = nn.Linear, {}
    elif target in _ADDMM:
        # addmm(bias, x, W): only the plain form, β = α = 1, x 2-D (Conv1D flattens it first)
        if len(node.args) != 3 or any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
            return None
        bias, x, weight = node.args
        if bias is None or not isinstance(x, fx.Node):
            return None
        layer_type, options, transposed = nn.Linear, {}, True
    elif target in _CONV or target in _CONV_T:
        names = _CONV_ARGS if target in _CONV else _CONV_T_ARGS
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        x, weight, bias = values.get("input"), values.get("weight"), values.get("bias")
        layer_type = _CONV.get(target) or _CONV_T[target]
        options = {k: values[k] for k in names[3:] if k in values}
    else:
        return None
    if not _is_param_attr(gm, weight) or (bias is not None and not _is_param_attr(gm, bias)):
        return None
    w = attrgetter(weight.target)(gm)
    expected_dim = _WEIGHT_DIMS[layer_type]
    if w.dim() != expected_dim:
        return None
    if transposed and attrgetter(bias.target)(gm).shape != (w.shape[1],):
        return None
    return layer_type, x, weight, bias, options, transposed


def _other_users(gm: fx.GraphModule, weight_node: fx.Node, node: fx.Node) -> list[fx.Node]:
    """Nodes other than liftable layer calls that read this weight (an embedding, a matmul)."""
    return [u for u in weight_node.users if u is not node and _layer_spec(gm, u) is None]


def _describe(node: fx.Node) -> str:
    """`transformer.wte (Embedding)` when the graph knows the module, else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else cls.__qualname__
        return f"{path or '<root>'} ({cls_name.rsplit('.', 1)[-1]})"
    return f"node {node.name} ({node.target})" if node.op != "call_module" else str(node.target)


def _param_names(gm: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, param in gm.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def _drop_stale_names(gm: fx.GraphModule, layers: set[str], moved: set[int]) -> None:
    """Unregister a lifted weight (and bias) under names the graph no longer reads.

    `F.linear(x, self.weight)` traced on the root leaves `weight` registered on the GraphModule
    beside the new `weight_linear.weight`: one tensor, two names, which select would read as
    tied weights. Names still read by a get_attr node, or held by a real layer, stay. An exported
    graph reads every alias of a tied Parameter with a `get_attr` that nothing uses
    (`cls.predictions.bias` beside `decoder.bias`): such reads of a moved Parameter are erased
    first, so the alias goes too, and no read dangles once a Blend takes the layer's place.
    """
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users and id(_attr(gm, node.target)) in moved:
            gm.graph.erase_node(node)
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        if id(param) not in moved or name in read or owner in layers:
            continue
        holder = gm.get_submodule(owner) if owner else gm
        if isinstance(holder, _LAYERS) or type(holder) is not nn.Module and holder is not gm:
            continue  # a real module still owns it: a genuine second name (tied), not a leftover
        delattr(holder, attr)


def _attr(gm: fx.GraphModule, target: str):
    try:
        return attrgetter(target)(gm)
    except AttributeError:
        return None


def _is_param_attr(gm: fx.GraphModule, node) -> bool:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    try:
        return isinstance(attrgetter(node.target)(gm), nn.Parameter)
    except AttributeError:
        return False



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
    if isinstance(holder, _LAYERS):
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
        transposed = layer_type in _CONV_T.values()  # weight (in, out / groups, k…)
        channels = (weight.shape[0], weight.shape[1] * groups) if transposed else (weight.shape[1] * groups,
                                                                                   weight.shape[0])
        extra = {"output_padding": _tuple(options.get("output_padding", 0))} if transposed else {}
        layer = layer_type(
            *channels, tuple(weight.shape[2:]),
            stride=_tuple(options.get("stride", 1)), padding=_padding(options.get("padding", 0)),
            dilation=_tuple(options.get("dilation", 1)), groups=groups,
            bias=bias is not None, device="meta", **extra,
        )
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def _tuple(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def _padding(value):
    return value if isinstance(value, str) else _tuple(value)
