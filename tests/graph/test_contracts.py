"""Pass contracts: each one catches the broken graph it is about, and the passes check them when asked.

Every contract gets a graph that breaks it (it must raise ContractError naming the culprit) and
the graph the pipeline makes (it must hold); then the debug switch (VCON_DEBUG_CONTRACTS=1 or
`contracts.enabled`) is shown to run them inside the passes.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import vcon_fx
from vcon_fx.errors import ContractError, VconError
from vcon_fx.graph import contracts
from vcon_fx.graph.blend import Blend
from vcon_fx.graph.normalize import normalize
from vcon_fx.graph.select import Group

from tiny_models import Blocky, Chain, Functional
from zoo import ConvBNReLU

X = torch.randn(5, 4)
CONFIG = vcon_fx.LowRankConfig(rank=2)


def blended(model=None, **options) -> fx.GraphModule:
    return vcon_fx.transform(model or Chain(), CONFIG, example_inputs=(X,), **options)


def test_contract_error_is_typed_and_an_assertion():
    assert issubclass(ContractError, VconError) and issubclass(ContractError, AssertionError)
    assert ContractError.exit_code == 1


def test_contracts_hold_on_what_the_pipeline_makes():
    for vm in (blended(), blended(Blocky(), granularity="block", blocks=("block",))):
        contracts.after_duplicate(vm)
        contracts.ensure_blend_branches_agree(vm, (X,))
        vcon_fx.set_beta(vm, 0.0)
        contracts.ensure_betas_at(vm, 0.0)
        contracts.after_vanish(vcon_fx.vanish(vm))


def test_ensure_lint_names_the_graph_that_breaks():
    vm = blended(Blocky(), granularity="block", blocks=("block",))
    branch = vm.block.compressed
    node = next(n for n in branch.graph.nodes if n.op == "call_module")
    node.target = "missing"  # a call of a module the branch does not hold
    with pytest.raises(ContractError, match="block.compressed"):
        contracts.ensure_lint(vm)


def test_ensure_normalized_names_a_functional_layer_left_behind():
    gm = fx.symbolic_trace(Functional())
    with pytest.raises(ContractError, match=r"node linear .*still a functional layer call"):
        contracts.ensure_normalized(gm)
    contracts.ensure_normalized(normalize(gm))


def test_require_group_layers_refuses_a_layer_in_two_groups_and_a_non_layer():
    gm = fx.symbolic_trace(Chain())
    contracts.require_group_layers(gm, [Group("fc1", "layer", "fc1", ["fc1"])])
    with pytest.raises(ContractError, match="layer fc1 is in two groups"):
        contracts.require_group_layers(gm, [Group("a", "layer", "fc1", ["fc1"]), Group("b", "layer", "fc1", ["fc1"])])
    with pytest.raises(ContractError, match="group g: layer stem.weight"):
        contracts.require_group_layers(gm, [Group("g", "layer", "stem", ["stem.weight"])])


def test_ensure_input_rms_refuses_a_wrong_width_or_a_negative_value():
    gm = fx.symbolic_trace(Chain())
    contracts.ensure_input_rms(gm, {"fc1": torch.ones(8)})
    with pytest.raises(ContractError, match=r"layer fc1: input RMS of shape \(4,\), expected \(8,\)"):
        contracts.ensure_input_rms(gm, {"fc1": torch.ones(4)})
    with pytest.raises(ContractError, match="layer fc2: .*negative or non-finite"):
        contracts.ensure_input_rms(gm, {"fc2": -torch.ones(8)})


def test_require_blend_groups_needs_blends_each_called_and_tagged():
    with pytest.raises(ContractError, match="no Blend module"):
        contracts.require_blend_groups(fx.symbolic_trace(Chain()))
    vm = blended()
    next(n for n in vm.graph.nodes if n.target == "fc1").meta["vcon"]["role"] = "dense"
    with pytest.raises(ContractError, match="calls Blend fc1 but is tagged role 'dense'"):
        contracts.require_blend_groups(vm)


def test_ensure_betas_catch_a_beta_written_around_set_beta():
    vm = blended()
    contracts.ensure_betas_at(vm, 1.0)
    vm.fc2.beta.fill_(1.5)  # the buffer alone: outside [0, 1], and out of step with its mirror
    with pytest.raises(ContractError, match=r"Blend fc2 \(group fc2\): β = 1.5 is outside \[0, 1\]"):
        contracts.ensure_betas_in_unit_interval(vm)
    vm.fc2.beta.fill_(0.5)
    with pytest.raises(ContractError, match="β mirror 1.0 != buffer 0.5"):
        contracts.ensure_betas_in_unit_interval(vm)


def test_ensure_blend_branches_agree_names_a_twin_of_the_wrong_width():
    vm = blended()
    vm.fc1.compressed = nn.Linear(8, 7)
    with pytest.raises(ContractError, match=r"Blend fc1: dense branch gives .*\(5, 8\).* compressed branch .*\(5, 7\)"):
        contracts.ensure_blend_branches_agree(vm, (X,))
    assert vm.training, "the check must restore train mode"


def test_ensure_no_dense_branch_names_a_blend_or_a_dense_node():
    vm = blended()
    with pytest.raises(ContractError, match="Blend fc1 remains"):
        contracts.ensure_no_dense_branch(vm)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    contracts.ensure_no_dense_branch(small)
    next(n for n in small.graph.nodes if n.op == "call_module").meta["vcon"] = {"role": "dense"}
    with pytest.raises(ContractError, match=r"node \w+ in <root> is tagged role 'dense'"):
        contracts.ensure_no_dense_branch(small)


# ── the debug switch ────────────────────────────────────────────────────────────────────────


def test_the_switch_follows_the_environment_and_the_context(monkeypatch):
    monkeypatch.delenv(contracts.ENV_VAR, raising=False)
    assert not contracts.active()
    monkeypatch.setenv(contracts.ENV_VAR, "1")
    assert contracts.active()
    with contracts.enabled(False):
        assert not contracts.active()
        with contracts.enabled(True):
            assert contracts.active()
        assert not contracts.active()
    monkeypatch.setenv(contracts.ENV_VAR, "0")
    assert not contracts.active()


def _spy(monkeypatch, names: list[str]) -> list[str]:
    """Wrap the named contracts so each call is recorded (the real check still runs)."""
    called: list[str] = []
    for name in names:
        real = getattr(contracts, name)
        monkeypatch.setattr(contracts, name, lambda *a, _real=real, _name=name, **k: (called.append(_name), _real(*a, **k))[1])
    return called


# what each step of the pipeline checks when contracts are on
STEP_CONTRACTS = {
    "transform": {"ensure_lint", "ensure_normalized", "require_group_layers", "ensure_input_rms", "after_duplicate",
                  "ensure_blend_branches_agree"},  # capture, normalize, select, calibrate, duplicate
    "set_beta": {"ensure_betas_in_unit_interval"},
    "vanish": {"require_blend_groups", "after_vanish"},
}


def _each_step(called: list[str]) -> dict[str, set[str]]:
    """Run transform (activation-aware, so calibrate runs), set_beta and vanish; the contracts each one checked."""
    seen = {}
    vm = vcon_fx.transform(Chain(), vcon_fx.LowRankConfig(rank=2, activation_aware=True), example_inputs=(X,))
    seen["transform"], called[:] = set(called), []
    vcon_fx.set_beta(vm, 0.0)
    seen["set_beta"], called[:] = set(called), []
    vcon_fx.vanish(vm)
    seen["vanish"] = set(called)
    return seen


def test_passes_check_their_contracts_when_switched_on(monkeypatch):
    monkeypatch.setenv(contracts.ENV_VAR, "1")
    called = _spy(monkeypatch, sorted(set().union(*STEP_CONTRACTS.values())))
    seen = _each_step(called)
    for step, wanted in STEP_CONTRACTS.items():
        assert wanted <= seen[step], f"{step} did not check {sorted(wanted - seen[step])}"


def test_passes_skip_their_contracts_when_switched_off(monkeypatch):
    monkeypatch.setenv(contracts.ENV_VAR, "1")
    called = _spy(monkeypatch, sorted(set().union(*STEP_CONTRACTS.values())))
    with contracts.enabled(False):
        seen = _each_step(called)
    assert seen == {"transform": set(), "set_beta": set(), "vanish": set()}


def test_a_broken_pass_is_caught_only_when_switched_on(monkeypatch):
    """A vanish that forgets to drop a Blend: with contracts on, the run stops there, naming it."""
    import vcon_fx.graph.vanish as vanish_module

    monkeypatch.setattr(vanish_module, "_materialize", lambda branch, method: Blend(nn.Identity(), branch, "leftover"))
    vm = blended()
    vcon_fx.set_beta(vm, 0.0)
    with contracts.enabled(False):
        vcon_fx.vanish(vm)  # unnoticed: the broken graph still runs
    with contracts.enabled(True), pytest.raises(ContractError, match="Blend fc1 remains"):
        vcon_fx.vanish(vm)


def test_contracts_hold_through_a_cnn_with_batch_norm():
    model, x = ConvBNReLU(), torch.randn(2, 3, 16, 16)
    with contracts.enabled(True):
        vm = vcon_fx.transform(model, vcon_fx.LowRankConfig(ratio=0.25), example_inputs=(x,))
        vcon_fx.set_beta(vm, 0.0)
        vcon_fx.vanish(vm)
