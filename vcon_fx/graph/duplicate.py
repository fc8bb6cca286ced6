"""Duplicate: each group gets a compressed twin, joined to the dense original by a Blend.

Layer groups: the Blend takes the layer's place (same path), wrapping the original layer and
its twin. Block groups: the block's nodes are extracted into a GraphModule (the dense branch);
a copy with its compressible layers replaced (those never copied) is the compressed branch, so state such as
batch-norm statistics is never shared between branches. Provenance goes into
`node.meta["vcon"]` (role dense | compressed | blend, group, method), never into names.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from operator import attrgetter

import torch
from torch import fx, nn
from torch.fx.passes.utils.fuser_utils import validate_partition

from ..errors import SelectionError
from ..methods.base import LayerPlan, LayerSite, Method
from ..methods.tied import TiedHead
from . import contracts
from .blend import Blend
from .select import Group

__all__ = ["duplicate", "extract_region", "region_nodes", "plan_blocks"]

log = logging.getLogger(__name__)


def duplicate(
    gm: fx.GraphModule,
    groups: list[Group],
    method: Method,
    plans: dict[str, LayerPlan],
    sites: dict[str, LayerSite],
    *,
    freeze_dense: bool = False,
    init: bool = True,
) -> fx.GraphModule:
    """Insert a compressed twin and a Blend (β = 1) for every group (in place).

    Args:
        groups: from `select`; layers whose plan is skipped stay dense inside their group.
        method: the builder of compressed twins.
        plans: layer path → plan (rank, …) from `method.plan`.
        freeze_dense: dense branch parameters get requires_grad=False.
        init: False only allocates the twins (loading an artifact overwrites the weights).

    Requires: every group's layers are call_module nodes of compressible layers (normalize).
    Ensures: each group is one call_module node with meta role "blend"; output unchanged at β = 1.
    """
    method_name = method.config.method
    method.check_groups(groups)
    if contracts.active():
        contracts.require_group_layers(gm, groups)
    # a head tied to an embedding is built on the embedding's twin: after it, whatever the graph order
    tied_last = sorted(enumerate(groups), key=lambda item: _tied_to(plans, item[1]) is not None)
    for order, group in tied_last:
        if group.kind == "layer":
            _duplicate_layer(gm, group, method, plans, sites, init, order)
        else:
            _duplicate_block(gm, group, method, plans, sites, init, order)
        blend: Blend = gm.get_submodule(group.path)
        if freeze_dense:
            # Latent weights shared with the twin must keep training: freezing covers the rest.
            shared_ids = {id(p) for p in blend.dense.parameters()} & {id(p) for p in blend.compressed.parameters()}
            for p in blend.dense.parameters():
                if id(p) not in shared_ids:
                    p.requires_grad_(False)
            if shared_ids:
                log.warning("group %s: --freeze-dense cannot freeze weights the compressed branch shares; "
                            "use separate_weights to freeze a dense copy", group.name)
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target == group.path:
                node.meta["vcon"] = {"role": "blend", "group": group.name, "method": method_name}
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    if contracts.active():
        contracts.after_duplicate(gm)
    return gm


def _duplicate_layer(gm, group: Group, method: Method, plans, sites, init: bool, order: int) -> None:
    layer = gm.get_submodule(group.path)
    table = _tied_to(plans, group)
    if table is not None:  # one compressed table for the embedding and its tied head (methods/tied.py)
        twin = TiedHead(gm.get_submodule(table).compressed, layer, share=method.share_dense_weights(), init=init)
    else:
        twin = method.build(sites[group.path], plans[group.path], init=init).train(layer.training)
    gm.set_submodule(group.path, Blend(layer, twin, group.name, order=order))


def _tied_to(plans: dict[str, LayerPlan], group: Group) -> str | None:
    """The embedding a layer group's head is tied to (its plan says so), or None."""
    plan = plans.get(group.path) if group.kind == "layer" else None
    return None if plan is None or plan.skipped else plan.detail.get("tied_to")


