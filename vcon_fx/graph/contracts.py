"""Pass contracts: what each graph pass requires of its input and ensures of its output.

Each contract is a small pure function that raises `ContractError` naming the node, module or
group that breaks it. The passes check their own contracts when contracts are on:

    VCON_DEBUG_CONTRACTS=1 vcon-fx transform …        # or, in Python:
    with vcon_fx.graph.contracts.enabled(True): vcon_fx.transform(…)

and the tests check them always (tests/helpers.py, tests/graph/). A broken contract is a bug in
vcon-fx, never a user error: user input is refused earlier with its own typed error.

    pass        requires                         ensures
    capture     –                                ensure_lint
    normalize   –                                ensure_lint, ensure_normalized
    select      –                                require_group_layers
    calibrate   –                                ensure_input_rms
    duplicate   require_group_layers             ensure_lint, require_blend_groups, ensure_betas_at(1),
                                                 ensure_blend_branches_agree (transform, with inputs)
    set_beta    –                                ensure_betas_in_unit_interval
    vanish      require_blend_groups             ensure_lint, ensure_no_dense_branch
"""

from __future__ import annotations

import contextlib
import os
from contextvars import ContextVar

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import ContractError
from ..methods.base import COMPRESSIBLE

__all__ = [
    "ENV_VAR", "active", "enabled", "ensure_lint", "ensure_normalized", "require_group_layers",
    "ensure_input_rms", "require_blend_groups", "ensure_betas_in_unit_interval", "ensure_betas_at",
    "ensure_blend_branches_agree", "ensure_no_dense_branch", "after_duplicate", "after_vanish",
]

ENV_VAR = "VCON_DEBUG_CONTRACTS"
_override: ContextVar[bool | None] = ContextVar("vcon_contracts", default=None)


def active() -> bool:
    """True when the passes check their contracts: inside `enabled(True)`, or with VCON_DEBUG_CONTRACTS=1."""
    forced = _override.get()
    return forced if forced is not None else os.environ.get(ENV_VAR, "") not in ("", "0")


@contextlib.contextmanager
def enabled(on: bool = True):
    """While active, the passes check (or, with False, skip) their contracts whatever the environment says."""
    token = _override.set(bool(on))
    try:
        yield
    finally:
        _override.reset(token)


# Blend lives in blend.py, which checks β through this module: imported when first needed.
def _blends(model: nn.Module) -> dict[str, nn.Module]:
    from .blend import Blend

    return {path: m for path, m in model.named_modules() if isinstance(m, Blend)}


def _graph_modules(model: nn.Module):
    return [(path, m) for path, m in model.named_modules() if isinstance(m, fx.GraphModule)]


def ensure_lint(gm: nn.Module) -> None:
    """Every graph in `gm` (the root and each block branch) passes `Graph.lint()`."""
    for path, module in _graph_modules(gm):
        try:
            module.graph.lint()
        except Exception as exc:  # lint raises RuntimeError or AssertionError, naming the node
            raise ContractError(f"the graph of {path or '<root>'} fails lint: {exc}") from exc


def ensure_normalized(gm: fx.GraphModule) -> None:
    """No functional linear/conv call on a parameter is left that normalize lifts into a layer."""
    from .normalize import unlifted_layers

    left = unlifted_layers(gm)
    if left:
        raise ContractError(f"node {left[0].name} ({left[0].target}) is still a functional layer call after normalize")


def require_group_layers(gm: fx.GraphModule, groups) -> None:
    """Every group's layers are called as compressible modules, and no layer is in two groups."""
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    owner: dict[str, str] = {}
    for group in groups:
        for path in group.layers:
            if path in owner:
                raise ContractError(f"layer {path} is in two groups ({owner[path]} and {group.name})")
            owner[path] = group.name
            module = gm.get_submodule(path) if path in called else None
            if not isinstance(module, COMPRESSIBLE):
                raise ContractError(f"group {group.name}: layer {path} is not a call_module node of a "
                                    f"Linear/Conv1d/Conv2d (found {type(module).__name__})")


