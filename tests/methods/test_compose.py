"""Composition lowrank+quant: config nesting, twin structure, plan, pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods import ComposeConfig, LowRankConfig, PruneConfig, QuantConfig, config_from_dict
from vcon_fx.methods.base import LayerSite, method_for
from vcon_fx.methods.compose import compose_config
from vcon_fx.methods.lowrank import LowRank
from vcon_fx.methods.quant import QuantizedLayer, QuantTwin
from vcon_fx.graph.blend import Blend

from zoo import make

LR_Q = ComposeConfig((LowRankConfig(rank=4), QuantConfig(bits=8)))


@pytest.mark.parametrize("configs", [(), (LowRankConfig(rank=4),), (LowRankConfig(rank=4),) * 3, ("lowrank", "quant"),
                                     (LR_Q, QuantConfig())])
def test_invalid_compositions_are_refused(configs):
    with pytest.raises(ConfigError):
        ComposeConfig(configs)


def test_config_nests_through_json():
    data = json.loads(json.dumps(LR_Q.to_dict()))
    assert data["configs"][0]["method"] == "lowrank" and data["configs"][1]["method"] == "quant"
    back = config_from_dict(data)
    assert back == LR_Q and isinstance(back.configs, tuple)
    assert back.name == "lowrank+quant"


def test_cli_spelling_maps_to_configs():
    assert compose_config("lowrank", {"rank": 8, "bits": None}) == LowRankConfig(rank=8)
    config = compose_config("lowrank+quant", {"rank": 8, "bits": "4", "act_bits": 8})
    assert config == ComposeConfig((LowRankConfig(rank=8), QuantConfig(bits=4, act_bits=8)))
    with pytest.raises(ConfigError, match="unknown method"):
        compose_config("lowrank+zip", {"rank": 8})
    with pytest.raises(ConfigError, match="do not apply"):
        compose_config("lowrank+quant", {"rank": 8, "sparsity": 0.5})


def test_twin_quantizes_both_factors_sharing_their_weights():
    layer = nn.Linear(32, 24)
    method = method_for(LR_Q)
    site = LayerSite("fc", layer, out_shape=(2, 24))
    plan = method.plan(site)
    twin = method.build(site, plan)
    assert isinstance(twin, LowRank)
    assert isinstance(twin.down, QuantTwin) and isinstance(twin.up, QuantTwin)
    assert set(dict(twin.named_parameters())) == {"down.weight", "up.weight", "up.bias"}  # one copy each
    assert plan.params_after == 4 * (32 + 24) + 24
    assert plan.bytes_after == 4 * 32 + 4 * 4 + 24 * 4 + 24 * 4 + 24 * 4  # int8 factors + scales + bias
    assert plan.detail["rank"] == 4 and plan.detail["bits"] == 8
    json.dumps(plan.to_dict())  # the recipe stores it


def test_second_method_needs_layers_inside_the_first_twin():
    case = make("mlp")
    with pytest.raises(ConfigError, match="holds no Linear/Conv"):
        vcon_fx.transform(case.model, ComposeConfig((QuantConfig(), PruneConfig(sparsity=0.5))), example_inputs=case.args)


@pytest.mark.parametrize("name", ["mlp", "conv_bn_relu"])
def test_pipeline(name):
    case = make(name)
    vm = vcon_fx.transform(case.model, ComposeConfig((LowRankConfig(rank=4), QuantConfig(bits=4))), example_inputs=case.args)
    with torch.no_grad():
        assert torch.equal(vm(*case.args), case.model(*case.args))
    vcon_fx.set_beta(vm, 0.0)
    with torch.no_grad():
        blended = vm(*case.args)
    small = vcon_fx.vanish(vm)
    with torch.no_grad():
        assert torch.equal(small(*case.args), blended)
    assert not any(isinstance(m, (Blend, QuantTwin)) for m in small.modules())
    for path in small.meta["vcon"].plans:
        factors = small.get_submodule(path)
        assert isinstance(factors, LowRank)
        assert isinstance(factors.down, QuantizedLayer) and isinstance(factors.up, QuantizedLayer)
        assert factors.down.qweight.abs().max() <= 7


def test_block_granularity():
    case = make("residual")
    vm = vcon_fx.transform(case.model, LR_Q, example_inputs=case.args, granularity="block", blocks=("layer1.*",))
    vcon_fx.set_beta(vm, 0.0)
    with torch.no_grad():
        blended = vm(*case.args)
        assert torch.equal(vcon_fx.vanish(vm)(*case.args), blended)


def test_artifacts_load_back_blended_and_vanished(tmp_path):
    case = make("conv_bn_relu")
    config = ComposeConfig((LowRankConfig(rank=4), QuantConfig(bits=4, act_bits=8)))
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args)
    assert not any(m.training for m in vm.modules() if isinstance(m, QuantTwin))  # an eval model gets eval twins
    vcon_fx.set_beta(vm, 0.0)
    vm.train()
    vm(*case.args)  # observe activation ranges
    vm.eval()
    back = vcon_fx.load(vcon_fx.save(vm, tmp_path / "blended"), model=case.model)
    small = vcon_fx.vanish(vm)
    small_back = vcon_fx.load(vcon_fx.save(small, tmp_path / "small"), model=case.model)
    with torch.no_grad():
        assert torch.equal(back(*case.args), vm(*case.args))
        assert torch.equal(small_back(*case.args), small(*case.args))
