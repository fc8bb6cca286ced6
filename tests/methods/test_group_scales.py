"""Quant with `--group-size`: one scale per group of input weights of a Linear.

Planted weights and inputs show what groups buy: per-block magnitude differences (one scale per
row coarsens the quiet blocks) and, for the GPTQ start, correlated inputs of very unequal
energy. The twin, its materialized layer and a saved-and-loaded copy agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods import QuantConfig
from vcon_fx.methods.gptq import gptq_quantize
from vcon_fx.methods.group_scales import dequantize, quantize_weight
from vcon_fx.methods.scale_grid import clip_search_scales, grid_integers, grid_round

OUT, IN, GROUP = 64, 256, 32


def _planted_weight(seed: int = 0) -> torch.Tensor:
    """Blocks of 32 inputs at 0.1–0.3 of one loud block per row: a row scale's grid is 3–10× too coarse for them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    magnitude = 0.1 + 0.2 * torch.rand(OUT, IN // GROUP, generator=g)
    magnitude[torch.arange(OUT), torch.randint(0, IN // GROUP, (OUT,), generator=g)] = 1.0
    return (w.reshape(OUT, -1, GROUP) * magnitude[..., None]).reshape(OUT, IN)


def _output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - wq).T).norm() / (x @ w.T).norm())


def test_group_scales_cut_the_output_error_of_planted_block_magnitudes():
    w, x = _planted_weight(), torch.randn(512, IN, generator=torch.Generator().manual_seed(1))
    per_channel = _output_error(w, dequantize(*quantize_weight(w, 4)), x)
    q, scale = quantize_weight(w, 4, GROUP)
    grouped = _output_error(w, dequantize(q, scale), x)
    assert scale.shape == (OUT, IN // GROUP) and q.abs().max() == 7
    assert grouped < 0.5 * per_channel, (grouped, per_channel)  # measured 0.40×


def _correlated_inputs(n: int, g: torch.Generator) -> torch.Tensor:
    """Inputs on a 32-dimensional subspace (plus a little noise), features three decades apart in energy."""
    basis = torch.randn(32, IN, generator=torch.Generator().manual_seed(7))
    loudness = 10 ** (torch.rand(IN, generator=torch.Generator().manual_seed(8)) * 2 - 1)
    return (torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, IN, generator=g)) * loudness


def test_gptq_with_static_groups_beats_grouped_rounding_on_held_out_inputs():
    g = torch.Generator().manual_seed(2)
    w, calibration, held_out = torch.randn(OUT, IN, generator=g), _correlated_inputs(2048, g), _correlated_inputs(1024, g)
    q, scale = quantize_weight(w, 4, GROUP)
    rounded = _output_error(w, dequantize(q, scale), held_out)
    solved = gptq_quantize(w, calibration.T @ calibration, scale, 4)  # act-order: columns leave their groups' order
    assert torch.equal(dequantize(grid_integers(solved, scale, 4), scale), solved)  # each column on ITS group's grid
    assert grid_integers(solved, scale, 4).abs().max() <= 7
    assert _output_error(w, solved, held_out) < 0.25 * rounded, rounded  # measured 0.06×


def test_the_clip_search_picks_a_scale_per_group_that_never_loses_to_max_abs():
    w = _planted_weight(3)
    importance = torch.rand(IN, generator=torch.Generator().manual_seed(4)) + 0.1
    plain = quantize_weight(w, 4, GROUP)[1]
    searched = clip_search_scales(w, plain, 4, importance)
    assert searched.shape == plain.shape and bool((searched <= plain).all())

    def per_group_error(scale):
        return ((w - grid_round(w, scale, 4)).pow(2) * importance).reshape(OUT, -1, GROUP).sum(-1)

    assert bool((per_group_error(searched) <= per_group_error(plain) + 1e-9).all())
    assert float(per_group_error(searched).sum()) < 0.9 * float(per_group_error(plain).sum())


