"""The dense branch as a free teacher: --distill mixes distillation into the task loss, --match-groups
matches each group's compressed output to its dense branch; both stop when β reaches 0 unless asked."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.graph.blend import set_beta
from vcon_fx.training import FinetuneConfig
from vcon_fx.training.teacher import GroupMatch

STEPS, TRANSITION = 6, 3


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2, self.head = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(F.relu(self.stem(x)))))))


def blended(seed: int = 0):
    torch.manual_seed(seed)
    return vcon_fx.transform(MLP().eval(), vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(2, 8),))


def labelled(n: int = 64):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


@pytest.mark.parametrize("field,value", [("distill", 1.5), ("distill", -0.1), ("match_groups", -1.0),
                                         ("distill", True), ("match_groups", float("nan"))])
def test_weights_are_checked(field, value):
    with pytest.raises(ConfigError, match=field):
        FinetuneConfig(steps=1, **{field: value})


def test_distill_mixes_into_the_task_loss_during_the_transition_only():
    result = vcon_fx.finetune(blended(), labelled(), steps=STEPS, transition=TRANSITION, distill=0.5, batch_size=16)
    steps = [h for h in result.history if h.get("step", 0) > 0 and "loss" in h]
    during = [h for h in steps if h["beta"] > 0]
    after = [h for h in steps if h["beta"] == 0]
    assert during and after
    for h in during:
        parts = h["loss_parts"]
        assert set(parts) == {"task", "kl"} or set(parts) == {"task", "distill"}
        assert h["loss"] == pytest.approx(0.5 * parts["task"] + 0.5 * parts["distill"], rel=1e-5)
    assert all("loss_parts" not in h for h in after)


def test_teacher_after_keeps_the_terms_once_beta_is_zero():
    result = vcon_fx.finetune(blended(), labelled(), steps=STEPS, transition=TRANSITION, distill=0.5,
                              match_groups=0.2, teacher_after=True, batch_size=16)
    after = [h for h in result.history if h.get("step", 0) > 0 and h.get("beta") == 0]
    assert after and all({"distill", "match"} <= set(h["loss_parts"]) for h in after)


def test_group_match_is_the_relative_gap_and_trains_only_the_twin():
    torch.manual_seed(0)
    vm = vcon_fx.transform(MLP().eval(), vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(2, 8),),
                           targets=("fc1",))  # one group: nothing upstream of it is blended
    set_beta(vm, 0.5)
    x = torch.randn(16, 8)
    with GroupMatch(vm) as matcher:
        vm(x)
    loss = matcher.loss()
    with torch.no_grad():  # ‖c − d‖² / ‖d‖² of fc1's two branches on fc1's input
        h = F.relu(vm.stem(x))
        d, c = vm.fc1.dense(h), vm.fc1.compressed(h)
    assert loss.item() == pytest.approx(float((c - d).square().sum() / d.square().sum()), rel=1e-5)
    loss.backward()
    names = {n for n, p in vm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert names == {n for n, _ in vm.named_parameters() if n.startswith("fc1.compressed.")}, names


def test_match_groups_at_beta_one_runs_the_skipped_twin():
    vm = blended()  # β = 1: the Blend runs only the dense branch
    with GroupMatch(vm) as matcher:
        vm(torch.randn(4, 8))
    assert len(matcher.terms) == 2 and all(t.requires_grad for t in matcher.terms)


def test_the_cli_flags_reach_the_log(tmp_path):
    import numpy as np

    from vcon_fx.cli.main import main
    from vcon_fx.io.artifact import save
    from vcon_fx.sources.load import load_model

    torch.manual_seed(0)
    torch.export.save(torch.export.export(MLP().eval(), (torch.randn(2, 8),)), tmp_path / "mlp.pt2")
    lm = load_model(tmp_path / "mlp.pt2")
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=2), example_inputs=lm.example_args, source=lm.source)
    save(vm, tmp_path / "m.vcon")
    data = labelled()
    np.savez(tmp_path / "d.npz", inputs=data.tensors[0].numpy(), labels=data.tensors[1].numpy())
    code = main(["finetune", str(tmp_path / "m.vcon"), "--data", str(tmp_path / "d.npz"), "--steps", "4",
                 "--transition", "2", "--distill", "0.3", "--match-groups", "0.1", "--log", str(tmp_path / "log.jsonl"),
                 "-o", str(tmp_path / "m.tuned")])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first = next(r for r in records if r.get("step") == 1)
    assert {"task", "distill", "match"} <= set(first["loss_parts"])


def test_without_labels_the_dense_branch_stays_the_original_teacher():
    # Distilling to the model at β = 1 while that model's dense branch trains lets both branches drift
    # together (MiniLM's teacher fell to cosine 0.18 of the original); its own weights must stay fixed.
    vm = blended()
    x = labelled().tensors[0]
    blends = [m for m in vm.modules() if type(m).__name__ == "Blend"]
    dense = [p for m in blends for p in m.dense.parameters()]
    twin = [p for m in blends for p in m.compressed.parameters()]
    before_dense, before_twin = [p.detach().clone() for p in dense], [p.detach().clone() for p in twin]
    assert dense and all(p.requires_grad for p in dense)
    result = vcon_fx.finetune(vm, torch.utils.data.TensorDataset(x), steps=STEPS, transition=TRANSITION, lr=5e-2,
                              batch_size=16)
    assert result.loss == "mse" and result.metrics["after"] > result.metrics["before_compressed"]
    assert all(torch.equal(p, q) for p, q in zip(dense, before_dense))
    assert not all(torch.equal(p, q) for p, q in zip(twin, before_twin)), "the twins must have trained"
    assert all(p.requires_grad for p in dense), "the run must hand the weights back trainable"


def _prune_blended():
    torch.manual_seed(0)
    return vcon_fx.transform(MLP().eval(), vcon_fx.PruneConfig(sparsity=0.9), example_inputs=(torch.randn(2, 8),))


def test_without_labels_a_shared_weight_twin_learns_toward_the_original_not_a_collapse():
    # Pruned and quantized twins train the weights their dense branch reads: a teacher reading them
    # as they train lets ‖mask(W)x − Wx‖ shrink with W itself (MiniLM 4-bit fell from cosine 0.90 to 0.01).
    vm = _prune_blended()
    x = labelled(256).tensors[0]
    with torch.no_grad():
        set_beta(vm, 1.0)
        original = vm(x).clone()
    result = vcon_fx.finetune(vm, torch.utils.data.TensorDataset(x), steps=40, transition=0, lr=2e-2, batch_size=32)
    with torch.no_grad():
        set_beta(vm, 0.0)
        got = vm(x)
    error = float((got - original).norm() / original.norm())
    assert result.metrics["after"] > result.metrics["before_compressed"]
    assert error < 0.5, f"the pruned model drifted from the original ({error:.2f} relative error)"
    assert "_vcon_teacher_weights" not in vm.__dict__


def test_without_labels_resume_matches_an_unbroken_run(tmp_path):
    data = torch.utils.data.TensorDataset(labelled().tensors[0])
    whole = _prune_blended()
    vcon_fx.finetune(whole, data, steps=6, transition=3, lr=2e-2, batch_size=16)
    first = _prune_blended()
    vcon_fx.finetune(first, data, steps=6, transition=3, lr=2e-2, batch_size=16, save_every=3,
                     checkpoint_dir=str(tmp_path))
    import shutil
    shutil.rmtree(tmp_path / "step-6")
    resumed = _prune_blended()
    vcon_fx.finetune(resumed, data, steps=6, transition=3, lr=2e-2, batch_size=16, save_every=3,
                     checkpoint_dir=str(tmp_path), resume=True)
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