def ensure_input_rms(gm: fx.GraphModule, rms: dict[str, torch.Tensor]) -> None:
    """Each input RMS is finite, ≥ 0, and has one value per input feature (Linear) or channel (Conv)."""
    for path, values in rms.items():
        layer = gm.get_submodule(path)
        width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
        if values.shape != (width,):
            raise ContractError(f"layer {path}: input RMS of shape {tuple(values.shape)}, expected ({width},)")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ContractError(f"layer {path}: input RMS holds negative or non-finite values")


def require_blend_groups(gm: fx.GraphModule) -> None:
    """At least one Blend, each called by a call_module node tagged role "blend"."""
    blends = _blends(gm)
    if not blends:
        raise ContractError(f"{type(gm).__name__} has no Blend module")
    called = {n.target: n for n in gm.graph.nodes if n.op == "call_module" and n.target in blends}
    for path in blends:
        node = called.get(path)
        if node is None:
            raise ContractError(f"Blend {path} is not called by the graph")
        role = node.meta.get("vcon", {}).get("role")
        if role != "blend":
            raise ContractError(f"node {node.name} calls Blend {path} but is tagged role {role!r}, not 'blend'")


def ensure_betas_in_unit_interval(model: nn.Module) -> None:
    """Every β lies in [0, 1], and each Blend's Python mirror of β equals its buffer."""
    for path, blend in _blends(model).items():
        beta = float(blend.beta)
        if not 0.0 <= beta <= 1.0:  # NaN fails this too
            raise ContractError(f"Blend {path} (group {blend.group}): β = {beta} is outside [0, 1]")
        if blend.beta_value != beta:
            raise ContractError(f"Blend {path} (group {blend.group}): β mirror {blend.beta_value} != buffer {beta}")


def ensure_betas_at(model: nn.Module, value: float) -> None:
    """Every β equals `value` (a fresh blend starts at 1: the original model's outputs)."""
    ensure_betas_in_unit_interval(model)
    for path, blend in _blends(model).items():
        if blend.beta_value != value:
            raise ContractError(f"Blend {path} (group {blend.group}): β = {blend.beta_value}, expected {value}")


@torch.no_grad()
def ensure_blend_branches_agree(gm: nn.Module, example_args: tuple = (), example_kwargs: dict | None = None) -> None:
    """Both branches of every Blend give outputs of the same structure and shapes on the Blend's inputs.

    Runs `gm` once in eval mode to record each Blend's inputs (train/eval mode is restored).
    """
    seen: dict[str, tuple] = {}
    blends = _blends(gm)
    handles = [blend.register_forward_pre_hook(
        lambda _m, args, kwargs, path=path: seen.setdefault(path, (args, kwargs)) and None, with_kwargs=True)
        for path, blend in blends.items()]
    was_training = gm.training
    gm.eval()
    try:
        gm(*example_args, **(example_kwargs or {}))
        for path, (args, kwargs) in seen.items():
            dense, compressed = blends[path].dense(*args, **kwargs), blends[path].compressed(*args, **kwargs)
            if _shapes(dense) != _shapes(compressed):
                raise ContractError(f"Blend {path}: dense branch gives {_shapes(dense)}, compressed branch "
                                    f"{_shapes(compressed)}")
    finally:
        gm.train(was_training)
        for handle in handles:
            handle.remove()
    missing = sorted(set(blends) - set(seen))
    if missing:
        raise ContractError(f"Blend {missing[0]} never ran on the example inputs")


def _shapes(out):
    values, spec = pytree.tree_flatten(out)
    return str(spec), [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values]


def ensure_no_dense_branch(model: nn.Module) -> None:
    """No Blend remains and no node anywhere is tagged role "dense"."""
    blends = _blends(model)
    if blends:
        raise ContractError(f"Blend {next(iter(blends))} remains: its dense branch was not removed")
    for path, module in _graph_modules(model):
        for node in module.graph.nodes:
            if node.meta.get("vcon", {}).get("role") == "dense":
                raise ContractError(f"node {node.name} in {path or '<root>'} is tagged role 'dense'")


def after_duplicate(gm: fx.GraphModule) -> None:
    """duplicate's ensures that need no inputs."""
    ensure_lint(gm)
    require_blend_groups(gm)
    ensure_betas_at(gm, 1.0)


def after_vanish(gm: fx.GraphModule) -> None:
    """vanish's ensures."""
    ensure_lint(gm)
    ensure_no_dense_branch(gm)
