"""β schedules: curve shapes, staggering, abrupt Q = 0, resume, and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from vcon_fx.errors import ConfigError, StageError
from vcon_fx.graph.blend import Blend, get_betas, set_beta
from vcon_fx.schedules.schedule import (
    SCHEDULES,
    BetaSchedule,
    cosine_beta,
    default_transition,
    exp_beta,
    linear_beta,
    make_schedule,
    staggered_betas,
    step_beta,
)

Q = 100


def blended_model(n_groups: int = 2) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for g in range(n_groups):
        if g:
            layers.append(nn.ReLU())
        layers.append(Blend(nn.Linear(4, 4), nn.Linear(4, 4), group=f"g{g}"))
    return nn.Sequential(*layers)


def sequence(sched: BetaSchedule, n: int) -> list[dict[str, float]]:
    """The β the model holds after each of n steps (read from the model, not the schedule)."""
    out = []
    for _ in range(n):
        sched.step()
        out.append(get_betas(sched.model))
    return out


def check_shape(kind: str, **options) -> list[float]:
    """The invariants every curve honours: 1 at 0, non-increasing, in [0, 1], exactly 0 from Q."""
    sched = BetaSchedule(blended_model(3), kind, transition=Q, **options)
    if sched.wants_feedback:  # adaptive: β exists only step by step (here without observations)
        per_group = [list(sched.betas.values())] + [list(b.values()) for b in sequence(sched, Q + 19)]
    else:
        per_group = [list(sched.beta_at(t).values()) for t in range(Q + 20)]
    for g in range(len(sched.groups)):
        curve = [betas[g] for betas in per_group]
        assert curve[0] == 1.0
        assert all(0.0 <= b <= 1.0 for b in curve)
        assert all(a >= b for a, b in zip(curve, curve[1:])), f"{kind} not monotone"
        assert all(b == 0.0 for b in curve[Q:]), f"{kind} not exactly 0 from Q on"
        if kind != "staggered" or g == len(sched.groups) - 1:
            assert curve[Q - 1] > 0.0, f"{kind} reached 0 before Q"
    return [betas[0] for betas in per_group]


# ── shapes ────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind", SCHEDULES)
def test_every_kind_honours_the_invariants(kind):
    check_shape(kind)


@pytest.mark.parametrize(
    "kind, options",
    [("exp", {"beta_end": 0.05}), ("step", {"n_steps": 10}), ("staggered", {"overlap": 0.5}),
     ("staggered", {"curve": "cosine"}), ("staggered", {"curve": "step", "n_steps": 2})],
)
def test_invariants_hold_with_options(kind, options):
    check_shape(kind, **options)


def test_linear_is_the_papers_schedule():
    for t in range(Q + 10):
        assert linear_beta(t, Q) == pytest.approx(max(1 - t / Q, 0), abs=1e-15)
    assert [linear_beta(t, Q) for t in (0, 25, 50, 75, 100, 500)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


def test_cosine_values():
    assert cosine_beta(0, Q) == 1.0
    assert cosine_beta(50, Q) == pytest.approx(0.5)
    assert cosine_beta(25, Q) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_beta(Q, Q) == 0.0


def test_exp_reaches_beta_end_at_q_then_zero():
    assert exp_beta(0, Q) == 1.0
    assert exp_beta(50, Q, beta_end=0.01) == pytest.approx(0.1)
    assert exp_beta(Q - 1, Q) == pytest.approx(1e-3 ** 0.99)
    assert exp_beta(Q, Q) == 0.0
    # ratio between consecutive steps is constant: a true exponential
    ratios = [exp_beta(t + 1, Q) / exp_beta(t, Q) for t in range(Q - 1)]
    assert max(ratios) == pytest.approx(min(ratios))


def test_step_holds_then_drops_in_equal_stairs():
    values = [step_beta(t, Q) for t in range(Q + 1)]
    assert values[:25] == [1.0] * 25
    assert values[25:50] == [0.75] * 25
    assert values[50:75] == [0.5] * 25
    assert values[75:100] == [0.25] * 25
    assert values[100] == 0.0
    assert sorted(set(step_beta(t, 30, n_steps=3) for t in range(31))) == [0.0, 1 / 3, 2 / 3, 1.0]


def test_start_delays_the_transition():
    assert linear_beta(9, Q, start=10) == 1.0
    assert linear_beta(10, Q, start=10) == 1.0
    assert linear_beta(60, Q, start=10) == 0.5
    assert linear_beta(110, Q, start=10) == 0.0
    sched = BetaSchedule(blended_model(), "cosine", transition=Q, start=10)
    assert sched.end == 110
    assert sched.beta_at(10) == {"g0": 1.0, "g1": 1.0}
    assert sched.beta_at(60)["g0"] == pytest.approx(0.5)


def test_default_transition_is_20_percent():
    assert default_transition(1000) == 200
    assert default_transition(50) == 10
    assert default_transition(12) == 2
    assert default_transition(0) == 0


# ── staggered ─────────────────────────────────────────────────────────────────────────────────


def test_staggered_windows_run_input_to_output():
    # G = 4, no overlap: group g transitions over [25g, 25(g + 1)]
    assert staggered_betas(0, Q, 4) == [1.0, 1.0, 1.0, 1.0]
    assert staggered_betas(10, Q, 4) == pytest.approx([0.6, 1.0, 1.0, 1.0])
    assert staggered_betas(25, Q, 4) == [0.0, 1.0, 1.0, 1.0]
    assert staggered_betas(60, Q, 4) == pytest.approx([0.0, 0.0, 0.6, 1.0])
    assert staggered_betas(Q, Q, 4) == [0.0, 0.0, 0.0, 0.0]


def test_staggered_earlier_groups_reach_zero_first():
    sched = BetaSchedule(blended_model(4), "staggered", transition=Q)
    first_zero = {g: None for g in sched.groups}
    for t in range(Q + 1):
        for g, b in sched.beta_at(t).items():
            if b == 0.0 and first_zero[g] is None:
                first_zero[g] = t
    assert list(first_zero.values()) == [25, 50, 75, 100]
    # at every step, an earlier group's β is never above a later group's
    for t in range(Q + 1):
        values = list(sched.beta_at(t).values())
        assert values == sorted(values)


def test_staggered_overlap_widens_windows_and_still_ends_at_q():
    # G = 2, overlap 0.5: width w with w + w/2 = Q, so windows [0, 2Q/3] and [Q/3, Q]
    b = staggered_betas(50, 90, 2, overlap=0.5)
    assert b == pytest.approx([1 - 50 / 60, 1 - 20 / 60])
    assert staggered_betas(30, 90, 2, overlap=0.5)[1] == 1.0
    assert staggered_betas(90, 90, 2, overlap=0.5) == [0.0, 0.0]
    assert staggered_betas(89, 90, 2, overlap=0.9)[1] > 0.0


def test_staggered_with_one_group_is_its_curve():
    for t in range(0, Q + 1, 7):
        assert staggered_betas(t, Q, 1) == [pytest.approx(linear_beta(t, Q))]
        assert staggered_betas(t, Q, 1, curve="cosine") == [pytest.approx(cosine_beta(t, Q))]


# ── BetaSchedule on a model ───────────────────────────────────────────────────────────────────


def test_construction_sets_step_zero_and_step_advances():
    model = blended_model()
    set_beta(model, 0.3)
    sched = BetaSchedule(model, "linear", transition=4)
    assert sched.t == 0 and get_betas(model) == {"g0": 1.0, "g1": 1.0}
    seen = sequence(sched, 5)
    assert [s["g0"] for s in seen] == [0.75, 0.5, 0.25, 0.0, 0.0]
    assert sched.t == 5 and sched.done
    assert sched.betas == get_betas(model)


def test_abrupt_q_zero_is_compressed_from_step_zero():
    for kind in SCHEDULES:
        model = blended_model()
        sched = BetaSchedule(model, kind, transition=0)
        assert get_betas(model) == {"g0": 0.0, "g1": 0.0}, kind
        assert sched.done
        sched.step()
        assert get_betas(model) == {"g0": 0.0, "g1": 0.0}, kind


def test_abrupt_with_start_switches_at_start():
    model = blended_model()
    sched = BetaSchedule(model, "linear", transition=0, start=2)
    assert get_betas(model)["g0"] == 1.0
    assert [s["g0"] for s in sequence(sched, 3)] == [1.0, 0.0, 0.0]


def test_model_output_follows_beta():
    model = blended_model(1)
    x = torch.randn(3, 4)
    blend = model[0]
    with torch.no_grad():
        dense, comp = blend.dense(x), blend.compressed(x)
        sched = BetaSchedule(model, "linear", transition=4)
        assert torch.equal(model(x), dense)
        sched.step()
        assert torch.allclose(model(x), 0.75 * dense + 0.25 * comp, rtol=1e-6, atol=1e-7)
        sequence(sched, 3)
        assert torch.equal(model(x), comp)


def test_finished_schedule_writes_no_buffers(monkeypatch):
    model = blended_model()
    sched = BetaSchedule(model, "linear", transition=2)
    sequence(sched, 2)
    calls = []
    monkeypatch.setattr("vcon_fx.schedules.schedule.set_beta", lambda *a: calls.append(a))
    sequence(sched, 3)
    assert calls == []


@pytest.mark.parametrize(
    "kind, options",
    [("linear", {}), ("exp", {"beta_end": 0.01}), ("step", {"n_steps": 5}),
     ("staggered", {"overlap": 0.25, "curve": "cosine"})],
)
def test_state_dict_round_trip_resumes_the_same_sequence(kind, options):
    reference = BetaSchedule(blended_model(3), kind, transition=20, start=3, **options)
    expected = sequence(reference, 30)

    first = BetaSchedule(blended_model(3), kind, transition=20, start=3, **options)
    head = sequence(first, 12)
    state = json.loads(json.dumps(first.state_dict()))  # JSON-able

    # resume into a fresh model and a schedule built with other settings: the state wins
    model = blended_model(3)
    resumed = BetaSchedule(model, "linear", transition=999)
    resumed.load_state_dict(state)
    assert resumed.t == 12 and get_betas(model) == head[-1]
    assert head + sequence(resumed, 18) == expected

    again = BetaSchedule.from_state_dict(blended_model(3), state)
    assert again.state_dict() == state


def test_make_schedule_builds_each_kind():
    for name in SCHEDULES:
        sched = make_schedule(name, blended_model(), transition=10)
        assert isinstance(sched, BetaSchedule) and sched.kind == name
        assert name in repr(sched)


# ── errors ────────────────────────────────────────────────────────────────────────────────────


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown schedule 'sigmoid'.*linear, cosine, exp, step, staggered"):
        make_schedule("sigmoid", blended_model(), transition=10)
    with pytest.raises(ConfigError, match="unknown schedule"):
        BetaSchedule(blended_model(), "Linear", transition=10)


@pytest.mark.parametrize("bad", [-1, -0.5, 2.5, float("nan"), "10", True, None])
def test_bad_transition_is_rejected(bad):
    with pytest.raises(ConfigError, match="transition"):
        BetaSchedule(blended_model(), transition=bad)
    with pytest.raises(ConfigError, match="transition"):
        linear_beta(0, bad)


def test_bad_start_and_step_are_rejected():
    with pytest.raises(ConfigError, match="start"):
        BetaSchedule(blended_model(), transition=10, start=-3)
    with pytest.raises(ConfigError, match="step t"):
        BetaSchedule(blended_model(), transition=10).beta_at(-1)
    with pytest.raises(ConfigError, match="total_steps"):
        default_transition(-10)


@pytest.mark.parametrize(
    "kind, options, pattern",
    [
        ("linear", {"n_steps": 3}, "'linear' has no option 'n_steps'; its options are: none"),
        ("exp", {"rate": 2}, "its options are: beta_end"),
        ("exp", {"beta_end": 0.0}, "beta_end"),
        ("exp", {"beta_end": 1.0}, "beta_end"),
        ("step", {"n_steps": 0}, "n_steps"),
        ("step", {"n_steps": 2.0}, "n_steps"),
        ("staggered", {"overlap": 1.0}, r"overlap.*\[0, 1\)"),
        ("staggered", {"overlap": -0.1}, "overlap"),
        ("staggered", {"curve": "staggered"}, "unknown curve for staggered"),
        ("staggered", {"beta_end": 0.1}, "staggered accepts: overlap, curve"),
    ],
)
def test_bad_options_name_the_option(kind, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        BetaSchedule(blended_model(), kind, transition=10, **options)


def test_model_without_blends_is_a_stage_error():
    with pytest.raises(StageError, match="no Blend modules.*vcon_fx.transform"):
        BetaSchedule(nn.Linear(4, 4), transition=10)


def test_state_for_other_groups_or_version_is_rejected():
    state = BetaSchedule(blended_model(3), transition=10).state_dict()
    with pytest.raises(ConfigError, match="groups"):
        BetaSchedule(blended_model(2), transition=10).load_state_dict(state)
    with pytest.raises(ConfigError, match="version"):
        BetaSchedule(blended_model(3), transition=10).load_state_dict({**state, "version": 99})
    with pytest.raises(ConfigError, match="missing t"):
        BetaSchedule(blended_model(3), transition=10).load_state_dict(
            {k: v for k, v in state.items() if k != "t"}
        )


def test_errors_are_also_value_errors():
    with pytest.raises(ValueError):
        make_schedule("nope", blended_model(), transition=1)


# ── the registry ───────────────────────────────────────────────────────────────────────────


def test_state_dict_json_is_the_recorded_format():
    """The exact JSON a checkpoint records, per kind (checkpoints written before stay readable)."""
    sched = BetaSchedule(blended_model(2), "staggered", transition=10, curve="exp", beta_end=0.01)
    sched.step()
    assert json.dumps(sched.state_dict()) == (
        '{"version": 1, "kind": "staggered", "transition": 10, "start": 0, '
        '"options": {"overlap": 0.0, "curve": "exp", "beta_end": 0.01}, "groups": ["g0", "g1"], "t": 1}')
    assert BetaSchedule(blended_model(1), "step", transition=8).state_dict()["options"] == {"n_steps": 4}


def test_a_registered_curve_is_a_schedule_everywhere(monkeypatch):
    """Adding a schedule is one decorated function: BetaSchedule, staggered and the checks all see it."""
    from vcon_fx.schedules import registry

    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # the test's curve leaves with the test

    @registry.register_curve("square", defaults={"power": 2}, check=lambda o: {**o, "power": int(o["power"])})
    def _square(u, q, power):
        return (1.0 - u / q) ** power

    assert registry.registered_schedules() == SCHEDULES + ("square",)
    sched = BetaSchedule(blended_model(2), "square", transition=4, power=3.0)
    assert sched.options == {"power": 3}
    assert sequence(sched, 4) == [{"g0": b, "g1": b} for b in (0.421875, 0.125, 0.015625, 0.0)]
    staggered = BetaSchedule(blended_model(2), "staggered", transition=4, curve="square")
    assert staggered.beta_at(1) == {"g0": 0.25, "g1": 1.0}
    with pytest.raises(ConfigError, match="'square' has no option 'beta_end'; its options are: power"):
        BetaSchedule(blended_model(1), "square", transition=4, beta_end=0.1)
    with pytest.raises(ConfigError, match="registered twice"):
        registry.register_curve("linear")(lambda u, q: 0.0)


def test_unknown_schedule_names_every_registered_one():
    with pytest.raises(ConfigError, match="unknown schedule 'sawtooth'; choose one of linear, cosine, exp, step, "
                                          "staggered"):
        make_schedule("sawtooth", blended_model(1), transition=4)
    with pytest.raises(ConfigError, match="unknown curve for staggered 'staggered'; choose one of linear, cosine, "
                                          "exp, step"):
        BetaSchedule(blended_model(2), "staggered", transition=4, curve="staggered")
