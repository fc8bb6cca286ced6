"""The torch.fx route of capture: symbolic tracing, checked against the model on the example inputs.

`torch.fx` keeps torch.nn layers as leaves and keeps train/eval behaviour (dropout, batch-norm
updates). Keyword inputs are traced by fixing every other argument of `forward` at its default
(`concrete_args`). When tracing fails inside a submodule, `trace_with_leaves` keeps that
submodule whole and tries again.
"""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn

from ..methods.layer_types import is_layer_subclass
from .capture_failure import TraceFailure
from .select import input_signature, matches, recording_layer_shapes

__all__ = ["trace_with_fx", "trace_with_leaves", "hidden_layers"]

_MAX_LEAVES = 8  # submodules kept whole before a partial capture gives up

# torch.nn modules that torch.fx keeps whole (it never traces into torch.nn) yet hold Linear
# projections: their layers are only reachable through torch.export, which lowers them to aten ops.
_OPAQUE_TO_FX = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                 nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


class _Tracer(fx.Tracer):
    """The default tracer, plus: extra leaf modules, and the module being traced when it fails."""

    def __init__(self, patterns: tuple[str, ...], paths: tuple[str, ...]):
        super().__init__()
        self.patterns, self.paths = patterns, set(paths)
        self.stack: list[tuple[str, str]] = []  # (path, type) of the modules being traced, innermost last

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.paths or any(matches(p, module_qualified_name, m) for p in self.patterns):
            return True
        if is_layer_subclass(m):  # torchvision's Conv3DSimple(nn.Conv3d): a compressible layer, kept whole
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place on an exception: the innermost module is the culprit
        return out


def trace_with_fx(model: nn.Module, args: tuple, kwargs: dict, patterns: tuple[str, ...], leaves) -> fx.GraphModule:
    """Trace `model` with torch.fx and check the graph reproduces it (pure: train/eval restored).

    Args:
        patterns: type names, globs or `re:` regexes of submodules kept whole.
        leaves: module paths kept whole (where an earlier trace failed).

    Raises:
        TraceFailure: the tracer failed (naming the innermost module), or the graph's outputs differ.
    """
    tracer = _Tracer(patterns, tuple(leaves))
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, args, kwargs))
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # any tracer failure means: try the other path
        path, kind = tracer.stack[-1] if tracer.stack else (None, None)
        raise TraceFailure("torch.fx", exc, path, kind) from exc
    # A trace can succeed yet bake in one branch of Python control flow: check it reproduces
    # the model on the example inputs before trusting it.
    was_training = model.training
    model.eval()
    gm.eval()
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with torch.no_grad():
            ref = model(*args, **kwargs)
            with recording_layer_shapes(gm, shapes):
                got = gm(*args, **kwargs)
    except Exception as exc:
        raise TraceFailure("torch.fx", exc) from exc
    finally:
        model.train(was_training)
        gm.train(was_training)
    if not _same_outputs(ref, got):
        raise TraceFailure("torch.fx", RuntimeError(
            "the traced graph does not reproduce the model's outputs on the example inputs "
            "(Python control flow was fixed at trace time)"))
    # The check run already saw every layer's output shape: find_sites reuses them instead of
    # running the model a third time (a third of `inspect`'s time on a CNN).
    gm.meta["vcon_shapes"] = {"inputs": input_signature(args, kwargs), "layers": shapes}
    return gm


def trace_with_leaves(model, args, kwargs, patterns, failure: TraceFailure) -> tuple[fx.GraphModule, list[str]]:
    """Trace again, keeping each submodule torch.fx fails in whole, until it succeeds (pure).

    Returns:
        (the graph, the module paths kept whole).

    Raises:
        TraceFailure: the last failure, when it names no new module or too many were kept whole.
    """
    leaves: list[str] = []
    while failure.module and failure.module not in leaves and len(leaves) < _MAX_LEAVES:
        leaves.append(failure.module)
        try:
            return trace_with_fx(model, args, kwargs, patterns, leaves), leaves
        except TraceFailure as again:
            failure = again
    raise failure


def hidden_layers(gm: fx.GraphModule, leaf_modules: tuple[str, ...]) -> dict[str, int]:
    """Modules the fx graph calls whole that hide weight matrices from compression: path → parameters (pure)."""
    hidden = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in hidden:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, _OPAQUE_TO_FX) and not any(matches(p, node.target, module) for p in leaf_modules):
            hidden[node.target] = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    return hidden


def _concrete_args(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Every `forward` argument the example inputs leave out, fixed at its default.

    Keyword inputs (`input_ids=...`) then trace as placeholders, and optional arguments
    (`mask=None`) do not reach `if mask is not None` as proxies.
    """
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    concrete = {}
    for name, p in sig.parameters.items():
        if name in bound.arguments or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None  # a required input is missing: let the tracer say so
        concrete[name] = p.default
    return concrete or None


def _same_outputs(ref, got) -> bool:
    """True when both outputs hold the same tensors (shape, and values within float tolerance)."""
    ref_leaves = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    got_leaves = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(ref_leaves) != len(got_leaves):
        return False
    return all(r.shape == g.shape and torch.allclose(r, g, rtol=1e-5, atol=1e-6, equal_nan=True)
               for r, g in zip(ref_leaves, got_leaves))
