"""Selection (targets, ignores, stem/head, tied layers, blocks) and low-rank planning edge cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig
from vcon_fx.errors import ConfigError, SelectionError, UsageError, VconError
from vcon_fx.methods.lowrank import choose_rank, truncated_svd

from helpers import assert_identity_at_beta_one, assert_params_promised, assert_vanish_parity, run
from zoo import make

CFG = LowRankConfig(ratio=0.25)


def groups_of(case, config=CFG, **options) -> list[str]:
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args, example_kwargs=case.kwargs,
                           seq_inputs=case.seq_inputs, **options)
    return list(vcon_fx.get_betas(vm))


# ── targets and ignores ──────────────────────────────────────────────────────────────────


def test_default_targets_leave_stem_and_head_dense():
    case = make("mlp")
    vm = vcon_fx.transform(case.model, CFG, example_inputs=case.args)
    assert list(vcon_fx.get_betas(vm)) == ["fc1", "fc2", "fc3"]
    excluded = vm.meta["vcon"].excluded
    assert "stem" in excluded["stem"] and "--include-stem" in excluded["stem"]
    assert "head" in excluded["head"] and "--include-head" in excluded["head"]


@pytest.mark.parametrize("options,expected", [
    ({"include_stem": True}, ["stem", "fc1", "fc2", "fc3"]),
    ({"include_head": True}, ["fc1", "fc2", "fc3", "head"]),
    ({"include_stem": True, "include_head": True}, ["stem", "fc1", "fc2", "fc3", "head"]),
])
def test_include_stem_and_head(options, expected):
    case = make("mlp")
    vm = vcon_fx.transform(case.model, LowRankConfig(rank=2), example_inputs=case.args, **options)
    assert list(vcon_fx.get_betas(vm)) == expected
    assert_identity_at_beta_one(case.model, vm, (case.args, {}))


def test_bert_has_no_stem_to_exclude():
    """The first Linear of BERT reads the embeddings, not the raw input: it is not a stem. The stem is the
    token table (its exported lookup lifted into an Embedding); the position / token-type tables are compressed."""
    case = make("bert_tiny")
    plan = vcon_fx.plan(case.model, CFG, example_kwargs=case.kwargs, seq_inputs=case.seq_inputs)
    chosen = [p for g in plan.groups for p in g.layers]
    assert [p for p in chosen if not p.startswith("embeddings.")][0] == "encoder.layer.0.attention.self.query"
    assert list(plan.selection.excluded) == ["embeddings.word_embeddings", "pooler.dense"]


@pytest.mark.parametrize("targets,expected", [
    (("Conv2d",), ["body.0", "body.3"]),  # type name (stem is still the stem)
    (("body.*",), ["body.0", "body.3"]),  # glob on the path
    (("re:body\\.3",), ["body.3"]),  # regular expression, full match
    (("body.0", "Linear"), ["body.0"]),  # several targets; the only Linear is the head
])
def test_targets(targets, expected):
    assert groups_of(make("conv_bn_relu"), targets=targets) == expected


@pytest.mark.parametrize("targets,expected", [
    (("fc*",), ["fc1", "fc2", "fc3"]),
    (("re:fc[12]",), ["fc1", "fc2"]),
    (("re:fc",), None),  # a regex matches the whole path, not a part of it
    (("Linear",), ["fc1", "fc2", "fc3"]),
])
def test_targets_on_mlp(targets, expected):
    case = make("mlp")
    if expected is None:
        with pytest.raises(SelectionError):
            groups_of(case, targets=targets)
    else:
        assert groups_of(case, targets=targets) == expected


@pytest.mark.parametrize("ignore,expected", [
    (("fc2",), ["fc1", "fc3"]),
    (("re:fc[13]",), ["fc2"]),
    (("fc*",), None),
])
def test_ignore(ignore, expected):
    case = make("mlp")
    if expected is None:
        with pytest.raises(SelectionError, match="ignoring"):
            groups_of(case, ignore=ignore)
        return
    vm = vcon_fx.transform(case.model, CFG, example_inputs=case.args, ignore=ignore)
    assert list(vcon_fx.get_betas(vm)) == expected
    left_out = set(vm.meta["vcon"].excluded) - {"stem", "head"}
    assert all("ignored" in vm.meta["vcon"].excluded[p] for p in left_out)


def test_nothing_matched_names_the_targets():
    case = make("mlp")
    with pytest.raises(SelectionError) as err:
        groups_of(case, targets=("Conv2d", "encoder.*"))
    message = str(err.value)
    assert "Conv2d" in message and "encoder.*" in message
    assert isinstance(err.value, ValueError) and isinstance(err.value, VconError)


def test_bad_regex_is_a_usage_error():
    with pytest.raises(UsageError, match="regular expression"):
        groups_of(make("mlp"), targets=("re:fc[",))


# ── a layer called twice ─────────────────────────────────────────────────────────────────


def test_layer_called_twice_is_one_group():
    case = make("shared_linear")
    vm = vcon_fx.transform(case.model, CFG, example_inputs=case.args)
    recipe = vm.meta["vcon"]
    assert [g.layers for g in recipe.groups] == [["shared"]]
    assert vm.meta["vcon"].plans["shared"].params_after < vm.meta["vcon"].plans["shared"].params_before
    calls = [n for n in vm.graph.nodes if n.op == "call_module" and n.target == "shared"]
    assert len(calls) == 2, "both calls go through the one Blend"
    assert_identity_at_beta_one(case.model, vm, (case.args, {}))
    # at β = 0 both calls use the one compressed twin (its weights are tied between calls)
    vcon_fx.set_beta(vm, 0.0)
    twin = vm.get_submodule("shared").compressed
    model = case.model
    x = case.args[0]
    with torch.no_grad():
        expected = model.head(torch.tanh(twin(F.relu(twin(F.relu(model.stem(x)))))))
    assert torch.allclose(vm(x), expected, atol=1e-6)
    small = assert_vanish_parity(vm, (case.args, {}))
    assert_params_promised(small, case.model, small.meta["vcon"])


# ── blocks ──────────────────────────────────────────────────────────────────────────────


def test_block_granularity_needs_blocks():
    with pytest.raises(UsageError, match="--blocks"):
        groups_of(make("residual"), granularity="block")


def test_unknown_granularity():
    with pytest.raises(UsageError, match="granularity"):
        groups_of(make("mlp"), granularity="tensor")


def test_block_patterns_name_whole_blocks():
    assert groups_of(make("residual"), granularity="block", blocks=("layer1.*",)) == ["layer1.0", "layer1.1"]
    assert groups_of(make("bert_tiny"), granularity="block", blocks=("encoder.layer.*.intermediate+output",)) == [
        "encoder.layer.0.intermediate__output", "encoder.layer.1.intermediate__output"]


def test_block_matching_nothing():
    with pytest.raises(SelectionError, match="matched no module"):
        groups_of(make("residual"), granularity="block", blocks=("encoder.*",))


class _TwoExit(nn.Module):
    """`block` returns two tensors that are both used after it: not a single-exit region."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return h, self.fc2(h)


