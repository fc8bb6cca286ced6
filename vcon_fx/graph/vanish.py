"""Vanish: once β = 0 everywhere, delete the dense branches and keep the compressed graph.

Requires blend groups, all at β = 0 (or `force`, which changes the outputs: the caller warns).
Ensures no node has role "dense", no Blend remains, no dense parameter is reachable, and the
outputs equal the blended model at β = 0.
"""

from __future__ import annotations

import logging

from torch import fx, nn

from ..errors import StageError
from ..methods.base import Method
from . import contracts
from .blend import Blend, get_betas

__all__ = ["vanish_graph", "dense_nodes"]

log = logging.getLogger(__name__)


def vanish_graph(gm: fx.GraphModule, method: Method, *, force: bool = False) -> fx.GraphModule:
    """Replace every Blend by its materialized compressed branch (in place).

    Raises:
        StageError: no blend groups, or some β > 0 without `force`.
    """
    betas = get_betas(gm)
    if not betas:
        raise StageError("the model has no blend groups: nothing to vanish (was it transformed, or vanished already?)")
    open_groups = {g: b for g, b in betas.items() if b > 0.0}
    if open_groups and not force:
        name, beta = next(iter(open_groups.items()))
        raise StageError(
            f"{len(open_groups)} group(s) still have β > 0 (e.g. {name}: β={beta:.4g}); fine-tune until β reaches 0, "
            "or pass --force to drop the dense branch anyway (the outputs will change)"
        )
    if open_groups:
        log.warning("vanishing %d group(s) with β > 0: outputs change", len(open_groups))
    if contracts.active():
        contracts.require_blend_groups(gm)
    once = _MaterializeOnce(method)  # a twin in two places (a tied embedding's table) is materialized once
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        blend = gm.get_submodule(node.target)
        if not isinstance(blend, Blend):
            continue
        gm.set_submodule(node.target, _materialize(blend.compressed, once))
        node.meta["vcon"] = {**node.meta.get("vcon", {}), "role": "compressed"}
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    if dense_nodes(gm):
        raise StageError(f"vanish left dense nodes behind: {dense_nodes(gm)[:3]} (a bug: please report it)")
    if contracts.active():
        contracts.after_vanish(gm)
    return gm


class _MaterializeOnce:
    """`method`, whose `materialize` gives the same module again for a module it has seen (by
    identity): a twin registered in two places stays one module."""

    def __init__(self, method: Method):
        self._method = method
        self._done: dict[int, tuple[nn.Module, nn.Module]] = {}  # originals kept alive: ids are not reused

    def materialize(self, module: nn.Module) -> nn.Module:
        if id(module) not in self._done:
            self._done[id(module)] = (module, self._method.materialize(module))
        return self._done[id(module)][1]

    def __getattr__(self, name):
        return getattr(self._method, name)


def _materialize(branch: nn.Module, method: Method) -> nn.Module:
    """The branch with every twin inside it in deployable form (masks applied, integers stored).

    `method.materialize` returns a module unchanged when it is not one of its twins; nothing inside
    a module it replaced is visited again.
    """
    top = method.materialize(branch)
    if top is not branch:
        return top
    if isinstance(branch, fx.GraphModule):
        method.materialize_block(branch)  # couplings across layers (structured pruning slices pairs)
    replaced: list[str] = []
    for path, module in list(branch.named_modules(remove_duplicate=False)):
        if not path or any(path.startswith(r + ".") for r in replaced):
            continue
        if (done := method.materialize(module)) is not module:
            branch.set_submodule(path, done)
            replaced.append(path)
    if isinstance(branch, fx.GraphModule):
        branch.recompile()
    return branch


def dense_nodes(model: nn.Module) -> list[str]:
    """Names of nodes tagged role "dense" anywhere in `model` (pure)."""
    found = []
    for module in model.modules():
        if isinstance(module, fx.GraphModule):
            found += [n.name for n in module.graph.nodes if n.meta.get("vcon", {}).get("role") == "dense"]
    return found
