"""Quantization: bit widths, binary/ternary, STE, shared latent weights, int8 storage, pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods import QuantConfig, config_from_dict
from vcon_fx.methods.base import LayerSite, method_for
from vcon_fx.methods.quant import QuantizedLayer, QuantTwin, quantize_weight
from vcon_fx.graph.blend import Blend

from zoo import make

BITS = (8, 4, 2, 1, "ternary")


def twin_of(layer: nn.Module, config: QuantConfig) -> QuantTwin:
    method = method_for(config)
    site = LayerSite("layer", layer)
    return method.build(site, method.plan(site))


# ── config ────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("bits", [3, 16, 0, "binary", True, 8.5, None])
def test_unsupported_bits_name_the_supported_ones(bits):
    with pytest.raises(ConfigError, match="8, 4, 2, 1, ternary"):
        QuantConfig(bits=bits)


@pytest.mark.parametrize("act_bits", [4, 16, True])
def test_unsupported_act_bits(act_bits):
    with pytest.raises(ConfigError, match="act-bits"):
        QuantConfig(act_bits=act_bits)


def test_bits_from_a_command_line_string():
    assert QuantConfig(bits="4").bits == 4
    assert QuantConfig(bits="Ternary").bits == "ternary"


@pytest.mark.parametrize("config", [QuantConfig(), QuantConfig(bits="ternary", act_bits=8, separate_weights=True)])
def test_config_round_trips_through_json(config):
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ── the grids ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_int_b_weights_fit_in_b_bits(bits):
    w = torch.randn(12, 40)
    q, scale = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert torch.equal(q, q.round()) and q.abs().max() == qmax
    assert torch.allclose(scale, w.abs().amax(1) / qmax)
    assert ((q * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()  # round to nearest


def test_binary_weights_take_two_values_per_channel():
    w = torch.randn(6, 32)
    q, scale = quantize_weight(w, 1)
    wq = q * scale[:, None]
    for c in range(6):
        values = set(wq[c].tolist())
        assert values == {scale[c].item(), -scale[c].item()}
    assert torch.allclose(scale, w.abs().mean(1))
    assert torch.equal(q, torch.where(w >= 0, 1.0, -1.0))


def test_ternary_weights_follow_twn():
    w = torch.randn(6, 64)
    q, scale = quantize_weight(w, "ternary")
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    assert torch.equal(q, torch.sign(w) * (w.abs() > delta))
    above = w.abs() > delta
    assert torch.allclose(scale, (w.abs() * above).sum(1) / above.sum(1))


def test_zero_channel_quantizes_to_zero():
    w = torch.randn(3, 8)
    w[1] = 0
    for bits in BITS:
        q, scale = quantize_weight(w, bits)
        assert (q[1] == 0).all() and scale[1] == 1 and torch.isfinite(scale).all()


# ── training: STE and shared latent weights ───────────────────────────────────────────────


@pytest.mark.parametrize("bits", BITS)
def test_ste_gradient_reaches_the_latent_weight(bits):
    layer = nn.Linear(16, 8)
    twin = twin_of(layer, QuantConfig(bits=bits))
    x = torch.randn(5, 16)
    twin(x).sum().backward()
    # identity STE: d(sum(x·Wqᵀ))/dW = 1ᵀx for every weight, quantized to zero or not
    assert torch.allclose(layer.weight.grad, x.sum(0).expand(8, 16))


def test_latent_weights_are_shared_by_default_and_copied_on_request():
    layer = nn.Conv2d(4, 8, 3)
    shared = twin_of(layer, QuantConfig(bits=4))
    assert shared.weight is layer.weight and shared.bias is layer.bias
    separate = twin_of(layer, QuantConfig(bits=4, separate_weights=True))
    assert separate.weight is not layer.weight and separate.weight.data_ptr() != layer.weight.data_ptr()
    assert torch.equal(separate.weight, layer.weight)


def test_activation_range_is_an_ema_observed_in_training():
    twin = twin_of(nn.Linear(4, 3), QuantConfig(act_bits=8))
    x = torch.randn(2, 4)
    twin.eval()
    assert torch.equal(twin(x), twin.call(x, twin.compressed_weight()))  # nothing observed: inputs pass
    twin.train()
    twin(torch.tensor([[-1.0, 0.0, 2.0, 1.0]]))
    assert twin.act_range.tolist() == [-1.0, 2.0]
    twin(torch.tensor([[-3.0, 0.0, 4.0, 1.0]]))
    assert torch.allclose(twin.act_range, torch.tensor([-1.2, 2.2]))
    twin.eval()
    xq = twin._quantize_input(x)
    step = (2.2 + 1.2) / 255
    assert (xq - x.clamp(-1.2, 2.2)).abs().max() <= step / 2 + 1e-6


# ── the materialized layer ────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("layer", [nn.Linear(16, 8), nn.Conv2d(4, 6, 3, padding=1), nn.Conv1d(4, 6, 3, stride=2)],
                         ids=["linear", "conv2d", "conv1d"])
@pytest.mark.parametrize("bits", BITS)
def test_materialized_int8_layer_equals_the_fake_quant_twin(layer, bits):
    config = QuantConfig(bits=bits, act_bits=8)
    twin = twin_of(layer, config)
    x = torch.randn(3, 16) if isinstance(layer, nn.Linear) else torch.randn(3, 4, 9, 9)[..., 0] if isinstance(layer, nn.Conv1d) else torch.randn(3, 4, 9, 9)
    twin.train()
    twin(x)  # observe an activation range
    twin.eval()
    small = method_for(config).materialize(twin)
    assert isinstance(small, QuantizedLayer)
    assert small.qweight.dtype == torch.int8 and small.qweight.shape == layer.weight.shape
    assert small.qweight.abs().max() <= config.qmax
    with torch.no_grad():
        assert torch.equal(small(x), twin(x))
    assert small.bias is not layer.bias  # a fresh Parameter: nothing shared with the dense layer
    assert "qweight" in dict(small.named_buffers())


def test_plan_promises_int_storage():
    plan = method_for(QuantConfig(bits=8)).plan(LayerSite("fc", nn.Linear(64, 32)))
    assert plan.params_after == plan.params_before
    assert plan.bytes_after == 64 * 32 + 32 * 4 + 32 * 4  # int8 weights, float scales, float bias
    plan4 = method_for(QuantConfig(bits=4)).plan(LayerSite("fc", nn.Linear(64, 32)))
    assert plan4.bytes_after == 64 * 32 // 2 + 32 * 4 + 32 * 4


# ── the pipeline ──────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("name,config", [
    ("mlp", QuantConfig(bits=8)),
    ("mlp", QuantConfig(bits=1, act_bits=8)),
    ("conv_bn_relu", QuantConfig(bits=4)),
    ("conv_bn_relu", QuantConfig(bits="ternary", separate_weights=True)),
])
def test_pipeline(name, config):
    case = make(name)
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args)
    with torch.no_grad():
        assert torch.equal(vm(*case.args), case.model(*case.args))  # β = 1 is the original
    for blend in (m for m in vm.modules() if isinstance(m, Blend)):
        assert (blend.compressed.weight is blend.dense.weight) == (not config.separate_weights)
    vcon_fx.set_beta(vm, 0.0)
    if config.act_bits:
        for m in vm.modules():
            if isinstance(m, QuantTwin):
                m.train()
        vm(*case.args)
        vm.eval()
    with torch.no_grad():
        blended = vm(*case.args)
    small = vcon_fx.vanish(vm)
    with torch.no_grad():
        assert torch.equal(small(*case.args), blended)
    for path in small.meta["vcon"].plans:
        assert isinstance(small.get_submodule(path), QuantizedLayer)


def test_vanished_artifact_stores_int8_and_loads_back(tmp_path):
    case = make("mlp")
    vm = vcon_fx.transform(case.model, QuantConfig(bits=8, act_bits=8), example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.0)
    vm.train()
    vm(*case.args)
    vm.eval()
    blended_dir = vcon_fx.save(vm, tmp_path / "blended")
    small = vcon_fx.vanish(vm)
    small_dir = vcon_fx.save(small, tmp_path / "small")
    tensors = load_file(str(small_dir / "model.safetensors"))
    assert tensors["fc1.qweight"].dtype == torch.int8
    assert "fc1.weight" not in tensors
    # the three 64×64 hidden layers shrink from 4 bytes to 1 byte a weight
    saved = 3 * 64 * 64 * 3
    big, little = (blended_dir / "model.safetensors").stat().st_size, (small_dir / "model.safetensors").stat().st_size
    assert big - little >= saved * 0.95
    back = vcon_fx.load(small_dir, model=case.model)
    with torch.no_grad():
        assert torch.equal(back(*case.args), small(*case.args))
    assert back.get_submodule("fc1")._act is not None  # the activation range came back too


def test_twins_follow_the_dense_layer_mode():
    layer = nn.Linear(4, 3).eval()
    assert not twin_of(layer, QuantConfig(act_bits=8)).training
    assert twin_of(layer.train(), QuantConfig(act_bits=8)).training


def test_vanish_without_observed_ranges_warns_and_keeps_float_inputs(caplog):
    case = make("mlp")
    vm = vcon_fx.transform(case.model, QuantConfig(act_bits=8), example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.0)
    with caplog.at_level("WARNING"):
        small = vcon_fx.vanish(vm)
    assert "no activation range was observed" in caplog.text
    assert small.get_submodule("fc1")._act is None
    with torch.no_grad():
        assert torch.equal(small(*case.args), vm(*case.args))
