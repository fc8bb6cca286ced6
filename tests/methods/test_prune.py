"""Magnitude pruning: exact sparsity, N:M groups, STE, shared latent weights, the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods import PruneConfig, config_from_dict
from vcon_fx.methods.base import LayerSite, method_for
from vcon_fx.methods.prune import PrunedLayer, magnitude_mask, nm_mask
from vcon_fx.graph.blend import Blend

from zoo import make


def twin_of(layer: nn.Module, config: PruneConfig) -> PrunedLayer:
    method = method_for(config)
    site = LayerSite("layer", layer)
    return method.build(site, method.plan(site))


def materialized(layer: nn.Module, config: PruneConfig) -> nn.Module:
    return method_for(config).materialize(twin_of(layer, config))


# ── config ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kwargs", [
    {"sparsity": 0.0}, {"sparsity": 1.0}, {"sparsity": -0.2}, {"sparsity": 1.5}, {"sparsity": True},
    {"pattern": "4:2"}, {"pattern": "0:4"}, {"pattern": "2:2"}, {"pattern": "2-4"}, {"pattern": "a:b"},
    {}, {"sparsity": 0.5, "pattern": "2:4"},
])
def test_invalid_config_is_refused(kwargs):
    with pytest.raises(ConfigError):
        PruneConfig(**kwargs)


def test_structured_needs_a_sparsity_not_a_pattern():
    with pytest.raises(ConfigError):
        PruneConfig(pattern="2:4", structured=True)


def test_config_round_trips_through_json():
    config = PruneConfig(pattern="2:4", fixed_mask=True, separate_weights=True)
    data = json.loads(json.dumps(config.to_dict()))
    assert config_from_dict(data) == config
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict({**data, "bogus": 1})


# ── masks ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("sparsity", [0.1, 0.37, 0.5, 0.9])
def test_sparsity_is_reached_exactly(sparsity):
    layer = nn.Linear(48, 40)
    small = materialized(layer, PruneConfig(sparsity=sparsity))
    assert type(small) is nn.Linear
    assert int((small.weight == 0).sum()) == round(sparsity * layer.weight.numel())
    kept = small.weight != 0
    assert torch.equal(small.weight[kept], layer.weight.detach()[kept])  # survivors unchanged
    assert layer.weight.detach().abs()[~kept].max() <= layer.weight.detach().abs()[kept].min()  # smallest go


def test_exact_count_with_ties():
    weight = torch.ones(10, 10)
    mask = magnitude_mask(weight, 33)
    assert int((~mask).sum()) == 33


@pytest.mark.parametrize("layer", [nn.Linear(16, 8), nn.Conv2d(8, 6, 3), nn.Conv1d(12, 5, 3)], ids=["linear", "conv2d", "conv1d"])
def test_nm_pattern_holds_in_every_group(layer):
    small = materialized(layer, PruneConfig(pattern="2:4"))
    w = small.weight.detach()
    groups = (w.movedim(1, -1) if w.dim() > 2 else w).reshape(-1, 4)  # runs of 4 input channels
    assert ((groups != 0).sum(1) <= 2).all()
    keep = nm_mask(layer.weight, 2, 4)
    assert int(keep.sum()) == layer.weight.numel() // 2


def test_nm_skips_layers_whose_inputs_do_not_divide():
    plan = method_for(PruneConfig(pattern="2:4")).plan(LayerSite("odd", nn.Linear(10, 8)))
    assert plan.skipped and "multiple of M=4" in plan.skip_reason


def test_plan_counts_nonzeros_and_keeps_dense_bytes_and_flops():
    layer = nn.Linear(64, 32)
    plan = method_for(PruneConfig(sparsity=0.75)).plan(LayerSite("fc", layer, out_shape=(4, 32)))
    assert plan.params_after == 64 * 32 - round(0.75 * 64 * 32) + 32
    assert plan.bytes_after == plan.bytes_before
    assert plan.flops_after == plan.flops_before
    assert "no speed-up on onnxruntime CPU" in plan.detail["note"]
    assert "dense float store" in plan.detail["note"]


# ── training: STE, dynamic vs fixed masks ─────────────────────────────────────────────────


def test_ste_gradient_reaches_every_latent_weight():
    layer = nn.Linear(16, 8)
    twin = twin_of(layer, PruneConfig(sparsity=0.5))
    pruned = ~twin.choose_mask()
    twin(torch.randn(4, 16)).sum().backward()
    assert layer.weight.grad is not None
    assert (layer.weight.grad[pruned] != 0).all()  # pruned positions still learn


def test_fixed_mask_does_not_follow_the_weights_and_blocks_their_gradient():
    layer = nn.Linear(16, 8)
    twin = twin_of(layer, PruneConfig(sparsity=0.5, fixed_mask=True))
    start = twin.mask.clone()
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    assert torch.equal(twin.mask, start)
    twin(torch.randn(4, 16)).sum().backward()
    assert (layer.weight.grad[~start] == 0).all()


def test_dynamic_mask_follows_the_latent_weight():
    layer = nn.Linear(16, 8)
    twin = twin_of(layer, PruneConfig(sparsity=0.5))
    before = twin.choose_mask()
    with torch.no_grad():
        layer.weight.copy_(-layer.weight.detach().abs().max() * 2 * (~before) + layer.weight * before * 0.01)
    assert torch.equal(twin.choose_mask(), ~before)


def test_latent_weights_are_shared_by_default_and_copied_on_request():
    layer = nn.Linear(16, 8)
    shared = twin_of(layer, PruneConfig(sparsity=0.5))
    assert shared.weight is layer.weight and shared.bias is layer.bias
    separate = twin_of(layer, PruneConfig(sparsity=0.5, separate_weights=True))
    assert separate.weight is not layer.weight
    assert separate.weight.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(separate.weight, layer.weight)


# ── the pipeline ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name,config", [
    ("mlp", PruneConfig(sparsity=0.6)),
    ("mlp", PruneConfig(pattern="2:4", fixed_mask=True)),
    ("conv_bn_relu", PruneConfig(sparsity=0.5)),
    ("conv_bn_relu", PruneConfig(pattern="2:4", separate_weights=True)),
])
def test_pipeline(name, config):
    case = make(name)
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args)
    with torch.no_grad():
        assert torch.equal(vm(*case.args), case.model(*case.args))  # β = 1 is the original
    blends = [m for m in vm.modules() if isinstance(m, Blend)]
    for blend in blends:
        assert (blend.compressed.weight is blend.dense.weight) == (not config.separate_weights)
    vcon_fx.set_beta(vm, 0.0)
    with torch.no_grad():
        blended = vm(*case.args)
    small = vcon_fx.vanish(vm)
    with torch.no_grad():
        assert torch.equal(small(*case.args), blended)
    recipe = small.meta["vcon"]
    dense_ids = {id(p) for p in vm.parameters()}
    for path, plan in recipe.plans.items():
        layer = small.get_submodule(path)
        assert type(layer) in (nn.Linear, nn.Conv2d)  # plain layers: an ordinary ONNX
        assert id(layer.weight) not in dense_ids
        nonzero = int((layer.weight != 0).sum()) + (layer.bias.numel() if layer.bias is not None else 0)
        assert nonzero == plan.params_after


def _stored(model: nn.Module) -> tuple[int, int]:
    """(values in distinct storages, parameter references): counted without parameters()' de-duplication."""
    refs = [p for _, p in model.named_parameters(remove_duplicate=False)]
    storages = {p.untyped_storage().data_ptr(): p.numel() for p in refs}
    return sum(storages.values()), len(refs)