class _TwoExitNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block, self.head = nn.Linear(8, 32), _TwoExit(), nn.Linear(32, 3)

    def forward(self, x):
        h, y = self.block(F.relu(self.stem(x)))
        return self.head(h + y)


def test_block_with_two_outputs():
    model = _TwoExitNet().eval()
    with pytest.raises(SelectionError, match="2 outputs") as err:
        vcon_fx.transform(model, LowRankConfig(rank=4), example_inputs=(torch.randn(2, 8),), granularity="block",
                          blocks=("block",))
    assert "--granularity layer" in str(err.value)
    # the same layers work one by one
    vm = vcon_fx.transform(model, LowRankConfig(rank=4), example_inputs=(torch.randn(2, 8),))
    assert list(vcon_fx.get_betas(vm)) == ["block.fc1", "block.fc2"]


# ── plans that skip layers ───────────────────────────────────────────────────────────────


def _bottleneck() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4), nn.ReLU(),
                         nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 3)).eval()


def test_rank_that_does_not_reduce_params_skips_the_layer():
    model = _bottleneck()
    x = torch.randn(2, 8)
    vm = vcon_fx.transform(model, LowRankConfig(rank=6), example_inputs=(x,))
    assert list(vcon_fx.get_betas(vm)) == ["2"]
    excluded = vm.meta["vcon"].excluded
    for path in ("4", "6"):  # rank 6 ≥ min(64, 4)
        assert "would not reduce parameters" in excluded[path]
    assert vm.meta["vcon"].plans["4"].skipped
    assert_identity_at_beta_one(model, vm, ((x,), {}))
    small = assert_vanish_parity(vm, ((x,), {}))
    assert_params_promised(small, model, small.meta["vcon"])


def test_rank_too_big_for_a_square_layer():
    model = _bottleneck()
    plan = vcon_fx.plan(model, LowRankConfig(rank=40), example_inputs=(torch.randn(2, 8),), targets=("2",))
    # 40·(64 + 64) + 64 > 64·64 + 64: a rank below 32 would pay
    assert plan.plans["2"].skipped and "below 32" in plan.plans["2"].skip_reason
    assert plan.groups == [] and plan.params_after == plan.total_params