def _duplicate_block(gm, group: Group, method: Method, plans, sites, init: bool, order: int) -> None:
    nodes = region_nodes(gm, group.members)
    parent = _block_root(group)
    dense, inputs, output = extract_region(gm, nodes, parent)
    # The layers about to be replaced by their twins are not copied (a quant or prune twin shares their
    # weights): the copy holds only the block's other modules (norms, activations), never a second block.
    replaced = {id(dense.get_submodule(_relative(p, parent))): dense.get_submodule(_relative(p, parent))
                for p in group.layers if not plans[p].skipped}
    compressed = copy.deepcopy(dense, memo=dict(replaced))
    for path in group.layers:
        plan = plans[path]
        if plan.skipped:
            continue
        rel = _relative(path, parent)
        site = dataclasses.replace(sites[path], module=dense.get_submodule(rel))  # keeps its input statistics
        compressed.set_submodule(rel, method.build(site, plan, init=init).train(dense.training))
    # a method that couples layers (structured pruning: fc1's rows with fc2's columns) sees the whole block
    block_plans, block_sites = _block_layers(group, parent, plans, sites)
    method.build_block(dense, compressed, block_plans, block_sites, init=init)
    for gm_part, role in ((dense, "dense"), (compressed, "compressed")):
        for node in gm_part.graph.nodes:
            if node.op not in ("placeholder", "output"):
                node.meta["vcon"] = {"role": role, "group": group.name, "method": method.config.method}
        gm_part.recompile()
    gm.set_submodule(group.path, Blend(dense, compressed, group.name, order=order), strict=False)
    with gm.graph.inserting_after(output):
        call = gm.graph.call_module(group.path, tuple(inputs))
    call.meta = {k: v for k, v in output.meta.items() if k in ("val", "tensor_meta", "stack_trace")}
    output.replace_all_uses_with(call)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def plan_blocks(gm: fx.GraphModule, groups: list[Group], method: Method, plans: dict[str, LayerPlan],
                sites: dict[str, LayerSite]) -> None:
    """Let the method refine its plans block by block, as duplicate would (pure on `gm`; `plans` in place)."""
    for group in groups:
        if group.kind != "block":
            continue
        parent = _block_root(group)
        dense, _inputs, _output = extract_region(gm, region_nodes(gm, group.members), parent)
        method.plan_block(dense, *_block_layers(group, parent, plans, sites))


def _block_root(group: Group) -> str:
    """The path block targets are relative to: the block itself, or the parent of joined siblings."""
    first = group.members[0]
    return first if len(group.members) == 1 else first.rpartition(".")[0]


def _block_layers(group: Group, parent: str, plans, sites) -> tuple[dict[str, LayerPlan], dict[str, LayerSite]]:
    """The group's plans and sites keyed by their path inside the block (its GraphModule's targets)."""
    rel = {path: _relative(path, parent) for path in group.layers}
    return {rel[p]: plans[p] for p in group.layers}, {rel[p]: sites[p] for p in group.layers if p in sites}


def region_nodes(gm: fx.GraphModule, members: list[str]) -> list[fx.Node]:
    """The nodes that belong to the given module paths, in graph order.

    Parameter fetches used only inside the region come along, so the twin gets its own copy.
    """
    def inside(node: fx.Node) -> bool:
        stack = node.meta.get("nn_module_stack") or {}
        paths = [p for p, _ in stack.values()]
        if node.op == "call_module":
            paths.append(node.target)
        return any(p == m or p.startswith(m + ".") for p in paths for m in members)

    picked = {n for n in gm.graph.nodes if n.op not in ("placeholder", "output") and inside(n)}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.users and all(u in picked for u in node.users):
            picked.add(node)
    return [n for n in gm.graph.nodes if n in picked]


def extract_region(gm: fx.GraphModule, nodes: list[fx.Node], prefix: str) -> tuple[fx.GraphModule, list[fx.Node], fx.Node]:
    """Copy a single-exit region into its own GraphModule (pure: `gm` is not changed).

    Module and attribute targets are made relative to `prefix`, so a block at `layer1.0`
    holds `conv1`, not `layer1.0.conv1`.

    Returns:
        (sub-GraphModule, the outside nodes it reads in order, the region node read outside)

    Raises:
        SelectionError: the region has several outputs or would create a cycle.
    """
    label = f"block at {prefix or '<root>'} ({len(nodes)} nodes)"
    if not validate_partition(nodes):
        raise SelectionError(f"{label} is not a contiguous region (a path leaves it and comes back); choose another --blocks")
    inside = set(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(outputs) != 1:
        raise SelectionError(
            f"{label} has {len(outputs)} outputs ({[n.name for n in outputs][:4]}); a block must have one exit: "
            "choose a module whose result alone is used after it, or use --granularity layer"
        )
    inputs: list[fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for arg in inputs:
        env[arg] = graph.placeholder(arg.name)
        env[arg].meta = dict(arg.meta)
    root = nn.Module()
    for node in nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            rel = _relative(node.target, prefix)
            _attach(root, rel, attrgetter(node.target)(gm))
            new.target = rel
        env[node] = new
    graph.output(env[outputs[0]])
    sub = fx.GraphModule(root, graph, class_name="Block")
    return sub, inputs, outputs[0]


def _relative(target: str, prefix: str) -> str:
    if prefix and target.startswith(prefix + "."):
        return target[len(prefix) + 1:]
    return target if not prefix else target.replace(".", "_")



def _attach(root: nn.Module, path: str, obj) -> None:
    """Put `obj` (a module, parameter or tensor) at dotted `path` under `root`, by reference."""
    *parents, leaf = path.split(".")
    holder = root
    for part in parents:
        if not hasattr(holder, part):
            holder.add_module(part, nn.Module())
        holder = getattr(holder, part)
    if isinstance(obj, nn.Module):
        holder.add_module(leaf, obj)
    elif isinstance(obj, nn.Parameter):
        holder.register_parameter(leaf, obj)
    elif isinstance(obj, torch.Tensor):
        holder.register_buffer(leaf, obj)
    else:
        setattr(holder, leaf, obj)
