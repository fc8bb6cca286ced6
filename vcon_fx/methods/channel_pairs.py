"""Which layers of a block can lose output channels together with the next layer's inputs (the graph walk).

L pairs with M when L's output reaches M alone, through single-user ops that keep a zero
channel at zero (ReLU, GELU, SiLU, Tanh, Dropout; an affine BatchNorm, masked too). Channels
that reach a residual sum, a LayerNorm, a reshape or the block's output stay, and the walk says
why, so the plan can show it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .base import COMPRESSIBLE, LayerSite

__all__ = ["find_channel_pairs", "CHANNEL_NORMS"]

# Norms between L and M whose γ and β are masked with L's channels (BN(0) ≠ 0 otherwise).
CHANNEL_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)

# Ops that map a zero channel to a zero channel, elementwise: f(0) = 0.
_ZERO_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh, nn.Hardtanh, nn.Hardswish,
                 nn.ELU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity)
_ZERO_FUNCTIONS = {
    torch.relu, torch.relu_, torch.tanh, F.relu, F.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.mish, F.tanh,
    F.hardtanh, F.hardswish, F.elu, F.dropout, F.dropout1d, F.dropout2d,
    *(getattr(torch.ops.aten, name).default for name in (
        "relu", "relu_", "gelu", "silu", "silu_", "mish", "tanh", "hardtanh", "hardtanh_", "hardswish",
        "leaky_relu", "elu", "dropout", "clone", "alias")),
}
_ZERO_METHODS = {"relu", "relu_", "tanh", "clone", "contiguous"}


def _op_name(node: fx.Node, block: nn.Module) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(block.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target)) if not isinstance(node.target, torch._ops.OpOverload) \
            else str(node.target)
    return str(node.target) if node.op == "call_method" else node.op


def _why(name: str) -> str:
    low = name.lower()
    for keys, what in ((("add", "sum", "cat", "sub"), "a residual sum or concatenation"),
                       (("layer_norm", "layernorm", "group_norm", "groupnorm", "rms"), "a normalization across channels"),
                       (("view", "reshape", "permute", "transpose", "flatten", "split", "chunk", "unflatten"),
                        "a reshape"),
                       (("softmax", "matmul", "bmm", "attention", "mul"), "attention or a product with another tensor")):
        if any(k in low for k in keys):
            return what
    return "an op that does not keep a zero channel at zero"


def find_channel_pairs(block: fx.GraphModule, layers, sites: dict[str, LayerSite] | None = None
                       ) -> tuple[dict[str, tuple[str, tuple[str, ...]]], dict[str, str]]:
    """Which layers can lose output channels together with the next layer's inputs (pure).

    L pairs with M when L's output reaches M alone, through single-user ops that keep a zero
    channel at zero (and affine batch norms, masked too); both in `layers`, called once, groups = 1.

    Returns:
        ({L: (M, norms between them)}, {L: why its outputs must stay}) for every L in `layers`.
    """
    layers = set(layers)
    sites = sites or {}
    calls: dict[str, list[fx.Node]] = {}
    for node in block.graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    pairs, reasons = {}, {}
    for rel in layers:
        nodes = calls.get(rel, [])
        if len(nodes) != 1:
            reasons[rel] = f"it is called {len(nodes)} times in the block"
            continue
        found = _follow(block, nodes[0], layers, calls, sites)
        if isinstance(found, str):
            reasons[rel] = found
        else:
            pairs[rel] = found
    return pairs, reasons


def _follow(block, node, layers, calls, sites):
    """(M, norms) reached from L's node, or the reason there is none."""
    producer = block.get_submodule(node.target)
    channels = producer.weight.shape[0]
    if getattr(producer, "groups", 1) != 1:
        return f"it is a grouped convolution (groups={producer.groups})"
    norms: list[str] = []
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            names = ", ".join(_op_name(u, block) for u in users[:3])
            return f"its channels are read by {len(users)} ops ({names})"
        user = users[0]
        if user.op == "output":
            return "its channels are the block's output"
        name = _op_name(user, block)
        module = block.get_submodule(user.target) if user.op == "call_module" else None
        if isinstance(module, COMPRESSIBLE):
            return _consumer(block, user, module, producer, layers, calls, norms)
        zero_kept = (isinstance(module, _ZERO_MODULES) or isinstance(module, CHANNEL_NORMS)
                     or (user.op == "call_function" and user.target in _ZERO_FUNCTIONS)
                     or (user.op == "call_method" and user.target in _ZERO_METHODS))
        if not zero_kept:
            return f"its channels reach {name} ({_why(name)})"
        if user.all_input_nodes != [cur] or (user.args and user.args[0] is not cur):
            return f"its channels meet another tensor in {name}"
        if isinstance(module, CHANNEL_NORMS):
            shape = sites.get(node.target).out_shape if node.target in sites else None
            if not module.affine or module.num_features != channels:
                return f"its channels reach {name}, which is not an affine norm over its {channels} channels"
            if isinstance(producer, nn.Linear) and (shape is None or len(shape) != 2):
                return f"its channels reach {name} with a shape other than (batch, channels)"
            norms.append(user.target)
        cur = user


def _consumer(block, user, module, producer, layers, calls, norms):
    name = _op_name(user, block)
    if user.target not in layers:
        return f"its channels feed {name}, which is not compressed in this block"
    if type(module) is not type(producer) and not (isinstance(module, nn.Linear) and isinstance(producer, nn.Linear)):
        return f"its channels feed {name}, a different kind of layer"
    if getattr(module, "groups", 1) != 1:
        return f"its channels feed {name}, a grouped convolution"
    if module.weight.shape[1] != producer.weight.shape[0]:
        return f"its {producer.weight.shape[0]} channels do not match {name}'s {module.weight.shape[1]} inputs"
    if len(calls.get(user.target, [])) != 1:
        return f"its channels feed {name}, which is called more than once"
    return user.target, tuple(norms)


