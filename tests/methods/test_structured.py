"""Structured pruning: whole MLP neurons / conv channels leave a layer and the next one's inputs.

Checked on a transformer-like MLP block (LayerNorm → Linear → GELU → Linear, residual), a CNN
of bottleneck blocks (conv → bn → relu → conv → bn → relu → conv → bn, residual) and a small
Hugging Face BERT captured by torch.export: β = 1 is the original, vanish at β = 0 equals the
blend, the vanished layers are smaller, residual-feeding layers are left alone and reported,
and the ONNX export matches onnxruntime.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.methods import PruneConfig, config_from_dict
from vcon_fx.methods.base import method_for
from vcon_fx.methods.structured import ChannelPrunedLayer, MaskedBatchNorm, channel_mask
from vcon_fx.graph.duplicate import plan_blocks
from vcon_fx.graph.vanish import dense_nodes

from helpers import (
    assert_close_outputs,
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_vanish_parity,
    count_params,
    run,
)

SPARSITY = 0.5


# ── models ────────────────────────────────────────────────────────────────────────────────


class MLPBlock(nn.Module):
    """x + fc2(gelu(fc1(norm(x)))): a transformer MLP."""

    def __init__(self, d: int = 32, hidden: int = 128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.drop(self.fc2(self.act(self.fc1(self.norm(x)))))


class MLPNet(nn.Module):
    def __init__(self, d: int = 32, hidden: int = 128):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.Sequential(MLPBlock(d, hidden), MLPBlock(d, hidden))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.blocks(self.embed(x)))


class Bottleneck(nn.Module):
    """relu(x + bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x))))))))): two prunable pairs, conv3 feeds the sum."""

    def __init__(self, width: int = 16, inner: int = 24):
        super().__init__()
        self.conv1 = nn.Conv2d(width, inner, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inner)
        self.conv2 = nn.Conv2d(inner, inner, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(inner)
        self.conv3 = nn.Conv2d(inner, width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(x + self.bn3(self.conv3(out)))


class CNN(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layer1 = nn.Sequential(Bottleneck(width), Bottleneck(width))
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        x = self.layer1(F.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


def mlp_case():
    torch.manual_seed(0)
    return MLPNet().eval(), ((torch.randn(4, 6, 8),), {})


def cnn_case():
    torch.manual_seed(0)
    model = CNN()
    _randomize_bn(model)
    return model.eval(), ((torch.randn(2, 3, 12, 12),), {})


def transformed(model, inputs, blocks, seq_inputs=(), **config):
    args, kwargs = inputs
    return vcon_fx.transform(model, PruneConfig(sparsity=SPARSITY, structured=True, **config), example_inputs=args,
                             example_kwargs=kwargs, granularity="block", blocks=blocks, seq_inputs=seq_inputs)


@pytest.fixture(scope="module")
def mlp():
    model, inputs = mlp_case()
    return model, inputs, transformed(model, inputs, ("blocks.*",))


@pytest.fixture(scope="module")
def cnn():
    model, inputs = cnn_case()
    return model, inputs, transformed(model, inputs, ("layer1.*",))


# ── config and selection ──────────────────────────────────────────────────────────────────


def test_config_round_trips_and_refuses_a_pattern():
    config = PruneConfig(sparsity=0.3, structured=True, fixed_mask=True)
    assert config_from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="--sparsity"):
        PruneConfig(pattern="2:4", structured=True)


def test_layer_granularity_is_refused_with_the_fix():
    model, (args, _) = mlp_case()
    with pytest.raises(ConfigError, match="--granularity block with --blocks"):
        vcon_fx.transform(model, PruneConfig(sparsity=SPARSITY, structured=True), example_inputs=args)


# ── the MLP block ─────────────────────────────────────────────────────────────────────────


def test_mlp_pairs_fc1_with_fc2_and_reports_the_residual_layer(mlp):
    _model, _inputs, vm = mlp
    plans = vm.meta["vcon"].plans
    for i in range(2):
        fc1, fc2 = plans[f"blocks.{i}.fc1"], plans[f"blocks.{i}.fc2"]
        assert fc1.detail["feeds"] == f"blocks.{i}.fc2" and fc1.detail["keep"] == 64
        assert fc1.detail["channels kept"].startswith("64/128")
        assert fc2.detail["fed_by"] == f"blocks.{i}.fc1" and fc2.detail["keep_in"] == 64
        # fc2's outputs reach the residual sum: they stay, and the plan says why
        assert "keep" not in fc2.detail and "residual sum" in fc2.detail["outputs"]
        assert fc1.flops_after * 2 == fc1.flops_before and fc2.flops_after * 2 == fc2.flops_before


def test_mlp_identity_at_beta_one(mlp):
    model, inputs, vm = mlp
    assert_identity_at_beta_one(model, vm, inputs)


def test_mlp_vanish_is_smaller_and_equal_to_the_blend(mlp):
    model, inputs, vm = mlp
    small = assert_vanish_parity(copy.deepcopy(vm), inputs)
    for i in range(2):
        fc1 = small.get_submodule(f"blocks.{i}").get_submodule("fc1")
        fc2 = small.get_submodule(f"blocks.{i}").get_submodule("fc2")
        assert type(fc1) is nn.Linear and type(fc2) is nn.Linear
        assert (fc1.out_features, fc1.in_features) == (64, 32)  # hidden (1 − s)·H
        assert (fc2.out_features, fc2.in_features) == (32, 64)
    assert_params_promised(small, model)
    # 50% of the MLP neurons: about half the MLP parameters go (biases of fc2 stay)
    mlp_before = sum(count_params(b.fc1) + count_params(b.fc2) for b in model.blocks)
    removed = count_params(model) - count_params(small)
    assert removed / mlp_before == pytest.approx(0.5, abs=0.02)


def test_mlp_onnx_matches_and_is_smaller(mlp, tmp_path):
    model, inputs, vm = mlp
    small = vcon_fx.vanish(_at_zero(vm))
    path = assert_onnx_parity(small, inputs, tmp_path)
    onnx = pytest.importorskip("onnx")
    stored = sum(int(torch.tensor(t.dims).prod()) for t in onnx.load(str(path)).graph.initializer)
    assert stored <= count_params(small) < 0.6 * count_params(model)


# ── the CNN ───────────────────────────────────────────────────────────────────────────────


def test_cnn_pairs_through_batch_norms(cnn):
    _model, _inputs, vm = cnn
    plans = vm.meta["vcon"].plans
    for i in range(2):
        p = f"layer1.{i}"
        assert plans[f"{p}.conv1"].detail["feeds"] == f"{p}.conv2"
        assert plans[f"{p}.conv1"].detail["norms"] == [f"{p}.bn1"]
        assert plans[f"{p}.conv2"].detail["feeds"] == f"{p}.conv3"  # conv2 is consumer and producer
        assert plans[f"{p}.conv2"].detail["fed_by"] == f"{p}.conv1"
        assert plans[f"{p}.conv3"].detail["fed_by"] == f"{p}.conv2"
        assert "residual sum" in plans[f"{p}.conv3"].detail["outputs"]
    blend = vm.get_submodule("layer1.0")
    assert isinstance(blend.compressed.get_submodule("bn1"), MaskedBatchNorm)
    assert isinstance(blend.compressed.get_submodule("conv2"), ChannelPrunedLayer)
    # latent weights are shared with the dense branch; batch-norm state is not
    assert blend.compressed.get_submodule("conv1").weight is blend.dense.get_submodule("conv1").weight
    assert blend.compressed.get_submodule("bn1").running_mean is not blend.dense.get_submodule("bn1").running_mean


def test_cnn_identity_vanish_and_onnx(cnn, tmp_path):
    model, inputs, vm = cnn
    assert_identity_at_beta_one(model, vm, inputs)
    small = assert_vanish_parity(copy.deepcopy(vm), inputs)
    block = small.get_submodule("layer1.0")
    conv1, bn1, conv2, bn2, conv3 = (block.get_submodule(n) for n in ("conv1", "bn1", "conv2", "bn2", "conv3"))
    assert (conv1.out_channels, bn1.num_features, conv2.in_channels) == (12, 12, 12)
    assert (conv2.out_channels, bn2.num_features, conv3.in_channels) == (12, 12, 12)
    assert conv3.out_channels == 16  # feeds the residual sum: kept whole
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in (conv1, bn1, conv2, bn2, conv3))
    assert_params_promised(small, model)
    assert_onnx_parity(small, inputs, tmp_path)


def test_pruned_channels_are_exactly_zero_into_the_consumer_in_training(cnn):
    """Training-mode batch norm (batch statistics) must still send a pruned channel as exact 0."""
    _model, (args, _), vm = cnn
    vm = copy.deepcopy(vm).train()
    vcon_fx.set_beta(vm, 0.0)
    comp = vm.get_submodule("layer1.0").compressed
    seen = {}
    hook = comp.get_submodule("conv2").register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    vm(*args)
    hook.remove()
    mask = comp.get_submodule("conv1").keep_mask()
    assert int(mask.sum()) == 12
    assert torch.count_nonzero(seen["x"][:, ~mask]) == 0
    assert torch.count_nonzero(seen["x"][:, mask]) > 0


# ── the transition: masks from the current latent weights, STE ────────────────────────────


def test_mask_keeps_the_strongest_rows_and_follows_the_latent_weights(mlp):
    _model, (args, _), vm = mlp
    vm = copy.deepcopy(vm)
    twin = vm.get_submodule("blocks.0").compressed.get_submodule("fc1")
    norms = twin.weight.detach().norm(dim=1)
    mask = twin.keep_mask()
    assert int(mask.sum()) == 64 and norms[mask].min() >= norms[~mask].max()
    # the gradient reaches every latent row (STE), pruned ones included
    vcon_fx.set_beta(vm, 0.5)
    vm(*args).square().sum().backward()
    assert (twin.weight.grad.abs().sum(dim=1) > 0).all()
    # a pruned row that grows strong comes back (dynamic mask)
    weakest = int(torch.nonzero(~mask)[0])
    with torch.no_grad():
        twin.weight[weakest] *= 100
    assert twin.keep_mask()[weakest]


def test_fixed_mask_stays(mlp):
    model, inputs, _vm = mlp
    vm = transformed(model, inputs, ("blocks.*",), fixed_mask=True)
    twin = vm.get_submodule("blocks.0").compressed.get_submodule("fc1")
    before = twin.keep_mask().clone()
    weakest = int(torch.nonzero(~before)[0])
    with torch.no_grad():
        twin.weight[weakest] *= 100
    assert torch.equal(twin.keep_mask(), before)
    small = assert_vanish_parity(vm, inputs)
    assert small.get_submodule("blocks.0").get_submodule("fc1").out_features == 64


def test_channel_mask_count_is_exact_with_ties():
    assert int(channel_mask(torch.ones(10, 4), 3).sum()) == 3


# ── what cannot be pruned is left alone and said ──────────────────────────────────────────


class Gated(nn.Module):
    """fc4(h · σ(h)), h = fc3(x): h is read twice."""

    def __init__(self):
        super().__init__()
        self.fc3, self.fc4 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        h = self.fc3(x)
        return self.fc4(h * torch.sigmoid(h))


class Unprunable(nn.Module):
    """fc1 → LayerNorm → fc2 (a norm across channels between them), then a gated MLP."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 16)
        self.fc1, self.ln, self.fc2 = nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 16)
        self.gated = Gated()
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.gated(self.fc2(self.ln(self.fc1(self.stem(x))))))


