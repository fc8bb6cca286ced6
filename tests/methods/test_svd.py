"""Truncated SVD routes (exact and randomized) and the low-rank rank options built on them."""

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods.lowrank import LowRankConfig, choose_rank
from vcon_fx.methods.svd import exact_svd, randomized_svd, truncated_svd, use_randomized


def _optimal_error(m: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(m.double())
    return float(s[rank:].pow(2).sum().sqrt())


def _error(a, b, m) -> float:
    return float((a.double() @ b.double() - m.double()).norm())


@pytest.mark.parametrize("shape,rank", [((96, 64), 8), ((64, 200), 16), ((300, 300), 300)])
def test_exact_route_is_the_optimal_truncation(shape, rank):
    m = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    a, b = exact_svd(m, rank)
    assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
    assert _error(a, b, m) == pytest.approx(_optimal_error(m, rank), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("shape,rank", [((512, 512), 32), ((1024, 384), 48), ((384, 1024), 64)])
def test_randomized_route_is_near_optimal_on_flat_spectra(shape, rank):
    # Gaussian weights have the flattest spectrum, the hardest case for a randomized sketch.
    m = torch.randn(shape, generator=torch.Generator().manual_seed(2)) / 20
    a, b = randomized_svd(m, rank)
    assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
    assert _error(a, b, m) <= 1.02 * _optimal_error(m, rank)


def test_randomized_route_recovers_a_low_rank_weight_exactly():
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(600, 10, generator=gen) @ torch.randn(10, 400, generator=gen)
    a, b = randomized_svd(m, 40)
    assert (a.double() @ b.double() - m.double()).abs().max() <= 1e-4 * m.abs().max()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


def test_randomized_route_is_reproducible_and_leaves_the_global_rng_alone():
    m = torch.randn(400, 300, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = randomized_svd(m, 20)
    assert torch.equal(torch.rand(3), expected_next)  # the sketch used its own generator
    second = randomized_svd(m, 20)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_randomized_route_pads_when_the_rank_exceeds_the_sketch():
    m = torch.randn(20, 12, generator=torch.Generator().manual_seed(5))
    a, b = randomized_svd(m, 15)
    assert a.shape == (20, 15) and b.shape == (15, 12)
    assert (a.double() @ b.double() - m.double()).abs().max() < 1e-4


def test_zero_matrix_gives_zero_factors_on_both_routes():
    zero = torch.zeros(512, 512)
    for a, b in (exact_svd(zero, 16), randomized_svd(zero, 16)):
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and not (a @ b).any()


def test_auto_route_picks_randomized_only_far_below_the_size():
    assert use_randomized((768, 3072), 64)
    assert not use_randomized((768, 768), 256)  # a third of the side: exact
    assert not use_randomized((128, 128), 8)  # small layers: eigh is already cheap
    m = torch.randn(300, 300, generator=torch.Generator().manual_seed(6))
    auto = truncated_svd(m, 10)
    assert all(torch.equal(x, y.float()) for x, y in zip(auto, randomized_svd(m, 10)))
    assert truncated_svd(m, 10, "exact")[0].dtype == torch.float32
    with pytest.raises(ValueError, match="auto, exact or randomized"):
        truncated_svd(m, 10, "fast")


def test_rank_multiple_rounds_up_and_still_skips_what_saves_nothing():
    layer = nn.Linear(100, 100)
    assert choose_rank(LowRankConfig(rank=20, rank_multiple=16), layer) == 32
    assert choose_rank(LowRankConfig(rank=32, rank_multiple=16), layer) == 32
    assert choose_rank(LowRankConfig(ratio=0.25, rank_multiple=16), layer) == 16  # 12 → 16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 200),
                          nn.ReLU(), nn.Linear(200, 3)).eval()
    plan = vcon_fx.plan(model, LowRankConfig(rank=5, rank_multiple=32), example_inputs=(torch.randn(2, 8),))
    assert plan.plans["2"].detail["rank"] == 32 and plan.plans["2"].skipped  # 32·80 ≥ 40·40
    assert "would not reduce" in plan.plans["2"].skip_reason
    assert plan.plans["4"].detail["rank"] == 32 and not plan.plans["4"].skipped  # 32·240 < 40·200


@pytest.mark.parametrize("kwargs,match", [({"rank": 4, "rank_multiple": 0}, "rank-multiple"),
                                          ({"rank": 4, "rank_multiple": True}, "rank-multiple"),
                                          ({"rank": 4, "svd": "fast"}, "--svd")])
def test_bad_rank_options_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        LowRankConfig(**kwargs)


def test_svd_choice_is_kept_in_the_recipe_and_both_routes_give_identity_at_beta_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(), nn.Linear(300, 3)).eval()
    x = torch.randn(4, 8)
    errors = {}
    for svd in ("exact", "randomized"):
        vm = vcon_fx.transform(model, LowRankConfig(rank=16, svd=svd), example_inputs=(x,))
        assert vm.meta["vcon"].config.svd == svd
        torch.testing.assert_close(vm(x), model(x))  # β = 1: the dense branch alone
        twin = vm.get_submodule("2").compressed
        errors[svd] = _error(twin.up.weight.detach(), twin.down.weight.detach(), model[2].weight.detach())
    assert errors["exact"] == pytest.approx(_optimal_error(model[2].weight.detach(), 16), rel=1e-5)
    assert errors["randomized"] <= 1.02 * errors["exact"]


def _output_error(vm, model, x) -> float:
    vcon_fx.set_beta(vm, 0.0)
    with torch.no_grad():
        return float((vm(x) - model(x)).pow(2).mean())


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_activation_aware_low_rank_fits_the_inputs_the_layer_sees(kind):
    # inputs whose features differ in scale by 100×: plain SVD spends its rank on weights the
    # small features multiply; the activation-aware one on what reaches the output
    torch.manual_seed(0)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(64, 64), nn.Identity(), nn.Linear(64, 64), nn.Identity(), nn.Linear(64, 4)).eval()
        scale = torch.logspace(-2, 0, 64)
        x = torch.randn(256, 64) * scale
        with torch.no_grad():
            model[0].weight.copy_(torch.eye(64))
            model[0].bias.zero_()
    else:
        model = nn.Sequential(nn.Conv2d(32, 32, 1), nn.Identity(), nn.Conv2d(32, 32, 3, padding=1), nn.Identity(),
                              nn.Conv2d(32, 4, 1)).eval()
        scale = torch.logspace(-2, 0, 32)
        x = torch.randn(8, 32, 8, 8) * scale[None, :, None, None]
        with torch.no_grad():
            model[0].weight.copy_(torch.eye(32)[:, :, None, None])
            model[0].bias.zero_()
    plain = vcon_fx.transform(model, LowRankConfig(rank=8), example_inputs=(x,))
    aware = vcon_fx.transform(model, LowRankConfig(rank=8, activation_aware=True), example_inputs=(x,))
    assert aware.meta["vcon"].config.activation_aware
    torch.testing.assert_close(aware(x), model(x))  # β = 1: still the dense model
    assert _output_error(aware, model, x) < 0.85 * _output_error(plain, model, x)  # measured: 0.50 linear, 0.76 conv


def test_activation_aware_composes_with_quant_and_survives_save_and_load(tmp_path):
    from vcon_fx.methods.compose import compose_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(16, 8)
    config = compose_config("lowrank+quant", {"rank": 8, "bits": 8, "activation_aware": True})
    vm = vcon_fx.transform(model, config, example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    vcon_fx.save(vm, tmp_path / "m.vcon")
    again = vcon_fx.load(tmp_path / "m.vcon", model=model)
    torch.testing.assert_close(again(x), vm(x))