def test_every_layer_skipped_is_a_config_error():
    case = make("mlp")
    with pytest.raises(ConfigError, match="dense") as err:
        vcon_fx.transform(case.model, LowRankConfig(rank=64), example_inputs=case.args)
    assert "fc1" in str(err.value)


def test_grouped_convolutions_are_skipped_with_a_reason():
    case = make("mobilenet_v3_small")
    plan = vcon_fx.plan(case.model, CFG, example_inputs=case.args)
    grouped = {p: pl.skip_reason for p, pl in plan.plans.items() if pl.skipped}
    assert grouped and all("grouped convolution" in r for r in grouped.values())


# ── LowRankConfig ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kwargs", [
    {"rank": 0}, {"rank": -3}, {"rank": 1.5}, {"rank": True},
    {"energy": 0.0}, {"energy": -0.1}, {"energy": 1.01},
    {"ratio": 0.0}, {"ratio": 1.0},
    {"rank": 4, "energy": 0.9}, {"rank": 4, "ratio": 0.5}, {"energy": 0.9, "ratio": 0.5},
    {},
])
def test_lowrank_config_validation(kwargs):
    with pytest.raises(ConfigError):
        LowRankConfig(**kwargs)


def test_lowrank_config_round_trips_json():
    for config in (LowRankConfig(rank=8), LowRankConfig(energy=1.0), LowRankConfig(ratio=0.3)):
        assert LowRankConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown key"):
        LowRankConfig.from_dict({**LowRankConfig(rank=8).to_dict(), "rnak": 3})


def _linear_with_singular_values(values: list[float], out_f: int = 12, in_f: int = 10) -> nn.Linear:
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(out_f, out_f, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, in_f, generator=gen, dtype=torch.float64))
    s = torch.zeros(out_f, in_f, dtype=torch.float64)
    s[range(len(values)), range(len(values))] = torch.tensor(values, dtype=torch.float64)
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        layer.weight.copy_((u @ s @ v.T).float())
    return layer


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.99, 1.0])
def test_energy_picks_the_fewest_values_keeping_that_share(energy):
    values = [8.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5, 0.25]
    layer = _linear_with_singular_values(values)
    rank = choose_rank(LowRankConfig(energy=energy), layer)
    share = torch.tensor(values).square().cumsum(0) / sum(v * v for v in values)
    assert share[rank - 1] >= energy - 1e-6, "keeps less than asked"
    if rank > 1:
        assert share[rank - 2] < energy, "not the fewest"


def test_energy_exactly_on_a_boundary():
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.diag(torch.tensor([3.0, 1.0, 0.0, 0.0])))  # σ² shares 0.9, 0.1
    assert choose_rank(LowRankConfig(energy=0.9), layer) == 1
    assert choose_rank(LowRankConfig(energy=1.0), layer) == 2


def test_energy_through_transform():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), _linear_with_singular_values([8.0, 4.0, 1.0, 0.5], 12, 12),
                          nn.ReLU(), nn.Linear(12, 3)).eval()
    vm = vcon_fx.transform(model, LowRankConfig(energy=0.9), example_inputs=(torch.randn(2, 10),))
    # 64/81.25 = 0.79 < 0.9 ≤ 80/81.25
    assert vm.meta["vcon"].plans["2"].detail["rank"] == 2


@pytest.mark.parametrize("shape,rank", [((32, 16), 4), ((300, 300), 8), ((640, 400), 16)])
def test_svd_of_zero_and_rank_deficient_weights(shape, rank):
    zero = torch.zeros(shape)
    a, b = truncated_svd(zero, rank)
    assert a.shape == (shape[0], rank) and b.shape == (rank, shape[1])
    assert torch.isfinite(a).all() and torch.isfinite(b).all() and torch.equal(a @ b, zero)

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(shape[0], 2, generator=gen) @ torch.randn(2, shape[1], generator=gen)  # rank 2 < r
    a, b = truncated_svd(low, rank)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a @ b - low).abs().max() <= 1e-4 * low.abs().max()


def test_zero_and_rank_deficient_layers_through_the_pipeline():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(),
                          nn.Linear(48, 3)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
        model[4].weight.copy_(torch.randn(48, 3) @ torch.randn(3, 48) / 10)
    x = torch.randn(4, 8)
    for config in (LowRankConfig(rank=4), LowRankConfig(energy=0.999)):
        vm = vcon_fx.transform(model, config, example_inputs=(x,))
        assert list(vcon_fx.get_betas(vm)) == ["2", "4"]
        ranks = {p: pl.detail["rank"] for p, pl in vm.meta["vcon"].plans.items()}
        if config.energy is not None:
            assert ranks == {"2": 1, "4": 3}
        assert_identity_at_beta_one(model, vm, ((x,), {}))
        vcon_fx.set_beta(vm, 0.0)
        # the rank covers the whole weight: the compressed model is the original
        torch.testing.assert_close(run(vm, ((x,), {})), run(model, ((x,), {})), atol=1e-5, rtol=1e-4)