def test_unprunable_layers_are_skipped_with_reasons():
    torch.manual_seed(0)
    model, x = Unprunable().eval(), torch.randn(3, 8)
    options = dict(example_inputs=(x,), granularity="block", blocks=("fc1+ln+fc2", "gated"))
    the_plan = vcon_fx.plan(model, PruneConfig(sparsity=SPARSITY, structured=True), **options)
    plans = the_plan.plans
    assert "normalization across channels" in plans["fc1"].skip_reason
    assert "read by 2 ops" in plans["gated.fc3"].skip_reason
    assert all("block's output" in plans[p].skip_reason for p in ("fc2", "gated.fc4"))
    assert the_plan.groups == []
    # nothing could be pruned: transform refuses instead of writing a model that is not smaller
    with pytest.raises(ConfigError, match="every matched layer dense"):
        vcon_fx.transform(model, PruneConfig(sparsity=SPARSITY, structured=True), **options)


# ── plans are deterministic: inspect = transform = load ───────────────────────────────────


def test_inspect_plans_match_the_recipe(cnn):
    model, (args, _), vm = cnn
    config = PruneConfig(sparsity=SPARSITY, structured=True)
    the_plan = vcon_fx.plan(model, config, example_inputs=args, granularity="block", blocks=("layer1.*",))
    plan_blocks(the_plan.extra["gm"], the_plan.groups, method_for(config), the_plan.plans, the_plan.extra["sites"])
    recipe = vm.meta["vcon"]
    assert {p: pl.to_dict() for p, pl in the_plan.plans.items()} == {p: pl.to_dict() for p, pl in recipe.plans.items()}
    assert the_plan.params_after == count_params(vcon_fx.vanish(_at_zero(vm)))