@pytest.mark.parametrize("separate", [False, True], ids=["shared", "separate"])
def test_shared_weights_are_one_storage(separate):
    case = make("mlp")
    config = PruneConfig(sparsity=0.5, separate_weights=separate)
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args)
    pruned = [m for m in vm.modules() if isinstance(m, Blend)]
    twin_values = sum(p.numel() for b in pruned for p in b.dense.parameters())
    dense_values, dense_refs = _stored(case.model)
    values, refs = _stored(vm)
    assert refs == dense_refs + sum(len(list(b.dense.parameters())) for b in pruned)  # the twin lists its weights
    # shared: the twins add no storage; separate: each twin stores its layer's weight and bias again
    assert values == dense_values + (twin_values if separate else 0)


def test_shared_weights_train_one_tensor():
    case = make("mlp")
    vm = vcon_fx.transform(case.model, PruneConfig(sparsity=0.5), example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.5)
    blend = vm.get_submodule("fc1")
    before = blend.dense.weight.detach().clone()
    params = list(vm.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    vm(*case.args).square().mean().backward()
    optimizer.step()
    assert not torch.equal(blend.dense.weight, before)
    assert blend.compressed.weight is blend.dense.weight


def test_saved_blended_model_loads_with_shared_weights(tmp_path):
    case = make("mlp")
    vm = vcon_fx.transform(case.model, PruneConfig(sparsity=0.5, fixed_mask=True), example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.3)
    vcon_fx.save(vm, tmp_path / "m.vcon")
    back = vcon_fx.load(tmp_path / "m.vcon", model=case.model)
    with torch.no_grad():
        assert torch.equal(back(*case.args), vm(*case.args))
    blend = back.get_submodule("fc1")
    assert blend.compressed.weight is blend.dense.weight
    assert torch.equal(blend.compressed.mask, vm.get_submodule("fc1").compressed.mask)