def test_plan_changes_nothing_and_promises_the_vanished_size():
    case = make("mlp")
    compression_plan = vcon_fx.plan(case.model, CFG, example_inputs=case.args)
    assert [g.name for g in compression_plan.groups] == ["fc1", "fc2", "fc3"]
    assert not any(isinstance(m, vcon_fx.Blend) for m in case.model.modules())
    vm = vcon_fx.transform(case.model, CFG, example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    assert compression_plan.params_after == sum(p.numel() for p in small.parameters())


# ── error messages ───────────────────────────────────────────────────────────────────────


def test_everything_excluded_says_why():
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()  # only a stem and a head
    with pytest.raises(SelectionError) as err:
        vcon_fx.transform(model, LowRankConfig(rank=2), example_inputs=(torch.randn(2, 8),))
    assert "--include-stem" in str(err.value) or "--include-head" in str(err.value), str(err.value)


def test_a_bare_string_target_is_one_pattern():
    case = make("mlp")
    try:
        got = groups_of(case, targets="fc2")
    except UsageError:  # refusing it clearly is fine too
        return
    assert got == ["fc2"]


def test_find_sites_reuses_the_capture_check_shapes_only_for_the_same_inputs():
    from vcon_fx.graph.capture import capture
    from vcon_fx.graph.select import find_sites

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    gm = capture(model, (x,), mode="fx").gm
    calls = []
    handle = gm.get_submodule("0").register_forward_hook(lambda *_: calls.append(1))
    sites = find_sites(gm, (x,))
    assert calls == [] and sites["2"].out_shape == (3, 4)  # no forward: the check run's shapes
    sites = find_sites(gm, (torch.randn(5, 8),))
    assert calls == [1] and sites["2"].out_shape == (5, 4)  # other inputs: measured again
    handle.remove()


# ── stem and head by graph position ──────────────────────────────────────────────────────


class _ClipClassifier(nn.Module):
    """Conv3d features, then two Linears: the first weight layer is the Conv3d, whatever is targeted."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv3d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.features(x)).mean(dim=(2, 3, 4)))))


def test_a_layer_that_is_not_targeted_is_still_the_stem():
    """Targeting only Linears does not make the first Linear a stem: the Conv3d before it is."""
    model, x = _ClipClassifier().eval(), torch.randn(2, 3, 4, 8, 8)
    plan = vcon_fx.plan(model, LowRankConfig(rank=2), example_inputs=(x,), targets=("Linear",))
    assert [g.name for g in plan.groups] == ["fc1"]
    assert plan.selection.excluded["fc2"].startswith("last layer")
    assert plan.selection.excluded["features"].startswith("not matched")
    plan = vcon_fx.plan(model, LowRankConfig(rank=2), example_inputs=(x,))  # the Conv3d is the stem by default
    assert plan.selection.excluded["features"].startswith("first layer")


class _Defined(nn.Module):
    """Layers declared in another order than the data flows through them."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(16, 3)
        self.middle = nn.Linear(16, 16)
        self.inp = nn.Linear(6, 16)

    def forward(self, x):
        return self.out(torch.tanh(self.middle(torch.tanh(self.inp(x)))))


def test_stem_and_head_follow_the_data_not_the_declaration():
    plan = vcon_fx.plan(_Defined().eval(), LowRankConfig(rank=2), example_inputs=(torch.randn(2, 6),))
    assert [g.name for g in plan.groups] == ["middle"]
    assert plan.selection.excluded["inp"].startswith("first layer") and plan.selection.excluded["out"].startswith("last")


def test_a_token_embedding_is_the_stem_and_include_stem_compresses_it():
    case = make("lstm_lm")
    plan = vcon_fx.plan(case.model, CFG, example_kwargs=case.kwargs, seq_inputs=case.seq_inputs)
    assert plan.selection.excluded["embed"].startswith("first layer") and [g.name for g in plan.groups] == ["lstm", "proj"]
    plan = vcon_fx.plan(case.model, CFG, example_kwargs=case.kwargs, seq_inputs=case.seq_inputs, include_stem=True)
    assert [g.name for g in plan.groups] == ["embed", "lstm", "proj"]
