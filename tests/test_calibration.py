"""Calibration data through the pipeline: the statistics pass, `transform(calibration=…)`, and the CLI flags.

The statistics are checked against sums written out by hand; the pipeline with the default flags a
user passes (only the data), through the invariants every twin keeps (β = 1 exact, vanish parity,
ONNX parity in onnxruntime, save / load); the CLI in-process on a small CNN saved as `.pt2` and a
real `.npz` calibration file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import vcon_fx
from helpers import cli_output, assert_identity_at_beta_one, assert_onnx_parity, assert_vanish_parity
from vcon_fx.errors import ConfigError, DataError
from vcon_fx.graph.statistics import _patches, calibration_batches, gather_statistics, statistics_bytes
from vcon_fx.io.artifact import read_recipe
from vcon_fx.methods.prune import PrunedLayer
from vcon_fx.methods.quant import QuantTwin


class Body(nn.Module):
    """conv → grouped conv: a block."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)

    def forward(self, x):
        return torch.relu(self.grouped(torch.relu(self.conv(x))))


class Net(nn.Module):
    """stem conv → body (conv → grouped conv) → pool → fc (called twice) → head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = Body()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = self.body(torch.relu(self.stem(x)))
        return self.head(self.fc(torch.relu(self.fc(x.mean(dim=(2, 3))))))


def images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=gen) * torch.tensor([3.0, 1.0, 0.1])[None, :, None, None]


# ── the statistics ─────────────────────────────────────────────────────────────────────────


def test_statistics_are_the_sums_over_every_row_and_call():
    net = Net().eval()
    gm = vcon_fx.plan(net, vcon_fx.LowRankConfig(rank=2), example_inputs=(images(2, 0),)).extra["gm"]
    x = images(5, 1)
    paths = ["body.conv", "body.grouped", "fc"]
    stats = gather_statistics(gm, paths, calibration_batches(x, batch_size=2), gram=True)
    seen = {}
    hooks = [net.get_submodule(p).register_forward_pre_hook(lambda m, a, p=p: seen.setdefault(p, []).append(a[0]))
             for p in paths]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    fc_rows = torch.cat(seen["fc"]).double()  # both calls of fc pooled
    assert stats["fc"].rows == 10 and torch.allclose(stats["fc"].gram, fc_rows.T @ fc_rows)
    conv_rows = _patches(net.body.conv, seen["body.conv"][0]).double()
    conv = stats["body.conv"]
    assert conv.rows == 5 * 64 and torch.allclose(conv.gram, conv_rows.T @ conv_rows)
    assert torch.allclose(conv.column_squares, conv_rows.pow(2).sum(0))
    grouped = stats["body.grouped"]
    channels = seen["body.grouped"][0].double().transpose(0, 1).reshape(8, -1).pow(2).sum(1)
    assert torch.allclose(grouped.channel_squares, channels)
    assert grouped.gram is None and grouped.column_squares.numel() == 0  # grouped: channel sums only
    assert torch.allclose(grouped.rms(), (channels / (5 * 64)).sqrt())
    layers = [net.get_submodule(p) for p in paths]
    assert statistics_bytes(layers, gram=True) == 8 * (8 + 72 + 72 ** 2 + 8 + 8 + 8 + 8 ** 2)


class Attention(nn.Module):
    """Q, K and V read the same tensor; `out` reads another of the same shape."""

    def __init__(self):
        super().__init__()
        self.inner, self.q, self.k, self.v, self.out = (nn.Linear(6, 6) for _ in range(5))

    def forward(self, x):
        x = self.inner(x)
        return self.out(self.q(x) * self.k(x) + self.v(x))


def test_layers_reading_the_same_tensor_share_its_sums_and_others_do_not():
    net = Attention().eval()
    gm = vcon_fx.plan(net, vcon_fx.QuantConfig(bits=4), example_inputs=(torch.randn(2, 6),)).extra["gm"]
    x = torch.randn(32, 6)
    stats = gather_statistics(gm, ["q", "k", "v", "out"], calibration_batches(x, batch_size=8), gram=True)
    with torch.no_grad():
        hidden = net.inner(x).double()
        mixed = (net.q(net.inner(x)) * net.k(net.inner(x)) + net.v(net.inner(x))).double()
    for path in ("q", "k", "v"):
        assert torch.allclose(stats[path].gram, hidden.T @ hidden) and stats[path].rows == 32
    assert torch.allclose(stats["out"].gram, mixed.T @ mixed)


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(3, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1)), (2, 3, 9, 7)),
    (nn.Conv2d(3, 4, 4, padding="same"), (2, 3, 8, 8)),
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 8, 8)),
    (nn.Conv1d(3, 4, 5, stride=2, padding=2), (2, 3, 17)),
    (nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular"), (2, 3, 17)),
], ids=["strided-dilated", "same-even", "reflect", "conv1d", "conv1d-same-circular"])
def test_patches_are_the_rows_a_convolution_multiplies(conv, shape):
    x = torch.randn(shape)
    with torch.no_grad():
        got = _patches(conv, x) @ conv.weight.reshape(4, -1).T + conv.bias
        want = conv(x).movedim(1, -1).reshape(-1, 4)
    assert torch.allclose(got, want, atol=1e-5)


def test_calibration_batches_take_datasets_tensors_and_iterables_up_to_the_sample_count():
    x, y = torch.randn(10, 3), torch.arange(10)
    as_dataset = list(calibration_batches(TensorDataset(x, y), samples=7, batch_size=4))
    assert [a[0].shape[0] for a, _ in as_dataset] == [4, 3] and torch.equal(as_dataset[1][0][0], x[4:7])
    assert [a[0].shape[0] for a, _ in calibration_batches(x, samples=128, batch_size=4)] == [4, 4, 2]
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]  # a DataLoader's (inputs, labels) batches: labels dropped
    assert [(len(a), a[0].shape[0]) for a, _ in calibration_batches(loader, samples=8)] == [(1, 6), (1, 2)]
    kwargs = list(calibration_batches([{"input_ids": x, "labels": y}], samples=3))
    assert list(kwargs[0][1]) == ["input_ids"] and kwargs[0][1]["input_ids"].shape[0] == 3
    padded = list(calibration_batches(TensorDataset(x), samples=3, batch_size=4, pad=True))
    assert padded[0][0][0].shape[0] == 4  # a model with a fixed batch gets full batches
    with pytest.raises(DataError):
        list(calibration_batches([], samples=4))


# ── transform(calibration=…) ───────────────────────────────────────────────────────────────


DEFAULTS = {  # what each starts as with calibration data and default flags
    "whitened-lowrank": vcon_fx.LowRankConfig(rank=2), "wanda": vcon_fx.PruneConfig(sparsity=0.5),
    "wanda-2:4": vcon_fx.PruneConfig(pattern="2:4"), "sparsegpt": vcon_fx.PruneConfig(sparsity=0.5, sparsegpt=True),
    "gptq-4bit": vcon_fx.QuantConfig(bits=4), "clip-search-8bit": vcon_fx.QuantConfig(bits=8, clip_search=True),
    "whitened-lowrank+gptq": vcon_fx.ComposeConfig((vcon_fx.LowRankConfig(rank=2), vcon_fx.QuantConfig(bits=4))),
}


@pytest.mark.parametrize("config", DEFAULTS.values(), ids=DEFAULTS)
@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_data_aware_transform_keeps_every_invariant(config, granularity, tmp_path):
    """β = 1 exact, vanish parity, save / load; ONNX parity is the CLI test's (below)."""
    net = Net().eval()
    inputs = ((images(2, 0),), {})
    select = {"granularity": "block", "blocks": ("body",)} if granularity == "block" else {}
    vm = vcon_fx.transform(net, config, example_inputs=inputs[0], calibration=TensorDataset(images(40, 1)), **select)
    recipe = vm.meta["vcon"]
    parts = getattr(recipe.config, "configs", (recipe.config,))
    assert {c.init for c in parts} == {"data-aware"} and any(n.startswith("calibration: 40 sample(s)") for n in recipe.notes)
    assert_identity_at_beta_one(net, vm, inputs)
    assert_vanish_parity(vm, inputs)
    vcon_fx.save(vm, tmp_path / "m.vcon")
    loaded = vcon_fx.load(tmp_path / "m.vcon", model=net)
    vcon_fx.set_beta(vm, 0.0)
    vcon_fx.set_beta(loaded, 0.0)
    with torch.no_grad():
        assert torch.equal(vm(*inputs[0]), loaded(*inputs[0]))


