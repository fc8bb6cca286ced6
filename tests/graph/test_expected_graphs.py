"""Each graph pass against a hand-written expected graph (the torch.fx tests' style).

A tiny module goes through the pass; the result is linted and compared node by node with the
graph of a module written out by hand (tests/graph/graph_checks.py): capture, normalize,
select (the expected groups), calibrate (the expected statistics), duplicate (dense branch,
compressed branch, Blend call) and vanish (only the compressed branch left).
"""

from __future__ import annotations

import torch
from torch import nn

from vcon_fx.graph.blend import Blend
from vcon_fx.graph.select import Group, SelectionConfig

from graph_checks import (check_calibrate, check_capture, check_duplicate, check_normalize, check_select,
                          check_vanish, expected_graph, lowrank)
from tiny_models import Blocky, Chain, Functional, holder


def chain_inputs():
    return (torch.randn(5, 4),), {}


BLOCK = SelectionConfig(granularity="block", blocks=("block",))


# ── capture ─────────────────────────────────────────────────────────────────────────────────


class Gate(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot follow it."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class Looped(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), Gate(), nn.Linear(4, 4)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class LoopedUnrolled(Looped):
    """Expected: the loop unrolled, the gate called whole."""

    def forward(self, x):
        x = torch.relu(self.layers[0](x))
        x = torch.relu(self.layers[1](x))
        return torch.relu(self.layers[2](x))


def test_capture_unrolls_python_loops_and_keeps_an_untraceable_submodule_whole():
    captured = check_capture(Looped(), ((torch.randn(3, 4),), {}), LoopedUnrolled(), mode="fx", leaves=(Gate,))
    assert captured.path == "fx" and captured.leaves == ["layers.1"]


# ── normalize ───────────────────────────────────────────────────────────────────────────────


class FunctionalNormalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.conv = nn.Linear(8, 4), nn.Conv2d(3, 6, 3, padding=1, bias=False)

    def forward(self, x, img):
        return self.proj(x).relu(), self.conv(img)


def test_normalize_lifts_functional_linear_and_conv_onto_the_same_parameters():
    model = Functional()
    gm = check_normalize(model, ((torch.randn(2, 8), torch.randn(1, 3, 5, 5)), {}), FunctionalNormalized())
    assert gm.proj.weight is model.proj.weight and gm.proj.bias is model.proj.bias
    assert gm.conv.weight is model.conv.weight


class Addmm(nn.Module):
    """Hugging Face's Conv1D: addmm(b, x, W) with W stored (in, out)."""

    def __init__(self):
        super().__init__()
        self.c = holder(weight=torch.randn(8, 4), bias=torch.randn(4))

    def forward(self, x):
        return torch.addmm(self.c.bias, x, self.c.weight)


class AddmmNormalized(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(x)


def test_normalize_turns_addmm_into_a_linear_with_the_weight_transposed():
    model = Addmm()
    gm = check_normalize(model, ((torch.randn(3, 8),), {}), AddmmNormalized())
    torch.testing.assert_close(gm.c.weight, model.c.weight.t(), rtol=0, atol=0)


class ExportedNormalized(nn.Module):
    """An exported Sequential(Linear, ReLU, Linear): aten.linear lifted back to the layers at their paths."""

    def __init__(self):
        super().__init__()
        self.add_module("0", nn.Linear(4, 8))
        self.add_module("2", nn.Linear(8, 2))

    def forward(self, x):
        return (getattr(self, "2")(torch.ops.aten.relu.default(getattr(self, "0")(x))),)


def test_normalize_lifts_an_exported_graph_back_to_layers():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    check_normalize(model, ((torch.randn(2, 4),), {}), ExportedNormalized(), mode="export")


# ── select ──────────────────────────────────────────────────────────────────────────────────


def test_select_groups_every_middle_layer_and_leaves_stem_and_head_dense():
    check_select(Chain(), chain_inputs(), SelectionConfig(),
                 [Group("fc1", "layer", "fc1", ["fc1"], ["fc1"]), Group("fc2", "layer", "fc2", ["fc2"], ["fc2"])],
                 {"stem": "first layer", "head": "last layer"})


def test_select_honours_targets_and_ignore():
    check_select(Chain(), chain_inputs(), SelectionConfig(targets=("fc*",), ignore=("fc1",)),
                 [Group("fc2", "layer", "fc2", ["fc2"], ["fc2"])],
                 {"stem": "not matched", "fc1": "ignored", "head": "not matched"})


def test_select_makes_a_block_one_group_of_its_layers():
    check_select(Blocky(), chain_inputs(), BLOCK,
                 [Group("block", "block", "block", ["block.0", "block.2"], ["block"])],
                 {"stem": "first layer", "head": "last layer"})


# ── calibrate ───────────────────────────────────────────────────────────────────────────────


def test_calibrate_measures_the_rms_of_each_input_feature():
    model, inputs = Chain(), chain_inputs()
    with torch.no_grad():
        h1 = model.stem(inputs[0][0])
        h2 = torch.relu(model.fc1(h1))
    check_calibrate(model, inputs, {"fc1": h1.pow(2).mean(0).sqrt(), "fc2": h2.pow(2).mean(0).sqrt()})


class Convs(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.relu(self.stem(x)))


def test_calibrate_measures_a_convolution_per_input_channel():
    model, x = Convs(), torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        h = torch.relu(model.stem(x))
    check_calibrate(model, ((x,), {}), {"conv": h.pow(2).mean(dim=(0, 2, 3)).sqrt()})


# ── duplicate ───────────────────────────────────────────────────────────────────────────────


class ChainBlended(Chain):
    """Expected after duplicate: fc1 and fc2 each a Blend of the dense layer and its low-rank twin, β = 1."""

    def __init__(self):
        super().__init__()
        self.fc1 = Blend(nn.Linear(8, 8), lowrank(8, 8), "fc1")
        self.fc2 = Blend(nn.Linear(8, 8), lowrank(8, 8), "fc2")


class BlockyBlended(Blocky):
    """Expected after duplicate: the block's nodes extracted into a dense graph, its twin graph holds
    low-rank layers, and one Blend call takes the block's place."""

    def __init__(self):
        super().__init__()
        dense = expected_graph(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)))
        compressed = expected_graph(nn.Sequential(lowrank(8, 8), nn.ReLU(), lowrank(8, 8)))
        self.block = Blend(dense, compressed, "block")


def test_duplicate_wraps_each_layer_in_a_blend_with_its_twin():
    check_duplicate(Chain(), chain_inputs(), SelectionConfig(), ChainBlended())


def test_duplicate_extracts_a_block_into_dense_and_compressed_graphs():
    check_duplicate(Blocky(), chain_inputs(), BLOCK, BlockyBlended())


# ── vanish ──────────────────────────────────────────────────────────────────────────────────


class ChainVanished(Chain):
    """Expected after vanish: the twins in the layers' places, nothing dense around them."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = lowrank(8, 8), lowrank(8, 8)


class BlockyVanished(Blocky):
    """Expected after vanish: the block's compressed graph alone."""

    def __init__(self):
        super().__init__()
        self.block = expected_graph(nn.Sequential(lowrank(8, 8), nn.ReLU(), lowrank(8, 8)))


def test_vanish_keeps_only_each_layers_twin():
    check_vanish(Chain(), chain_inputs(), SelectionConfig(), ChainVanished())


def test_vanish_keeps_only_a_blocks_compressed_graph():
    check_vanish(Blocky(), chain_inputs(), BLOCK, BlockyVanished())