class Mixed(nn.Module):
    """Linears with and without inputs divisible by 32, a convolution and an embedding."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 64)
        self.conv = nn.Conv1d(64, 64, 3, padding=1)
        self.grouped, self.ragged, self.head = nn.Linear(64, 40), nn.Linear(40, 64), nn.Linear(64, 8)

    def forward(self, ids):
        h = self.emb(ids)
        h = torch.relu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        return self.head(torch.relu(self.ragged(torch.relu(self.grouped(h)))))


def _inputs():
    return (torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(5)),)


@pytest.mark.parametrize("config", [QuantConfig(bits=4, group_size=GROUP),
                                    QuantConfig(bits=4, group_size=GROUP, clip_search=True)], ids=["max-abs", "clip"])
def test_the_plan_twin_vanished_and_loaded_models_agree(tmp_path, config):
    torch.manual_seed(0)
    model, inputs = Mixed().eval(), _inputs()
    vm = vcon_fx.transform(model, config, example_inputs=inputs, include_stem=True, include_head=True)
    plans = vm.meta["vcon"].plans
    assert plans["grouped"].detail["group_size"] == GROUP and plans["head"].detail["group_size"] == GROUP
    assert plans["grouped"].bytes_after == 64 * 40 // 2 + 40 * 2 * 4 + 40 * 4  # INT4 + out·groups scales + bias
    assert "40 input features are not a multiple of --group-size 32" in plans["ragged"].detail["scales"]
    for path in ("conv", "emb"):
        assert "group_size" not in plans[path].detail and "applies to Linear layers" in plans[path].detail["scales"]
    vcon_fx.set_beta(vm, 0.0)
    blended_out = vm(*inputs)
    small = vcon_fx.vanish(vm)
    assert small.get_submodule("grouped").scale.shape == (40, 2)
    assert small.get_submodule("ragged").scale.shape == (64,) and small.get_submodule("conv").scale.shape == (64,)
    assert torch.equal(small(*inputs), blended_out)  # the twin's arithmetic, bit for bit
    for stage, saved in (("blended", vm), ("vanished", small)):
        path = vcon_fx.save(saved, tmp_path / stage)
        loaded = vcon_fx.load(path, model=Mixed(), example_inputs=inputs)
        assert torch.equal(loaded(*inputs), blended_out), stage


def test_a_recipe_without_group_size_loads_per_channel():
    data = QuantConfig(bits=4).to_dict()
    assert data["version"] == 3 and data["group_size"] is None
    old = {k: v for k, v in data.items() if k != "group_size"} | {"version": 1}
    assert QuantConfig.from_dict(old) == QuantConfig(bits=4)
    assert QuantConfig.from_dict(QuantConfig(bits=4, group_size=64).to_dict()).group_size == 64


@pytest.mark.parametrize("group_size, bits, message", [
    (48, 4, "--group-size must be a power of 2 of at least 16.*got 48"),
    (8, 4, "--group-size must be a power of 2 of at least 16.*got 8"),
    (True, 4, "--group-size must be a power of 2"),
    (32, 1, "--group-size needs an integer grid.*got --bits 1"),
    (32, "ternary", "--group-size needs an integer grid.*got --bits ternary"),
])
def test_a_bad_group_size_is_a_config_error(group_size, bits, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(bits=bits, group_size=group_size)



def test_a_gptq_start_through_transform_keeps_its_group_scales_fixed():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), torch.randn(4, 64)
    vm = vcon_fx.transform(model, QuantConfig(bits=4, group_size=GROUP), example_inputs=(x,), include_stem=True,
                           include_head=True, calibration=torch.randn(64, 64))
    assert {pl.detail["init"] for pl in vm.meta["vcon"].plans.values()} == {"gptq"}
    vcon_fx.set_beta(vm, 0.0)
    blended_out = vm(x)
    small = vcon_fx.vanish(vm)
    assert small.get_submodule("0").scale.shape == (64, 2) and torch.equal(small(x), blended_out)
