"""Quant with `--group-size` and `--asymmetric`: a zero point beside each group's scale.

Planted weights show what the zero point buys: groups whose weights sit off-centre (a mean
shift per group) waste half a symmetric grid. GPTQ and the clip search run on the asymmetric
grid unchanged, and the twin, its vanished layer and a saved-and-loaded copy agree bit for bit.
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
from vcon_fx.methods.zero_point import minmax_grid, quantize_weight_asymmetric

OUT, IN, GROUP = 64, 256, 32


def _shifted_weight(seed: int = 0) -> torch.Tensor:
    """Each group of 32 inputs centred on its own offset, up to ±1.5 of the weights' spread."""
    g = torch.Generator().manual_seed(seed)
    shift = 3 * torch.rand(OUT, IN // GROUP, 1, generator=g) - 1.5
    return (torch.randn(OUT, IN // GROUP, GROUP, generator=g) + shift).reshape(OUT, IN)


def _output_error(w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - wq).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("bits, low, high", [(4, -8, 7), (2, -2, 1), (8, -128, 127)])
def test_the_grid_spans_every_level_and_keeps_zero_exact(bits, low, high):
    w = _shifted_weight()
    w[:, 5] = 0.0
    q, scale, zero = quantize_weight_asymmetric(w, bits, GROUP)
    assert q.min() == low and q.max() == high and scale.shape == zero.shape == (OUT, IN // GROUP)
    assert bool(((zero >= low) & (zero <= high)).all())
    assert bool((dequantize(q, scale, zero)[:, 5] == 0).all())  # [min, max] widened to contain 0: 0 is a grid point
    assert torch.equal(grid_round(w, scale, bits, zero), dequantize(q, scale, zero))


def test_a_zero_point_cuts_the_error_of_off_centre_groups():
    w, x = _shifted_weight(1), torch.randn(512, IN, generator=torch.Generator().manual_seed(2))
    symmetric = _output_error(w, dequantize(*quantize_weight(w, 4, GROUP)), x)
    asymmetric = _output_error(w, dequantize(*quantize_weight_asymmetric(w, 4, GROUP)), x)
    assert asymmetric < 0.75 * symmetric, (asymmetric, symmetric)


def test_gptq_on_the_asymmetric_grid_stays_on_it_and_beats_its_rounding():
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(32, IN, generator=g)
    loudness = 10 ** (torch.rand(IN, generator=g) * 2 - 1)

    def inputs(n):
        return (torch.randn(n, 32, generator=g) @ basis + 0.1 * torch.randn(n, IN, generator=g)) * loudness

    w, calibration, held_out = _shifted_weight(4), inputs(2048), inputs(1024)
    scale, zero = minmax_grid(w, 4, GROUP)
    rounded = _output_error(w, grid_round(w, scale, 4, zero), held_out)
    solved = gptq_quantize(w, calibration.T @ calibration, scale, 4, zero=zero)
    q = grid_integers(solved, scale, 4, zero)
    assert torch.equal(dequantize(q, scale, zero), solved) and q.min() >= -8 and q.max() <= 7
    assert _output_error(w, solved, held_out) < 0.25 * rounded, rounded


def test_the_clip_search_keeps_the_zero_points_and_never_loses_to_min_max():
    w = _shifted_weight(5)
    w[:, 7] = 6.0  # an outlier column: clipping it pays for every other weight of its groups
    scale, zero = minmax_grid(w, 4, GROUP)
    searched = clip_search_scales(w, scale, 4, None, zero)

    def per_group_error(s):
        return (w - grid_round(w, s, 4, zero)).pow(2).reshape(OUT, -1, GROUP).sum(-1)

    assert bool((searched <= scale).all()) and bool((per_group_error(searched) <= per_group_error(scale) + 1e-9).all())
    assert float(per_group_error(searched).sum()) < 0.95 * float(per_group_error(scale).sum())  # measured 0.92×


class Mixed(nn.Module):
    """A Linear with groups of 32, one whose 40 inputs take none (per channel, symmetric), and a head."""

    def __init__(self):
        super().__init__()
        self.grouped, self.ragged, self.head = nn.Linear(64, 40), nn.Linear(40, 64), nn.Linear(64, 8)

    def forward(self, x):
        return self.head(torch.relu(self.ragged(torch.relu(self.grouped(x)))))


@pytest.mark.parametrize("start, bits", [("min-max", 4), ("clip", 4), ("gptq", 4), ("min-max", 8)])
def test_the_twin_vanished_and_loaded_models_agree(tmp_path, start, bits):
    torch.manual_seed(0)
    model, x = Mixed().eval(), torch.randn(4, 64)
    model.grouped.weight.data[:, :32] += 0.3  # off-centre groups: at 8 bits q − z then passes ±127 (no int8 wrap)
    config = QuantConfig(bits=bits, group_size=GROUP, asymmetric=True, clip_search=start == "clip",
                         init="data-aware" if start == "gptq" else "auto")
    vm = vcon_fx.transform(model, config, example_inputs=(x,), include_stem=True, include_head=True,
                           calibration=torch.randn(64, 64) if start == "gptq" else None)
    plans = vm.meta["vcon"].plans
    assert plans["grouped"].detail["asymmetric"] is True and "asymmetric" not in plans["ragged"].detail
    assert plans["grouped"].bytes_after == (64 * 40 + 40 * 2) * bits // 8 + 40 * 2 * 4 + 40 * 4  # ints + zeros, scales, bias
    vcon_fx.set_beta(vm, 0.0)
    blended_out = vm(x)
    small = vcon_fx.vanish(vm)
    grouped, ragged = small.get_submodule("grouped"), small.get_submodule("ragged")
    assert grouped.zero_point.shape == grouped.scale.shape == (40, 2) and grouped.zero_point.dtype == torch.int8
    assert ragged.zero_point is None and ragged.scale.shape == (64,)
    assert grouped.qweight.min() >= -2 ** (bits - 1) and grouped.qweight.max() <= 2 ** (bits - 1) - 1
    if bits == 8:
        assert int((grouped.qweight.int() - grouped.zero_point.int().repeat_interleave(GROUP, 1)).abs().max()) > 127
    assert torch.equal(small(x), blended_out)  # the twin's arithmetic, bit for bit
    for stage, saved in (("blended", vm), ("vanished", small)):
        loaded = vcon_fx.load(vcon_fx.save(saved, tmp_path / stage), model=Mixed(), example_inputs=(x,))
        assert torch.equal(loaded(x), blended_out), stage


def test_a_recipe_from_before_asymmetric_loads_symmetric():
    data = QuantConfig(bits=4, group_size=GROUP, asymmetric=True).to_dict()
    assert data["version"] == 3 and data["asymmetric"] is True
    old = {k: v for k, v in data.items() if k != "asymmetric"} | {"version": 2}
    assert QuantConfig.from_dict(old) == QuantConfig(bits=4, group_size=GROUP)


@pytest.mark.parametrize("kwargs, message", [
    (dict(bits=4), "--asymmetric puts a zero point beside each group's scale: it needs --group-size.*no --group-size"),
    (dict(bits=1, group_size=None), "it needs --group-size and --bits 8, 4, 2 .got --bits 1"),
    (dict(bits=4, group_size=32, asymmetric="yes"), "must be true or false"),
])
def test_asymmetric_without_groups_is_a_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**({"asymmetric": True} | kwargs))
