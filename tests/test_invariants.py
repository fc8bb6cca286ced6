"""The invariants of docs/architecture.md (Contracts) on every model of the zoo, for every method in the matrix.

    β = 1 → original; vanish at β = 0 → blended at β = 0; ONNX → PyTorch at any batch;
    after vanish: promised parameter count and no dense parameter.

Each (model, granularity) is transformed once per session and shared by the four checks.
Also: block and layer blends are different methods with the same endpoints, and save/load
round-trips blended and vanished models.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig

from helpers import (
    VANISH_TOL,
    assert_close_outputs,
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_params_promised,
    assert_vanish_parity,
    max_rel_diff,
    other_batch,
    run,
)
from zoo import SLOW, ZOO, ZooCase, make

# Every registered method runs at the test strength its own file declares (`examples().test`).
# One model-dependent exception: resnet18 and ViT-B/16 keep low-rank at a fixed rank 16 (their
# wide layers would get ranks near 100 at ratio 0.25: slower SVDs and exports for no more coverage).
FIXED_RANK_MODELS = ("resnet18", "vit_b_16")
PENDING_METHODS: dict[str, str] = {}  # method → why it has no examples yet (then it is not tested here)


def _declared_examples():
    return {name: cls.examples() for name, cls in vcon_fx.registered_methods().items()}


def method_config(method: str, name: str):
    """The config the matrix runs `method` with on zoo model `name`."""
    if method == "lowrank" and name in FIXED_RANK_MODELS:
        return LowRankConfig(rank=16)
    return vcon_fx.registered_methods()[method].examples().test


METHODS = sorted(m for m, ex in _declared_examples().items() if ex is not None)
# method → (zoo model name → config), the shape tests/test_zoo.py imports
METHOD_CONFIGS = {m: functools.partial(method_config, m) for m in METHODS}
# Methods other than low-rank run on the fast set's real architectures (resnet18, the tiny
# BERT) and the hand-written zoo; their mobilenet / ViT cases join the slow sweep.
SLOW_FOR_OTHER_METHODS = {"mobilenet_v3_small"}

BLOCKS = {
    "residual": ("layer1.*",),
    "resnet18": ("layer*.*",),
    "bert_tiny": ("encoder.layer.*.intermediate+output",),
}


def _case_params():
    out = []
    for method in METHODS:
        for name in ZOO:
            slow = name in SLOW or (method != "lowrank" and name in SLOW_FOR_OTHER_METHODS)
            marks = [pytest.mark.slow] if slow else []
            out.append(pytest.param(method, name, "layer", id=f"{method}-{name}-layer", marks=marks))
        for name in BLOCKS:
            marks = [pytest.mark.slow] if name in SLOW else []
            out.append(pytest.param(method, name, "block", id=f"{method}-{name}-block", marks=marks))
    return out


CASES = _case_params()


@dataclass
class Pipeline:
    """One model through transform (β = 1, never changed here) and vanish (lazily, on a copy)."""

    case: ZooCase
    vm: torch.fx.GraphModule

    @property
    def inputs(self):
        return self.case.args, self.case.kwargs

    @cached_property
    def small(self):
        """The vanished model, shared by the checks after vanish; test_vanish_parity checks it is faithful."""
        vm = copy.deepcopy(self.vm)
        vcon_fx.set_beta(vm, 0.0)
        return vcon_fx.vanish(vm)


_PIPELINES: dict[tuple[str, str, str], Pipeline] = {}


def transform_case(case: ZooCase, config, granularity: str = "layer", **options):
    blocks = {"blocks": BLOCKS[case.name]} if granularity == "block" else {}
    return vcon_fx.transform(case.model, config, example_inputs=case.args, example_kwargs=case.kwargs,
                             seq_inputs=case.seq_inputs, granularity=granularity, **blocks, **options)


def pipeline(method: str, name: str, granularity: str) -> Pipeline:
    key = (method, name, granularity)
    if key not in _PIPELINES:
        case = make(name)
        _PIPELINES[key] = Pipeline(case, transform_case(case, method_config(method, name), granularity))
    return _PIPELINES[key]


@pytest.mark.parametrize("method,name,granularity", CASES)
def test_identity_at_beta_one(method, name, granularity):
    p = pipeline(method, name, granularity)
    assert_identity_at_beta_one(p.case.model, p.vm, p.inputs)
    # also at shapes the capture never saw (export captures with dynamic batch / sequence)
    assert_identity_at_beta_one(p.case.model, p.vm, other_batch(p.inputs, p.case.seq_inputs))
    p.vm.graph.lint()


@pytest.mark.parametrize("method,name,granularity", CASES)
def test_vanish_parity(method, name, granularity):
    p = pipeline(method, name, granularity)
    small = assert_vanish_parity(copy.deepcopy(p.vm), p.inputs)  # every run, whatever ran before
    assert small.meta["vcon"].stage == "vanished"
    small.graph.lint()
    # the shared vanished model the other checks use is the same model
    assert_close_outputs(run(small, p.inputs), run(p.small, p.inputs), VANISH_TOL, "cached vs fresh vanish")


@pytest.mark.parametrize("method,name,granularity", CASES)
def test_params_promised(method, name, granularity):
    p = pipeline(method, name, granularity)
    recipe = p.small.meta["vcon"]
    assert_params_promised(p.small, p.case.model, recipe)


@pytest.mark.parametrize("method,name,granularity", CASES)
def test_onnx_parity(method, name, granularity, tmp_path):
    p = pipeline(method, name, granularity)
    assert_onnx_parity(p.small, p.inputs, tmp_path, p.case.seq_inputs)


def test_matrix_covers_every_method_and_model():
    """A registered method without declared examples, or a zoo model missing from the matrix, is a failure."""
    examples = _declared_examples()
    missing = sorted(m for m, ex in examples.items() if ex is None and m not in PENDING_METHODS)
    assert not missing, f"declare examples() on the config of {missing} (see MethodConfig.examples)"
    stale = sorted(m for m in PENDING_METHODS if examples.get(m) is not None)
    assert not stale, f"{stale} declare examples now: remove them from PENDING_METHODS"
    for method, ex in examples.items():
        if ex is not None:
            for role in ("test", "cuda", "demo"):
                config = getattr(ex, role)
                assert type(config) is vcon_fx.registered_methods()[method], f"{method}.examples().{role}"
            assert ex.demo_setting
    covered = {(p.values[0], p.values[1]) for p in CASES if p.values[2] == "layer"}
    assert {(m, n) for m in METHODS for n in ZOO} <= covered
    assert set(METHODS) | set(PENDING_METHODS) == set(examples)
    assert {"resnet18", "mobilenet_v3_small", "bert_tiny"}.isdisjoint(SLOW)


@dataclass(frozen=True)
class _Undeclared(vcon_fx.MethodConfig):
    method = "undeclared"


def test_a_method_without_examples_fails_the_matrix_check(monkeypatch):
    from vcon_fx.methods import base

    monkeypatch.setitem(base._BY_NAME, "undeclared", _Undeclared)
    with pytest.raises(AssertionError, match="undeclared"):
        test_matrix_covers_every_method_and_model()


# ── block blend vs per-layer blend: same endpoints, different paths ───────────────────────


def test_block_blend_differs_from_layer_blend_between_endpoints():
    case = make("residual")
    config = LowRankConfig(ratio=0.25)
    by_layer = transform_case(case, config, "layer")
    by_block = transform_case(case, config, "block")
    inputs = (case.args, case.kwargs)
    assert len(vcon_fx.get_betas(by_layer)) == 4 and len(vcon_fx.get_betas(by_block)) == 2

    # β = 1: both are the original model
    assert_identity_at_beta_one(case.model, by_layer, inputs)
    assert_identity_at_beta_one(case.model, by_block, inputs)

    # 0 < β < 1: blending outputs of a block (non-linearities, residual inside) is not blending
    # each layer: y = β·f2(f1(x)) + (1−β)·g2(g1(x)) ≠ [β·f2 + (1−β)·g2]([β·f1 + (1−β)·g1](x))
    vcon_fx.set_beta(by_layer, 0.5)
    vcon_fx.set_beta(by_block, 0.5)
    mid_layer, mid_block = run(by_layer, inputs), run(by_block, inputs)
    assert max_rel_diff(mid_layer, mid_block) > 1e-3

    # β = 0: both are the same compressed network (same SVD init), and each equals its vanished model
    vcon_fx.set_beta(by_layer, 0.0)
    vcon_fx.set_beta(by_block, 0.0)
    assert_close_outputs(run(by_layer, inputs), run(by_block, inputs), 1e-5, "layer vs block at β = 0")
    for vm in (by_layer, by_block):
        assert_vanish_parity(vm, inputs)


def test_block_branches_share_no_state():
    """A block's twin is a deep copy: no parameter or batch-norm buffer is shared between branches."""
    case = make("residual")
    vm = transform_case(case, LowRankConfig(ratio=0.25), "block")
    blend = vm.get_submodule("layer1.0")
    assert isinstance(blend, vcon_fx.Blend)
    dense_params = {id(p) for p in blend.dense.parameters()}
    comp_params = {id(p) for p in blend.compressed.parameters()}
    assert not dense_params & comp_params, "the branches share a tensor (batch-norm state must not be shared)"
    dense_bufs = {id(b) for b in blend.dense.buffers()}
    assert not dense_bufs & {id(b) for b in blend.compressed.buffers()}


