"""The adaptive schedule: fast while a group's twin tracks, paused while the gap or loss rises,
always 0 by the end of the transition; deterministic, and resumed exactly from its state."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.graph.blend import Blend
from vcon_fx.schedules.schedule import BetaSchedule

Q = 10


def two_groups():
    return nn.Sequential(Blend(nn.Linear(4, 4), nn.Linear(4, 4), group="a"), Blend(nn.Linear(4, 4), nn.Linear(4, 4), group="b"))


def run(sched: BetaSchedule, gaps_at, losses, steps: int):
    seen = []
    for t in range(steps):
        sched.observe(gaps_at(t), losses[t] if t < len(losses) else 1.0)
        seen.append(sched.step())
    return seen


def test_a_tracking_group_falls_twice_as_fast_a_rising_gap_pauses_and_both_end_at_q():
    sched = BetaSchedule(two_groups(), "adaptive", transition=Q)
    # group a tracks closely (gap 0.01); group b's gap rises every step
    seen = run(sched, lambda t: {"a": 0.01, "b": 0.5 + 0.1 * t}, [1.0] * Q, Q)
    assert seen[1]["a"] == pytest.approx(1 - 2 * 2 / Q)          # two steps at rate 2
    assert seen[3]["b"] == pytest.approx(seen[0]["b"])           # paused since: its gap keeps rising
    assert seen[Q // 2 + 2]["b"] < 1.0                           # the deadline pulls it down
    assert seen[-1] == {"a": 0.0, "b": 0.0}


def test_a_rising_loss_pauses_every_group():
    sched = BetaSchedule(two_groups(), "adaptive", transition=Q)
    losses = [1.0, 1.0, 2.0, 2.0]
    seen = run(sched, lambda t: {"a": 0.5, "b": 0.5}, losses, 4)
    assert seen[1]["a"] == pytest.approx(1 - 2 / Q)   # two plain steps
    assert seen[2]["a"] == pytest.approx(seen[1]["a"])  # the loss jumped: paused


def test_state_dict_resumes_exactly():
    gaps = lambda t: {"a": 0.05 + 0.01 * (t % 3), "b": 0.3 - 0.01 * t}  # noqa: E731
    losses = [1.0 + 0.1 * ((t * 7) % 5) for t in range(Q)]
    whole = run(BetaSchedule(two_groups(), "adaptive", transition=Q), gaps, losses, Q)
    first = BetaSchedule(two_groups(), "adaptive", transition=Q)
    run(first, gaps, losses, 4)
    resumed = BetaSchedule.from_state_dict(two_groups(), first.state_dict())
    rest = [None] * 4
    for t in range(4, Q):
        resumed.observe(gaps(t), losses[t])
        rest.append(resumed.step())
    assert rest[4:] == whole[4:]


def test_unknown_options_and_other_steps_are_refused():
    with pytest.raises(ConfigError, match="no option 'speed'"):
        BetaSchedule(two_groups(), "adaptive", transition=Q, speed=2)
    sched = BetaSchedule(two_groups(), "adaptive", transition=Q)
    with pytest.raises(ConfigError, match="only its current β"):
        sched.beta_at(5)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2, self.head = nn.Linear(8, 24), nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 3)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(F.relu(self.stem(x)))))))


def test_finetune_with_the_adaptive_schedule_is_deterministic_ends_at_zero_and_resumes_exactly(tmp_path):
    def once(steps, folder, resume=False):
        torch.manual_seed(0)
        vm = vcon_fx.transform(MLP().eval(), vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(2, 8),))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=gen)
        data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
        return vm, vcon_fx.finetune(vm, data, steps=steps, transition=8, schedule="adaptive", batch_size=16,
                                    checkpoint_dir=tmp_path / folder, save_every=3, resume=resume)

    vm1, r1 = once(12, "a")
    assert all(b == 0.0 for b in r1.betas.values())
    betas = [h["betas"] for h in r1.history if "betas" in h]
    assert betas == [h["betas"] for h in once(12, "b")[1].history if "betas" in h]
    assert any(len(set(b.values())) > 1 for b in betas)  # the groups moved apart
    once(6, "c")
    vm3, r3 = once(12, "c", resume=True)
    assert r3.resumed_from == 6
    assert [h["betas"] for h in r3.history if "betas" in h and h["step"] > 6] == betas[-6:]
    for (name, a), (_, b) in zip(vm1.state_dict().items(), vm3.state_dict().items()):
        assert torch.equal(a, b), name