def test_the_statistics_reach_every_twin_and_change_its_start():
    net = Net().eval()
    plain = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=4), example_inputs=(images(2, 0),),
                              granularity="block", blocks=("body",))
    data = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=4), example_inputs=(images(2, 0),),
                             granularity="block", blocks=("body",), calibration=images(32, 1))
    twin = data.get_submodule("body.compressed.conv")  # inside a block group
    assert isinstance(twin, QuantTwin) and twin.fixed_scale
    assert not torch.equal(twin.weight, plain.get_submodule("body.compressed.conv").weight)  # GPTQ moved it
    grouped_plan = data.meta["vcon"].plans["body.grouped"]  # a grouped conv has no XᵀX: rounded to nearest, and said
    assert "no input statistics" in grouped_plan.detail["init"]
    wanda = vcon_fx.transform(net, vcon_fx.PruneConfig(sparsity=0.5), example_inputs=(images(2, 0),),
                              calibration=images(32, 1))
    fc = wanda.get_submodule("fc.compressed")
    assert isinstance(fc, PrunedLayer) and fc.wanda and fc.weight is wanda.get_submodule("fc.dense").weight
    assert not torch.equal(fc.feature_norm, torch.ones_like(fc.feature_norm))


def test_sparsegpt_mask_is_what_the_twin_reselects_so_training_starts_from_it():
    net = Net().eval()
    for config in (vcon_fx.PruneConfig(sparsity=0.6, sparsegpt=True), vcon_fx.PruneConfig(pattern="2:4", sparsegpt=True)):
        vm = vcon_fx.transform(net, config, example_inputs=(images(2, 0),), calibration=images(32, 1))
        twin = vm.get_submodule("body.conv.compressed")
        zeros = twin.weight == 0
        assert torch.equal(twin.choose_mask(), ~zeros)
        assert int(zeros.sum()) == vm.meta["vcon"].plans["body.conv"].detail["zeros"]