def test_block_submodules_are_relative_to_the_block():
    case = make("residual")
    vm = transform_case(case, LowRankConfig(ratio=0.25), "block")
    blend = vm.get_submodule("layer1.0")
    names = {n for n, _ in blend.dense.named_modules()}
    assert "conv1" in names and "bn2" in names, sorted(names)


# ── one weight, two functional calls with different bias / options ────────────────────


class _LinearReuse(nn.Module):
    """`w` is used by two F.linear calls, the second without the bias."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.b = nn.Parameter(torch.ones(32))

    def forward(self, x):
        x = torch.tanh(F.linear(F.relu(self.stem(x)), self.w, self.b))
        x = torch.tanh(F.linear(x, self.w))
        return self.head(F.relu(self.mid(x)))


class _ConvReuse(nn.Module):
    """`w` is used by two F.conv2d calls, the second with stride 2."""

    def __init__(self):
        super().__init__()
        self.stem, self.mid = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 3)
        self.w = nn.Parameter(torch.randn(16, 16, 3, 3) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(F.relu(self.stem(x)), self.w, padding=1))
        x = F.relu(F.conv2d(x, self.w, stride=2, padding=1))
        return self.head(F.relu(self.mid(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("capture", ["fx", "export"])
@pytest.mark.parametrize("model_cls,x_shape", [(_LinearReuse, (2, 8)), (_ConvReuse, (2, 3, 8, 8))],
                         ids=["linear", "conv"])
def test_identity_when_a_weight_is_reused_with_other_options(model_cls, x_shape, capture):
    model = model_cls().eval()
    x = torch.randn(x_shape)
    vm = vcon_fx.transform(model, LowRankConfig(rank=4), example_inputs=(x,), capture=capture)
    assert list(vcon_fx.get_betas(vm)) == ["mid"]  # `w` serves two calls: refused as tied
    assert_identity_at_beta_one(model, vm, ((x,), {}))


# ── save / load ───────────────────────────────────────────────────────────────────────────


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


SAVE_CASES = [
    pytest.param("mlp", "layer", id="mlp-layer"),
    pytest.param("residual", "block", id="residual-block"),
    pytest.param("bert_tiny", "layer", id="bert_tiny-layer"),
]


@pytest.mark.parametrize("name,granularity", SAVE_CASES)
def test_save_load_round_trip(name, granularity, tmp_path):
    case = make(name)
    inputs = (case.args, case.kwargs)
    vm = transform_case(case, LowRankConfig(ratio=0.25), granularity)
    groups = list(vcon_fx.get_betas(vm))
    # distinct β per group: each group's β must come back as it was
    betas = {g: round(0.2 + 0.6 * i / max(len(groups) - 1, 1), 3) for i, g in enumerate(groups)}
    vcon_fx.set_beta(vm, betas)
    with torch.no_grad():  # trained-looking weights, so a reloaded SVD init would not pass
        for p in vm.parameters():
            p.add_(0.01 * torch.randn_like(p))

    blended_dir = vcon_fx.save(vm, tmp_path / "blended")
    back = vcon_fx.load(blended_dir, model=case.model)
    assert vcon_fx.get_betas(back) == pytest.approx(betas)
    assert back.meta["vcon"].stage == "blended"
    assert_close_outputs(run(vm, inputs), run(back, inputs), 1e-6, "loaded blended vs saved")

    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    vanished_dir = vcon_fx.save(small, tmp_path / "vanished")
    back_small = vcon_fx.load(vanished_dir, model=case.model)
    assert back_small.meta["vcon"].stage == "vanished"
    assert vcon_fx.get_betas(back_small) == {}
    assert_close_outputs(run(small, inputs), run(back_small, inputs), 1e-6, "loaded vanished vs saved")
    assert sum(t.numel() for t in back_small.parameters()) == sum(t.numel() for t in small.parameters())
    assert _folder_bytes(vanished_dir) < _folder_bytes(blended_dir)


def test_save_refuses_existing_folder_without_force(tmp_path):
    from vcon_fx.errors import OutputExistsError

    case = make("mlp")
    vm = transform_case(case, LowRankConfig(ratio=0.25))
    vcon_fx.save(vm, tmp_path / "out")
    with pytest.raises(OutputExistsError):
        vcon_fx.save(vm, tmp_path / "out")
    vcon_fx.set_beta(vm, 0.5)
    vcon_fx.save(vm, tmp_path / "out", force=True)
    back = vcon_fx.load(tmp_path / "out", model=case.model)
    assert vcon_fx.get_betas(back) == {g: 0.5 for g in vcon_fx.get_betas(vm)}
