"""Property-based tests: random MLPs and CNNs, random targets and method settings.

For every drawn (architecture, targets, config) the invariants of docs/architecture.md hold:
    β = 1 → the original outputs (≤ 1e-6 relative)
    vanish at β = 0 → the blended outputs at β = 0 (≤ 1e-6)
    low-rank: the vanished parameter count is what the plan promised, nothing dense is left
    ONNX (onnxruntime) → PyTorch (≤ 1e-4 relative), at the export batch and batch + 1
and a draw that leaves nothing to compress fails with one clear VconError, not garbage.
Numerical safety: degenerate weights (all zero, rank-deficient, huge) give finite twins;
NaN/Inf weights give a VconError naming the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError, SelectionError, VconError
from vcon_fx.methods import registered_methods
from vcon_fx.graph.blend import Blend

from helpers import (
    assert_close_outputs,
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_params_promised,
    assert_vanish_parity,
    run,
)

PROPERTY = settings(max_examples=15, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
ONNX_PROPERTY = settings(max_examples=5, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ── architectures ─────────────────────────────────────────────────────────────────────────


@dataclass
class Arch:
    model: nn.Module
    inputs: tuple[tuple, dict]
    layers: list[str]  # compressible layer paths, in order


class MLP(nn.Module):
    def __init__(self, widths: list[int], bias: bool, bn: bool, act: str):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:]))
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if bn else nn.Identity() for b in widths[1:-1])
        self.act = {"relu": nn.ReLU(), "gelu": nn.GELU(), "tanh": nn.Tanh()}[act]

    def forward(self, x):
        for layer, norm in zip(self.layers[:-1], self.norms):
            x = self.act(norm(layer(x)))
        return self.layers[-1](x)


class CNN(nn.Module):
    def __init__(self, channels: list[int], kernels: list[int], strides: list[int], bias: bool, bn: bool, classes: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, stride=s, padding=k // 2, bias=bias)
                                   for a, b, k, s in zip(channels, channels[1:], kernels, strides))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) if bn else nn.Identity() for b in channels[1:])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(channels[-1], classes, bias=bias)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = torch.relu(norm(conv(x)))
        return self.head(self.pool(x).flatten(1))


def _randomize_norms(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


@st.composite
def mlps(draw) -> Arch:
    depth = draw(st.integers(2, 5), label="linear layers")
    widths = draw(st.lists(st.integers(8, 48), min_size=depth + 1, max_size=depth + 1), label="widths")
    bias, bn = draw(st.booleans(), label="bias"), draw(st.booleans(), label="batch norm")
    act = draw(st.sampled_from(["relu", "gelu", "tanh"]), label="activation")
    batch = draw(st.integers(1, 3), label="batch")
    seed = draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    model = MLP(widths, bias, bn, act)
    _randomize_norms(model, seed)
    x = torch.randn(batch, widths[0], generator=torch.Generator().manual_seed(seed + 1))
    return Arch(model.eval(), ((x,), {}), [f"layers.{i}" for i in range(depth)])


@st.composite
def cnns(draw) -> Arch:
    depth = draw(st.integers(2, 4), label="conv layers")
    channels = draw(st.lists(st.integers(2, 16), min_size=depth + 1, max_size=depth + 1), label="channels")
    kernels = draw(st.lists(st.sampled_from([1, 3, 5]), min_size=depth, max_size=depth), label="kernels")
    strides = draw(st.lists(st.sampled_from([1, 1, 2]), min_size=depth, max_size=depth), label="strides")
    bias, bn = draw(st.booleans(), label="bias"), draw(st.booleans(), label="batch norm")
    size = draw(st.integers(6, 14), label="image size")
    batch = draw(st.integers(1, 2), label="batch")
    seed = draw(st.integers(0, 2**16), label="seed")
    torch.manual_seed(seed)
    model = CNN(channels, kernels, strides, bias, bn, classes=draw(st.integers(2, 10), label="classes"))
    _randomize_norms(model, seed)
    x = torch.randn(batch, channels[0], size, size, generator=torch.Generator().manual_seed(seed + 1))
    return Arch(model.eval(), ((x,), {}), [f"convs.{i}" for i in range(depth)] + ["head"])


# ── methods and targets ───────────────────────────────────────────────────────────────────


def _configs():
    methods = registered_methods()
    options = [st.builds(methods["lowrank"], rank=st.integers(1, 4)),
               st.builds(methods["lowrank"], ratio=st.floats(0.1, 0.6)),
               st.builds(methods["lowrank"], energy=st.floats(0.3, 0.99))]
    if "prune" in methods:
        options.append(st.builds(methods["prune"], sparsity=st.floats(0.1, 0.9)))
    if "quant" in methods:
        options.append(st.builds(methods["quant"], bits=st.sampled_from([8, 4, 2, 1, "ternary"])))
    return st.one_of(options)


@st.composite
def selections(draw, layers: list[str]) -> dict:
    """Targets: the default, a type name, or a random non-empty subset of layer names."""
    kind = draw(st.sampled_from(["default", "type", "names"]), label="targets")
    options = {"include_stem": draw(st.booleans(), label="stem"), "include_head": draw(st.booleans(), label="head")}
    if kind == "type":
        options["targets"] = (draw(st.sampled_from(["Linear", "Conv2d"])),)
    elif kind == "names":
        options["targets"] = tuple(draw(st.lists(st.sampled_from(layers), min_size=1, max_size=len(layers),
                                                 unique=True), label="names"))
    return options


def _transform_or_explain(arch: Arch, config, options: dict):
    """The blended model, or None when the draw leaves nothing to compress (a clear error)."""
    (args, kwargs) = arch.inputs
    try:
        return vcon_fx.transform(arch.model, config, example_inputs=args, example_kwargs=kwargs, **options)
    except (ConfigError, SelectionError) as exc:
        # A legitimate refusal: one line, naming why (every layer skipped, or none matched).
        text = str(exc)
        assert "\n" not in text and ("dense" in text or "match" in text or "no layer" in text), text
        event(f"refused: {type(exc).__name__}")
        return None


def _check_pipeline(arch: Arch, config, options: dict) -> None:
    vm = _transform_or_explain(arch, config, options)
    if vm is None:
        return
    event(f"compressed: {config.method}")
    assert_identity_at_beta_one(arch.model, vm, arch.inputs)
    small = assert_vanish_parity(vm, arch.inputs)
    if config.method == "lowrank":
        assert_params_promised(small, arch.model, vm.meta["vcon"])
    # Outputs stay finite whatever the draw.
    assert all(torch.isfinite(t).all() for t in [run(small, arch.inputs)])


@PROPERTY
@given(data=st.data(), arch=mlps(), config=_configs())
def test_mlp_pipeline_invariants(data, arch, config):
    _check_pipeline(arch, config, data.draw(selections(arch.layers), label="selection"))


@PROPERTY
@given(data=st.data(), arch=cnns(), config=_configs())
def test_cnn_pipeline_invariants(data, arch, config):
    _check_pipeline(arch, config, data.draw(selections(arch.layers), label="selection"))


def _float_configs():
    methods = registered_methods()
    options = [st.builds(methods["lowrank"], rank=st.integers(1, 4))]
    if "prune" in methods:
        options.append(st.builds(methods["prune"], sparsity=st.floats(0.2, 0.8)))
    return st.one_of(options)


@ONNX_PROPERTY
@given(arch=st.one_of(mlps(), cnns()), config=_float_configs())
def test_onnx_parity(arch, config, tmp_path_factory):
    vm = _transform_or_explain(arch, config, {"include_stem": True, "include_head": True})
    if vm is None:
        return
    small = assert_vanish_parity(vm, arch.inputs)
    assert_onnx_parity(small, arch.inputs, tmp_path_factory.mktemp("onnx"))


# ── numerical safety: degenerate weights ──────────────────────────────────────────────────


def _mlp_with(fill) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = MLP([8, 32, 32, 32, 4], bias=True, bn=False, act="relu").eval()
    with torch.no_grad():
        fill(net.layers[1].weight)
    return net, torch.randn(3, 8, generator=torch.Generator().manual_seed(1))


def _rank_two(w: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(2)
    w.copy_(torch.randn(w.shape[0], 2, generator=gen) @ torch.randn(2, w.shape[1], generator=gen))


LOWRANK = [pytest.param(lambda: vcon_fx.LowRankConfig(rank=4), id="rank"),
           pytest.param(lambda: vcon_fx.LowRankConfig(energy=0.5), id="energy"),
           pytest.param(lambda: vcon_fx.LowRankConfig(ratio=0.25), id="ratio")]


@pytest.mark.parametrize("make_config", LOWRANK)
@pytest.mark.parametrize("fill", [lambda w: w.zero_(), _rank_two, lambda w: w.mul_(1e18), lambda w: w.mul_(1e-30)],
                         ids=["all-zero", "rank-2", "huge", "tiny"])
def test_degenerate_weights_give_finite_twins(fill, make_config):
    net, x = _mlp_with(fill)
    vm = vcon_fx.transform(net, make_config(), example_inputs=(x,))
    assert_identity_at_beta_one(net, vm, ((x,), {}))
    for name, p in vm.named_parameters():
        assert torch.isfinite(p).all(), f"{name} holds NaN/Inf after the SVD"
    small = assert_vanish_parity(vm, ((x,), {}))
    assert torch.isfinite(run(small, ((x,), {}))).all()


def test_rank_deficient_layer_is_exact_at_its_rank():
    """A rank-2 weight is reproduced exactly by a rank ≥ 2 twin: β = 0 equals β = 1."""
    net, x = _mlp_with(_rank_two)
    vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=4), example_inputs=(x,), targets=("layers.1",))
    twin = next(m for m in vm.modules() if isinstance(m, Blend)).compressed
    dense = net.layers[1]
    h = torch.randn(5, 32)
    assert_close_outputs(dense(h), twin(h), 1e-5, "rank-4 twin of a rank-2 layer")


@pytest.mark.parametrize("make_config", LOWRANK)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_refused_naming_the_layer(bad, make_config):
    net, x = _mlp_with(lambda w: w.__setitem__((3, 5), bad))
    with pytest.raises(VconError) as info:
        vcon_fx.transform(net, make_config(), example_inputs=(x,))
    assert isinstance(info.value, ValueError)
    assert "layers.1" in str(info.value) and ("nan" in str(info.value).lower() or "finite" in str(info.value))