def test_too_few_samples_shift_the_gram_matrix_and_say_so():
    net = nn.Sequential(nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=4), example_inputs=(torch.randn(2, 4),),
                           calibration=torch.randn(16, 4))  # 16 rows for 64 inputs: XᵀX is singular
    notes = [n for n in vm.meta["vcon"].notes if "not positive-definite" in n]
    assert notes and notes[0].startswith("layer 2:")
    assert_identity_at_beta_one(net, vm, ((torch.randn(3, 4),), {}))


class FixedBatch(nn.Module):
    """A graph that runs only at batch 2 (a reshape with literal sizes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 2)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x))))).reshape(2, 2)


def test_a_graph_with_a_fixed_batch_is_calibrated_in_whole_batches(tmp_path):
    torch.export.save(torch.export.export(FixedBatch().eval(), (torch.randn(2, 8),)), tmp_path / "fixed.pt2")
    loaded = vcon_fx.load_model(tmp_path / "fixed.pt2")
    vm = vcon_fx.transform(loaded.module, vcon_fx.QuantConfig(bits=4), example_inputs=loaded.example_args,
                           calibration=TensorDataset(torch.randn(5, 8)))
    assert vm.meta["vcon"].inputs["fixed"] == {"batch": 2}
    assert "calibration: 6 sample(s) in 3 batch(es)" in vm.meta["vcon"].notes[-1]  # the last one filled up


def test_data_aware_starts_without_data_are_refused_in_the_users_terms():
    net, x = Net().eval(), (images(2, 0),)
    for config in (vcon_fx.QuantConfig(bits=4, init="data-aware"), vcon_fx.PruneConfig(sparsity=0.5, sparsegpt=True)):
        with pytest.raises(ConfigError, match="--calibration-data"):
            vcon_fx.transform(net, config, example_inputs=x)
    for bad, words in ((dict(rank=2, activation_aware=True, init="plain"), "--init plain"),
                       (dict(rank=2, init="whitened"), "--init must be one of auto, plain, data-aware")):
        with pytest.raises(ConfigError, match=words):
            vcon_fx.LowRankConfig(**bad)
    with pytest.raises(ConfigError, match="structured pruning has no data-aware start"):
        vcon_fx.PruneConfig(sparsity=0.5, structured=True, init="data-aware")
    plain = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=4, init="plain"), example_inputs=x, calibration=images(4, 1))
    assert plain.meta["vcon"].config.init == "plain" and not plain.get_submodule("body.conv.compressed").fixed_scale
    eight = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=8), example_inputs=x, calibration=images(4, 1))
    assert eight.meta["vcon"].config.init == "auto"  # round-to-nearest is close at 8 bits: GPTQ only if asked
    asked = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=8, init="data-aware"), example_inputs=x,
                              calibration=images(4, 1))
    assert asked.get_submodule("body.conv.compressed").fixed_scale


# ── the CLI ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """tiny.pt2 (the Net, dynamic batch) and calib.npz (inputs and labels)."""
    root = tmp_path_factory.mktemp("calibration")
    torch.manual_seed(0)
    net = Net().eval()
    torch.export.save(torch.export.export(net, (images(2, 0),), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                      root / "tiny.pt2")
    x = images(48, 1).numpy()
    np.savez(root / "calib.npz", inputs=x, labels=(x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64))
    return root


cli = cli_output


@pytest.mark.parametrize("method", [["lowrank", "--rank", "2", "--activation-aware"], ["prune", "--pattern", "2:4"],
                                    ["quant", "--bits", "4"]], ids=lambda m: "-".join(m))
def test_transform_with_calibration_data_starts_data_aware_and_keeps_the_invariants(files, method, tmp_path):
    out = tmp_path / "m.vcon"
    code, text = cli("transform", str(files / "tiny.pt2"), "--method", *method, "--calibration-data",
                     str(files / "calib.npz"), "-o", str(out))
    assert code == 0, text
    assert "calibration: 48 sample(s)" in text and "synthetic" not in text
    assert read_recipe(out).config.init == "data-aware"
    vm, x = vcon_fx.load(out), ((images(3, 2),), {})
    original = torch.export.load(files / "tiny.pt2").module()
    assert_identity_at_beta_one(original, vm, x)
    assert_onnx_parity(assert_vanish_parity(vm, x), x, tmp_path)


def test_inspect_states_the_memory_of_the_statistics(files):
    code, text = cli("inspect", str(files / "tiny.pt2"), "--method", "quant", "--bits", "4", "--calibration-data",
                     str(files / "calib.npz"), "--calibration-samples", "16", "--json")
    assert code == 0, text
    report = json.loads(text)
    # conv: 8 channel sums, 72 columns, XᵀX 72²; grouped: 8 channel sums; fc: 8 + 8 sums, XᵀX 8²
    assert report["calibration"] == {"data": str(files / "calib.npz"), "samples": 16, "layers": 3, "gram": True,
                                     "bytes": 8 * (8 + 72 + 72 ** 2 + 8 + 8 + 8 + 8 ** 2)}
    assert report["method"]["init"] == "data-aware"
    code, text = cli("inspect", str(files / "tiny.pt2"), "--method", "prune", "--sparsity", "0.5",
                     "--calibration-data", str(files / "calib.npz"))
    assert code == 0 and "per-feature moments" in text
    code, text = cli("inspect", str(files / "tiny.pt2"), "--method", "prune", "--sparsity", "0.5",
                     "--calibration-data", str(files / "calib.npz"), "--json")
    assert json.loads(text)["layers"]["body.conv"]["detail"]["init"] == "wanda"


def test_compress_takes_the_calibration_flags(files, tmp_path):
    code, text = cli("compress", str(files / "tiny.pt2"), "--method", "quant", "--bits", "4", "--calibration-data",
                     str(files / "calib.npz"), "--calibration-samples", "24", "--data", str(files / "calib.npz"),
                     "--steps", "4", "--onnx", str(tmp_path / "tiny.onnx"))
    assert code == 0, text
    assert "calibration: 24 sample(s)" in text and (tmp_path / "tiny.onnx").is_file()
    assert read_recipe(tmp_path / "tiny.work" / "model.vcon").config.init == "data-aware"


def test_calibration_flags_refused_in_the_users_terms(files, capsys):
    assert cli("transform", str(files / "tiny.pt2"), "--method", "quant", "--bits", "4",
               "--calibration-samples", "8")[0] == 2
    assert "--calibration-samples needs --calibration-data" in capsys.readouterr().err
    assert cli("transform", str(files / "tiny.pt2"), "--method", "quant", "--bits", "4",
               "--calibration-data", str(files / "missing.npz"))[0] == 9