@pytest.mark.parametrize("fixed_mask", [False, True], ids=["dynamic", "fixed"])
def test_save_load_round_trip(fixed_mask, tmp_path):
    model, inputs = cnn_case()
    vm = transformed(model, inputs, ("layer1.*",), fixed_mask=fixed_mask)
    with torch.no_grad():  # trained-looking weights: a load that re-chose masks from the source would differ
        for p in vm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    vcon_fx.set_beta(vm, 0.3)
    back = vcon_fx.load(vcon_fx.save(vm, tmp_path / "blended"), model=model)
    assert_close_outputs(run(vm, inputs), run(back, inputs), 1e-6, "loaded blended vs saved")
    small = vcon_fx.vanish(_at_zero(vm))
    back_small = vcon_fx.load(vcon_fx.save(small, tmp_path / "vanished"), model=model)
    assert_close_outputs(run(small, inputs), run(back_small, inputs), 1e-6, "loaded vanished vs saved")
    assert count_params(back_small) == count_params(small)


# ── Hugging Face BERT through torch.export ────────────────────────────────────────────────


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=100, attn_implementation="eager")
    model = transformers.BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    inputs = ((), kwargs)
    vm = transformed(model, inputs, ("encoder.layer.*.intermediate+output",))
    return model, inputs, vm, assert_vanish_parity(copy.deepcopy(vm), inputs)


