"""One check helper per graph pass, reused by every case: run the pass, lint, compare to a hand-written graph.

In the style of torch.fx's own tests: the expected graph is written as a small module and traced
(`expected_graph`), and the two graphs are compared node by node with `described`: each node's
op, its target (a called module by its path and its own description) and which earlier node
each argument is. Every helper also checks the pass's contracts (vcon_fx/graph/contracts.py),
and that the outputs are what the pass promises.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from vcon_fx.graph import contracts
from vcon_fx.graph.blend import Blend, set_beta
from vcon_fx.graph.calibrate import input_rms
from vcon_fx.graph.capture import capture
from vcon_fx.graph.duplicate import duplicate
from vcon_fx.graph.normalize import normalize
from vcon_fx.graph.select import SelectionConfig, find_sites, select
from vcon_fx.graph.vanish import vanish_graph
from vcon_fx.methods import LowRankConfig
from vcon_fx.methods.base import method_for
from vcon_fx.methods.lowrank import LowRank

from helpers import assert_close_outputs, run

__all__ = ["lowrank", "expected_graph", "described", "check_capture", "check_normalize", "check_select",
           "check_calibrate", "check_duplicate", "check_vanish", "RANK"]

RANK = 2
CONFIG = LowRankConfig(rank=RANK)
EXACT = 1e-6


def lowrank(d_in: int, d_out: int, rank: int = RANK) -> LowRank:
    """The low-rank twin of a Linear(d_in, d_out), as the method builds it (written out by hand)."""
    return LowRank(nn.Linear(d_in, rank, bias=False), nn.Linear(rank, d_out))


class _LeafTracer(fx.Tracer):
    """The default tracer, keeping Blend, LowRank, block graphs and `leaves` whole, as the passes' graphs do."""

    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = (Blend, LowRank, fx.GraphModule, *leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def expected_graph(module: nn.Module, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    """The hand-written expected module as a graph."""
    return fx.GraphModule(module, _LeafTracer(leaves).trace(module))


def described(gm: fx.GraphModule) -> list[tuple]:
    """Each node as (op, target, arguments with earlier nodes as %index): equal lists, equal graphs.

    Node names and placeholder names are left out (a pass may rename them); a called module is
    described by its path and `repr`, a Blend by its group, β and both branches, a GraphModule
    by its own graph.
    """
    index: dict[fx.Node, int] = {}
    rows = []
    for node in gm.graph.nodes:
        index[node] = len(index)
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        rows.append((node.op, _target(gm, node), repr(args)))
    return rows


def _target(gm: fx.GraphModule, node: fx.Node):
    if node.op == "call_module":
        return node.target, _module(gm.get_submodule(node.target))
    return None if node.op == "placeholder" else node.target


def _module(module: nn.Module):
    if isinstance(module, Blend):
        return "Blend", module.group, module.beta_value, _module(module.dense), _module(module.compressed)
    if isinstance(module, fx.GraphModule):
        return "graph", tuple(described(module))
    return repr(module)


def _assert_graph(gm: fx.GraphModule, expected: nn.Module, leaves: tuple[type, ...] = ()) -> None:
    gm.graph.lint()
    contracts.ensure_lint(gm)
    want = described(expected_graph(expected, leaves))
    got = described(gm)
    lines = [f"  {g}" if g == w else f"≠ {g}\n  expected {w}" for g, w in zip(got, want)]
    assert got == want, "graph differs from the expected one:\n" + "\n".join(lines) + (
        f"\n({len(got)} nodes, expected {len(want)})")


# ── one helper per pass ──────────────────────────────────────────────────────────────────


def check_capture(model: nn.Module, inputs, expected: nn.Module, *, mode: str = "fx", leaves=()):
    """capture: the graph is `expected` (with `leaves` kept whole) and reproduces the model exactly."""
    args, kwargs = inputs
    captured = capture(model, args, kwargs, mode=mode)
    _assert_graph(captured.gm, expected, leaves)
    assert_close_outputs(run(model, inputs), run(captured.gm, inputs), EXACT, "captured vs model")
    return captured


def check_normalize(model: nn.Module, inputs, expected: nn.Module, *, mode: str = "fx") -> fx.GraphModule:
    """normalize: functional layer calls become the modules of `expected`; outputs unchanged."""
    gm = _normalized(model, inputs, mode)
    _assert_graph(gm, expected)
    contracts.ensure_normalized(gm)
    assert_close_outputs(run(model, inputs), run(gm, inputs), EXACT, "normalized vs model")
    return gm


def _normalized(model: nn.Module, inputs, mode: str = "fx") -> fx.GraphModule:
    args, kwargs = inputs
    return normalize(capture(model, args, kwargs, mode=mode).gm)


def _selected(model: nn.Module, inputs, selection: SelectionConfig):
    gm = _normalized(model, inputs)
    sites = find_sites(gm, *inputs)
    return gm, select(gm, sites, selection), sites


def check_select(model: nn.Module, inputs, selection: SelectionConfig, expected_groups: list, expected_excluded: dict):
    """select: exactly `expected_groups`; `expected_excluded` maps each left-out layer to its reason's start."""
    gm = _normalized(model, inputs)
    before = described(gm)
    chosen = select(gm, find_sites(gm, *inputs), selection)
    assert described(gm) == before, "select changed the graph"
    contracts.require_group_layers(gm, chosen.groups)
    assert [g.to_dict() for g in chosen.groups] == [g.to_dict() for g in expected_groups]
    assert sorted(chosen.excluded) == sorted(expected_excluded)
    for path, start in expected_excluded.items():
        assert chosen.excluded[path].startswith(start), f"{path}: {chosen.excluded[path]!r}"
    return chosen


def check_calibrate(model: nn.Module, inputs, expected_rms: dict[str, torch.Tensor]) -> None:
    """calibrate: the input RMS of each layer equals the hand-computed one; graph and mode unchanged."""
    gm = _normalized(model, inputs).train()
    before = described(gm)
    rms = input_rms(gm, list(expected_rms), *inputs)
    assert described(gm) == before, "calibrate changed the graph"
    assert gm.training, "calibrate left the graph in eval mode"
    contracts.ensure_input_rms(gm, rms)
    assert sorted(rms) == sorted(expected_rms)
    for path, want in expected_rms.items():
        torch.testing.assert_close(rms[path], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{path}: {m}")


def _duplicated(model: nn.Module, inputs, selection: SelectionConfig):
    gm, chosen, sites = _selected(model, inputs, selection)
    method = method_for(CONFIG)
    plans = {p: method.plan(sites[p]) for g in chosen.groups for p in g.layers}
    originals = {p: gm.get_submodule(p) for g in chosen.groups for p in g.layers}
    duplicate(gm, chosen.groups, method, plans, sites)
    return gm, chosen.groups, originals


def check_duplicate(model: nn.Module, inputs, selection: SelectionConfig, expected: nn.Module) -> fx.GraphModule:
    """duplicate: each group is a Blend of the original layers and their twins, as in `expected`; β = 1
    reproduces the model; block branches' nodes carry their role."""
    gm, groups, originals = _duplicated(model, inputs, selection)
    _assert_graph(gm, expected)
    contracts.after_duplicate(gm)
    contracts.ensure_blend_branches_agree(gm, *inputs)
    for group in groups:
        blend = gm.get_submodule(group.path)
        for path in group.layers:
            inside = path[len(group.path) + 1:] if group.kind == "block" else ""
            assert blend.dense.get_submodule(inside) is originals[path], f"{path} is not the original layer"
        for branch, role in ((blend.dense, "dense"), (blend.compressed, "compressed")):
            if isinstance(branch, fx.GraphModule):
                roles = {n.meta.get("vcon", {}).get("role") for n in branch.graph.nodes if n.op not in ("placeholder", "output")}
                assert roles == {role}, f"{group.name}: {role} branch nodes tagged {roles}"
    assert_close_outputs(run(model, inputs), run(gm, inputs), EXACT, "blended at β = 1 vs model")
    return gm


def check_vanish(model: nn.Module, inputs, selection: SelectionConfig, expected: nn.Module) -> fx.GraphModule:
    """vanish: only the compressed branches remain, as in `expected`, with the outputs of β = 0."""
    gm, _groups, _originals = _duplicated(model, inputs, selection)
    set_beta(gm, 0.0)
    contracts.ensure_betas_at(gm, 0.0)
    blended = run(gm, inputs)
    vanish_graph(gm, method_for(CONFIG))
    _assert_graph(gm, expected)
    contracts.after_vanish(gm)
    assert_close_outputs(blended, run(gm, inputs), EXACT, "vanished vs blended at β = 0")
    return gm
