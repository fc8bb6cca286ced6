"""Fine-tuning a blended model: which branches learn, β schedules, and train/eval behaviour.

A short distillation run (Adam, random data, MSE to the original model's outputs) on the MLP
and the residual conv net. By default both branches learn, as in the authors' code;
`freeze_dense=True` trains only the compressed branch.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx import BetaSchedule, LowRankConfig
from vcon_fx.graph.blend import blend_modules

from helpers import assert_close_outputs, assert_params_promised, assert_vanish_parity, run
from zoo import MLP, make

STEPS = 5

TRAIN_CASES = [
    pytest.param("mlp", "layer", id="mlp-layer"),
    pytest.param("residual", "layer", id="residual-layer"),
    pytest.param("residual", "block", id="residual-block"),
]


def _transform(case, granularity: str, **options):
    blocks = {"blocks": ("layer1.*",)} if granularity == "block" else {}
    return vcon_fx.transform(case.model, LowRankConfig(ratio=0.25), example_inputs=case.args,
                             granularity=granularity, **blocks, **options)


def _finetune(vm, teacher, example: torch.Tensor, steps: int = STEPS, schedule: BetaSchedule | None = None,
              lr: float = 1e-3) -> list[float]:
    """Distill `teacher` into `vm` on random batches shaped like `example`; returns the losses."""
    params = [p for p in vm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(123)
    teacher.eval()
    vm.train()
    losses = []
    for _ in range(steps):
        x = torch.randn(example.shape, generator=gen)
        with torch.no_grad():
            target = teacher(x)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(vm(x), target)
        loss.backward()
        opt.step()
        if schedule is not None:
            schedule.step()
        losses.append(loss.item())
    vm.eval()
    return losses


def _split_params(vm):
    """(dense params, compressed params) over every Blend."""
    dense, comp = [], []
    for blend in blend_modules(vm).values():
        dense += [(f"{blend.group}.dense.{n}", p) for n, p in blend.dense.named_parameters()]
        comp += [(f"{blend.group}.compressed.{n}", p) for n, p in blend.compressed.named_parameters()]
    return dense, comp


def _nonzero_grad(p: torch.Tensor) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


@pytest.mark.parametrize("name,granularity", TRAIN_CASES)
def test_both_branches_learn_by_default(name, granularity):
    case = make(name)
    vm = _transform(case, granularity)
    vcon_fx.set_beta(vm, 0.5)
    dense, comp = _split_params(vm)
    assert dense and comp
    assert all(p.requires_grad for _, p in dense + comp)
    before = {n: p.detach().clone() for n, p in dense}
    losses = _finetune(vm, case.model, case.args[0])
    assert all(torch.isfinite(torch.tensor(losses)))
    no_grad = [n for n, p in dense + comp if not _nonzero_grad(p)]
    assert not no_grad, f"no gradient reached {no_grad[:4]}"
    assert any(not torch.equal(p, before[n]) for n, p in dense), "dense branch did not change"
    # the user's model is never trained through the blended copy
    assert_close_outputs(run(make(name).model, (case.args, {})), run(case.model, (case.args, {})), 0, "original model")


@pytest.mark.parametrize("name,granularity", TRAIN_CASES)
def test_freeze_dense_trains_only_the_compressed_branch(name, granularity):
    case = make(name)
    vm = _transform(case, granularity, freeze_dense=True)
    assert vm.meta["vcon"].freeze_dense
    vcon_fx.set_beta(vm, 0.5)
    dense, comp = _split_params(vm)
    assert not any(p.requires_grad for _, p in dense), [n for n, p in dense if p.requires_grad][:4]
    before = {n: p.detach().clone() for n, p in dense}
    _finetune(vm, case.model, case.args[0])
    assert all(p.grad is None for _, p in dense)
    assert all(torch.equal(p, before[n]) for n, p in dense), "a frozen dense parameter changed"
    no_grad = [n for n, p in comp if not _nonzero_grad(p)]
    assert not no_grad, f"no gradient reached {no_grad[:4]}"


def test_layers_outside_groups_still_train():
    """Stem and head stay dense but are not frozen (only Blend dense branches are, on request)."""
    case = make("mlp")
    vm = _transform(case, "layer", freeze_dense=True)
    assert vm.get_submodule("stem").weight.requires_grad and vm.get_submodule("head").weight.requires_grad


@pytest.mark.parametrize("name,granularity", TRAIN_CASES)
def test_schedule_reaches_zero_then_vanish(name, granularity):
    case = make(name)
    vm = _transform(case, granularity)
    schedule = BetaSchedule(vm, "linear", transition=STEPS - 2)
    assert set(vcon_fx.get_betas(vm).values()) == {1.0}
    seen = []
    _finetune(vm, case.model, case.args[0], schedule=schedule)
    seen.append(vcon_fx.get_betas(vm))
    assert schedule.done
    assert set(seen[-1].values()) == {0.0}
    # linear: β_t = max(1 − t/Q, 0), one value for every group
    assert schedule.beta_at(1) == {g: pytest.approx(1 - 1 / (STEPS - 2)) for g in seen[-1]}
    small = assert_vanish_parity(vm, (case.args, {}))
    assert_params_promised(small, case.model, small.meta["vcon"])


def test_vanish_refuses_open_transition():
    from vcon_fx.errors import StageError

    case = make("mlp")
    vm = _transform(case, "layer")
    schedule = BetaSchedule(vm, "linear", transition=4)
    schedule.step()
    with pytest.raises(StageError, match="β > 0"):
        vcon_fx.vanish(vm)
    small = vcon_fx.vanish(vm, force=True)  # drops the dense branch anyway
    assert vcon_fx.get_betas(small) == {}


# ── train() / eval() follow the original model ─────────────────────────────────────────────


def test_dropout_follows_train_and_eval():
    torch.manual_seed(0)
    model = MLP(dropout=0.5).eval()
    x = torch.randn(8, 16)
    vm = vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.5)
    vm.train()
    assert all(m.training for m in vm.modules())
    with torch.no_grad():
        a, b = vm(x), vm(x)
    assert not torch.equal(a, b), "dropout inactive in train mode"
    vm.eval()
    assert not any(m.training for m in vm.modules())
    vcon_fx.set_beta(vm, 1.0)
    with torch.no_grad():
        assert torch.equal(vm(x), vm(x))
    assert_close_outputs(run(model, ((x,), {})), run(vm, ((x,), {})), 1e-6, "eval mode vs original")


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_batchnorm_statistics_update_in_train_mode_only(granularity):
    case = make("residual")
    vm = _transform(case, granularity)  # β = 1: the dense path is the original network
    reference = copy.deepcopy(case.model)
    x = torch.randn(4, 3, 16, 16)

    def stats(model):
        return {n: b.clone() for n, b in model.named_buffers() if n.endswith("running_mean")}

    start = stats(vm)
    vm.eval()
    with torch.no_grad():
        vm(x)
    assert all(torch.equal(v, start[n]) for n, v in stats(vm).items()), "eval mode changed BN statistics"

    vm.train()
    reference.train()
    with torch.no_grad():
        out, ref = vm(x), reference(x)
    assert_close_outputs(ref, out, 1e-5, "train-mode forward vs original in train mode")
    moved = {n: v for n, v in stats(vm).items() if not torch.equal(v, start[n])}
    ref_stats = list(stats(reference).values())
    # exactly the original network's BN layers moved (at β = 1 a block's compressed twin does
    # not run), and each moved as the original's did
    assert len(moved) == len(ref_stats), sorted(moved)
    assert not [n for n in moved if ".compressed." in n]
    for name, value in moved.items():
        assert any(torch.allclose(value, r, atol=1e-6) for r in ref_stats), f"{name} moved unlike the original"
    # the user's model is untouched
    fresh = dict(make("residual").model.named_buffers())
    assert all(torch.equal(b, fresh[n]) for n, b in case.model.named_buffers())


def _every(named, check, what: str) -> None:
    """`check(name, param)` holds for every pair in `named`, which must not be empty (no vacuous pass)."""
    assert named, f"no parameter to check that {what}: the assertion would pass over an empty set"
    failed = [n for n, p in named if not check(n, p)]
    assert not failed, f"{what} fails for {failed[:4]}"


@pytest.mark.parametrize("config, shared_weights", [
    (LowRankConfig(ratio=0.25), False),
    (vcon_fx.QuantConfig(bits=4), True),  # the twin fake-quantizes the dense layer's own latent weight
    (vcon_fx.QuantConfig(bits=4, separate_weights=True), False),
], ids=["lowrank", "quant-shared", "quant-separate"])
def test_beta_zero_drops_the_dense_gradients_but_not_shared_weights(config, shared_weights):
    case = make("mlp")
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args)
    vcon_fx.set_beta(vm, 0.5)
    vm(torch.randn(case.args[0].shape)).pow(2).mean().backward()
    dense, comp = _split_params(vm)
    _every(dense, lambda n, p: p.grad is not None, "the dense branch gets gradients at β = 0.5")
    twin = {id(p) for _, p in comp}
    own = [(n, p) for n, p in dense if id(p) not in twin]
    shared = [(n, p) for n, p in dense if id(p) in twin]
    # either every dense weight is the twin's (shared quant) or none is: nothing in between
    assert (not own, not shared) == (shared_weights, not shared_weights), ([n for n, _ in own], [n for n, _ in shared])
    vcon_fx.set_beta(vm, 0.0)
    _every(comp, lambda n, p: p.grad is not None or not p.requires_grad, "the twin keeps its gradients at β = 0")
    before = {n: p.detach().clone() for n, p in dense}
    # a step with zero_grad(set_to_none=False): optimizers skip the released dense weights
    opt = torch.optim.Adam([p for p in vm.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad(set_to_none=False)
    vm(torch.randn(case.args[0].shape)).pow(2).mean().backward()
    opt.step()
    if shared_weights:
        # the latent weight is the twin's own: at β = 0 it still learns, through the compressed branch
        _every(shared, lambda n, p: _nonzero_grad(p), "a shared weight gets a gradient at β = 0")
        _every(shared, lambda n, p: not torch.equal(p, before[n]), "a shared weight changes at β = 0")
    else:
        _every(own, lambda n, p: p.grad is None, "a dense-only weight drops its gradient at β = 0")
        _every(own, lambda n, p: torch.equal(p, before[n]), "a dense-only weight stays unchanged at β = 0")