def test_bert_mlp_blocks(bert):
    """The exported graph reads intermediate.dense → aten.gelu → output.dense: the pair is found."""
    model, inputs, vm, small = bert
    recipe = vm.meta["vcon"]
    assert recipe.capture == "export"
    for i in range(2):
        inter, out = recipe.plans[f"encoder.layer.{i}.intermediate.dense"], recipe.plans[f"encoder.layer.{i}.output.dense"]
        assert inter.detail["feeds"] == f"encoder.layer.{i}.output.dense" and inter.detail["keep"] == 32
        assert "residual sum" in out.detail["outputs"]  # dropout → add(attention output) → LayerNorm
    assert_identity_at_beta_one(model, vm, inputs)
    block = small.get_submodule("encoder.layer.0.intermediate__output")
    assert block.get_submodule("intermediate.dense").out_features == 32
    assert block.get_submodule("output.dense").in_features == 32
    assert_params_promised(small, model)


@pytest.mark.slow
def test_bert_onnx_matches(bert, tmp_path):
    _model, inputs, _vm, small = bert
    assert_onnx_parity(small, inputs, tmp_path)  # dynamic batch; the sequence length stays as captured


# ── helpers ───────────────────────────────────────────────────────────────────────────────


def assert_params_promised(small, model) -> None:
    """Structured pruning promises stored parameters (its vanished layers are smaller), not non-zeros."""
    plans = [p for p in small.meta["vcon"].plans.values() if not p.skipped]
    saved = sum(p.params_before - p.params_after for p in plans)
    assert count_params(small) == count_params(model) - saved
    assert dense_nodes(small) == [] and vcon_fx.get_betas(small) == {}
    assert not any(isinstance(m, (ChannelPrunedLayer, MaskedBatchNorm)) for m in small.modules())


def _at_zero(vm):
    vm = copy.deepcopy(vm)
    vcon_fx.set_beta(vm, 0.0)
    return vm
