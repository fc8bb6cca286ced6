"""Fine-tuning through the transition: losses, β per step, Q = 0, resume, SIGINT, NaN, DDP, the log."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.io.artifact import load
from vcon_fx.data.readers import TensorData
from vcon_fx.errors import ConfigError, DataError, StageError, TrainingError
from vcon_fx.training import FinetuneConfig
from vcon_fx.training.finetune import _StepBatches, finetune, latest_checkpoint
from vcon_fx.graph.blend import get_betas
from vcon_fx.schedules.schedule import cosine_beta, default_transition, linear_beta

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and a loaded 2-core machine does not slow them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyMLP(nn.Module):
    """stem → fc1 → fc2 → head: fc1 and fc2 get compressed twins."""

    def __init__(self, d_in: int = 8, hidden: int = 24, classes: int = 3, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Linear(d_in, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.drop(F.relu(self.fc1(x)))
        return self.head(F.relu(self.fc2(x)))


class LogitsMLP(TinyMLP):
    """The same, returning a dict with `logits` (as Hugging Face classifiers do)."""

    def forward(self, x):
        return {"logits": super().forward(x)}


def make_vm(cls=TinyMLP, seed: int = 0, dropout: float = 0.0):
    torch.manual_seed(seed)
    model = cls(dropout=dropout).eval()
    return vcon_fx.transform(model, vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(4, 8),)), model


def make_data(n: int = 48, labels: bool = True, seed: int = 1) -> TensorData:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorData(x, y if labels else None)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# ── losses ─────────────────────────────────────────────────────────────────────────────────


def test_task_loss_with_labels_trains_and_reports_accuracy():
    vm, _ = make_vm()
    result = finetune(vm, make_data(), steps=40, lr=1e-2, batch_size=16)
    assert result.loss == "task" and result.metric == "accuracy"
    assert set(result.metrics) == {"before", "before_compressed", "after"}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    assert result.metrics["after"] > result.metrics["before_compressed"]
    assert result.betas == {g: 0.0 for g in get_betas(vm)}  # Q = 20% of 40 steps: done
    assert [h["step"] for h in result.history] == list(range(41))
    losses = [h["loss"] for h in result.history[1:]]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not vm.training  # handed back in eval mode, as it came


def test_distillation_without_labels_uses_the_model_at_beta_1_as_teacher():
    vm, original = make_vm()
    result = finetune(vm, make_data(labels=False), steps=30, transition=10, batch_size=16)
    assert result.loss == "mse" and result.metric == "cosine"
    assert result.history[1]["loss"] == 0.0  # β = 1: the student is its own teacher, exactly
    assert result.history[2]["loss"] > 0.0
    assert result.metrics["before"] == 1.0
    assert 0.0 < result.metrics["before_compressed"] <= 1.0 + 1e-6
    assert result.metrics["after"] >= result.metrics["before_compressed"] - 1e-3
    assert len([m for m in vm.modules() if isinstance(m, vcon_fx.Blend)]) == 2  # no teacher copy was added


def test_distillation_uses_kl_on_logits():
    vm, _ = make_vm(LogitsMLP)
    result = finetune(vm, make_data(labels=False), steps=6, transition=3, batch_size=8)
    assert result.loss == "kl"
    assert result.history[1]["loss"] == pytest.approx(0.0, abs=1e-7)


def test_explicit_distill_ignores_labels_and_task_needs_them():
    vm, _ = make_vm()
    assert finetune(vm, make_data(), steps=3, loss="distill", batch_size=8).loss == "mse"
    vm, _ = make_vm()
    with pytest.raises(DataError, match="needs labels"):
        finetune(vm, make_data(labels=False), steps=3, loss="task")


# ── β ──────────────────────────────────────────────────────────────────────────────────────


def test_beta_follows_the_schedule_step_by_step():
    vm, _ = make_vm()
    seen = []
    result = finetune(vm, make_data(), steps=12, transition=8, batch_size=8, on_step=seen.append)
    # step t trains at the β of schedule step t − 1; after the last step β is the schedule's at `steps`
    assert [info["beta"] for info in seen] == [linear_beta(t - 1, 8) for t in range(1, 13)]
    assert all(set(info["betas"]) == {"fc1", "fc2"} for info in seen)
    assert result.betas == {"fc1": linear_beta(12, 8), "fc2": linear_beta(12, 8)} == get_betas(vm)

    vm, _ = make_vm()
    result = finetune(vm, make_data(), steps=5, transition=10, schedule="cosine", batch_size=8)
    assert result.betas["fc1"] == pytest.approx(cosine_beta(5, 10))


def test_staggered_schedule_moves_groups_in_turn():
    vm, _ = make_vm()
    seen = []
    finetune(vm, make_data(), steps=8, transition=8, schedule="staggered", batch_size=8, on_step=seen.append)
    mid = seen[4]["betas"]  # schedule step 4 of 8: fc1 done, fc2 starting
    assert mid["fc1"] == 0.0 and mid["fc2"] == 1.0


def test_default_transition_is_a_fifth_of_the_steps():
    vm, _ = make_vm()
    seen = []
    finetune(vm, make_data(), steps=10, batch_size=8, on_step=seen.append)
    q = default_transition(10)
    assert q == 2
    assert [i["beta"] for i in seen[:4]] == [1.0, 0.5, 0.0, 0.0]


def test_transition_zero_is_abrupt_compression():
    vm, original = make_vm()
    seen = []
    result = finetune(vm, make_data(), steps=5, transition=0, batch_size=8, on_step=seen.append)
    assert result.history[0]["beta"] == 0.0
    assert all(info["beta"] == 0.0 for info in seen)
    # the dense branch never ran in training, so it never changed; the gap is still measured
    assert torch.equal(vm.fc1.dense.weight, original.fc1.weight)
    assert not torch.equal(vm.fc1.compressed.up.weight, make_vm()[0].fc1.compressed.up.weight)
    assert "gap" in seen[0] and all(0.0 < g < 10.0 for g in seen[0]["gap"].values())


# ── log and callback ───────────────────────────────────────────────────────────────────────


def test_json_log_has_one_object_per_step(tmp_path):
    vm, _ = make_vm()
    log_path = tmp_path / "log.jsonl"
    finetune(vm, make_data(), steps=12, transition=6, batch_size=8, eval_every=5, log_path=log_path)
    rows = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(13))
    assert set(rows[0]["eval"]) == {"accuracy", "accuracy_compressed"}
    for r in rows[1:]:
        assert {"step", "beta", "betas", "loss", "lr", "elapsed"} <= set(r)
        assert r["lr"] == 1e-3 and math.isfinite(r["loss"])
    assert [r["step"] for r in rows if "gap" in r] == [1, 10, 12]
    assert set(rows[10]["gap"]) == {"fc1", "fc2"}
    assert [r["step"] for r in rows[1:] if "eval" in r] == [5, 10, 12]


# ── data order ─────────────────────────────────────────────────────────────────────────────


def test_batches_are_a_function_of_seed_and_step():
    full = _StepBatches(10, 4, 0, 1, seed=3, first=1, last=20)
    late = _StepBatches(10, 4, 0, 1, seed=3, first=7, last=20)
    assert list(full)[6:] == list(late)
    epoch = [i for t in range(1, 6) for i in full.indices(t)][:10]
    assert sorted(epoch) == list(range(10))  # one permutation per epoch
    ranks = [_StepBatches(10, 2, r, 2, seed=3, first=1, last=5) for r in range(2)]
    assert [i for r in ranks for i in r.indices(1)] == full.indices(1)  # rank slices tile the global batch
    assert _StepBatches(10, 4, 0, 1, seed=4, first=1, last=1).indices(1) != full.indices(1)


# ── checkpoints and resume ─────────────────────────────────────────────────────────────────


class Stop(Exception):
    pass


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    data = make_data()
    run = dict(steps=10, transition=4, batch_size=8, lr=1e-2, seed=7, save_every=5)

    straight, _ = make_vm(dropout=0.2)  # dropout: the RNG must resume too
    finetune(straight, data, checkpoint_dir=tmp_path / "a", **run)

    def die_at_7(info):
        if info["step"] == 7:
            raise Stop

    killed, _ = make_vm(dropout=0.2)
    with pytest.raises(Stop):
        finetune(killed, data, checkpoint_dir=tmp_path / "b", log_path=tmp_path / "b.jsonl", on_step=die_at_7, **run)
    assert latest_checkpoint(tmp_path / "b").name == "step-5"

    resumed, _ = make_vm(dropout=0.2)  # a fresh process would start from the artifact again
    result = finetune(resumed, data, checkpoint_dir=tmp_path / "b", log_path=tmp_path / "b.jsonl", resume=True, **run)
    assert result.resumed_from == 5 and result.steps == 10
    assert_same_weights(weights(straight), weights(resumed))
    assert [h["step"] for h in result.history] == list(range(11))
    logged = [json.loads(line)["step"] for line in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert logged == list(range(11))


def test_checkpoint_holds_no_pickle_and_loads_as_an_artifact(tmp_path):
    vm, original = make_vm()
    finetune(vm, make_data(), steps=4, batch_size=8, save_every=2, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-4"]
    step = tmp_path / "step-4"
    files = sorted(str(p.relative_to(step)) for p in step.rglob("*") if p.is_file())
    assert files == ["model/model.safetensors", "model/recipe.json", "optimizer.safetensors", "state.json"]
    state = json.loads((step / "state.json").read_text())
    assert state["step"] == 4 and state["schedule"]["t"] == 4
    again = load(step / "model", model=original)
    x = torch.randn(5, 8)
    assert torch.equal(again(x), vm(x))
    assert get_betas(again) == get_betas(vm)


def test_sigint_saves_a_checkpoint_then_raises(tmp_path):
    vm, _ = make_vm()
    handler = signal.getsignal(signal.SIGINT)

    def interrupt_at_3(info):
        if info["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt, match="step 3"):
        finetune(vm, make_data(), steps=50, batch_size=8, checkpoint_dir=tmp_path, on_step=interrupt_at_3)
    assert latest_checkpoint(tmp_path).name == "step-3"
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    result = finetune(vm, make_data(), steps=6, batch_size=8, checkpoint_dir=tmp_path, resume=True)
    assert result.resumed_from == 3 and result.steps == 6


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    vm, _ = make_vm()

    def poison_at_5(info):
        if info["step"] == 5:
            with torch.no_grad():
                vm.stem.weight.fill_(float("nan"))

    with pytest.raises(TrainingError, match=r"step 6.*step-4"):
        finetune(vm, make_data(), steps=20, batch_size=8, save_every=2, checkpoint_dir=tmp_path, on_step=poison_at_5)
    good = latest_checkpoint(tmp_path)
    assert good.name == "step-4"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(str(good / "model" / "model.safetensors")).values())


def test_resume_refuses_other_settings(tmp_path):
    vm, _ = make_vm()
    finetune(vm, make_data(), steps=4, batch_size=8, save_every=2, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="batch_size"):
        finetune(make_vm()[0], make_data(), steps=8, batch_size=4, checkpoint_dir=tmp_path, resume=True)


# ── errors ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=0), "steps"),
    (dict(steps=5, transition=-1), "transition"),
    (dict(steps=5, lr=0.0), "lr"),
    (dict(steps=5, loss="huber"), "loss"),
    (dict(steps=5, schedule="sawtooth"), "schedule"),
    (dict(steps=5, save_every=2), "checkpoint_dir"),
    (dict(steps=5, resume=True), "checkpoint_dir"),
])
def test_bad_arguments_are_config_errors(kwargs, match):
    vm, _ = make_vm()
    with pytest.raises(ConfigError, match=match):
        finetune(vm, make_data(), **kwargs)


def test_bad_config_fields_are_the_same_config_errors():
    with pytest.raises(ConfigError, match=r"batch_size must be an integer ≥ 1, got 0"):
        FinetuneConfig(steps=5, batch_size=0)
    with pytest.raises(ConfigError, match="unknown schedule 'sawtooth'; choose one of linear, cosine, exp, step, "
                                          "staggered"):
        FinetuneConfig(steps=5, schedule="sawtooth")
    with pytest.raises(ConfigError, match="schedule_options must be a dict"):
        FinetuneConfig(steps=5, schedule_options=[("beta_end", 0.1)])


def test_unknown_option_names_the_known_ones():
    vm, _ = make_vm()
    with pytest.raises(ConfigError, match=r"finetune has no option 'learning_rate'; its options are: steps, "
                                          r"transition, schedule, lr, batch_size, .*num_workers"):
        finetune(vm, make_data(), steps=2, learning_rate=0.1)
    with pytest.raises(ConfigError, match="config must be a FinetuneConfig, got dict"):
        finetune(vm, make_data(), {"steps": 2})


def test_config_round_trips_through_json_and_options_replace_its_fields(tmp_path):
    config = FinetuneConfig(steps=6, transition=3, schedule="exp", schedule_options={"beta_end": 0.01},
                            checkpoint_dir=tmp_path / "ckpt", save_every=2, device=torch.device("cpu"))
    data = json.loads(json.dumps(config.to_dict()))
    assert FinetuneConfig(**data) == config
    assert data["checkpoint_dir"] == str(tmp_path / "ckpt") and data["device"] == "cpu"
    assert FinetuneConfig.of(config, lr=0.5) == FinetuneConfig(**{**data, "lr": 0.5})
    assert FinetuneConfig.of(config) is config
    # a config and the same settings as keyword options train the same weights
    a, _ = make_vm()
    b, _ = make_vm()
    plain = FinetuneConfig(steps=4, transition=2, batch_size=8, lr=1e-2)
    finetune(a, make_data(), plain)
    finetune(b, make_data(), steps=4, transition=2, batch_size=8, lr=1e-2)
    assert_same_weights(weights(a), weights(b))
    assert get_betas(a) == get_betas(b) == {"fc1": 0.0, "fc2": 0.0}


def test_labels_out_of_range_and_wrong_stage():
    vm, _ = make_vm()
    bad = TensorData(torch.randn(8, 8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 0]))
    with pytest.raises(DataError, match="out of range.*3 outputs"):
        finetune(vm, bad, steps=2)
    vcon_fx.set_beta(vm, 0.0)
    with pytest.raises(StageError, match="vanished"):
        finetune(vcon_fx.vanish(vm), make_data(), steps=2)
    with pytest.raises(StageError, match="not a vcon model"):
        finetune(TinyMLP(), make_data(), steps=2)


# ── two processes ──────────────────────────────────────────────────────────────────────────

WORKER = """
import json, os, sys, torch
sys.path.insert(0, {tests!r})
from test_finetune import make_vm, make_data
from vcon_fx.training.finetune import finetune
torch.set_num_threads(1)
vm, _ = make_vm()
rank = int(os.environ["RANK"])
log = {out!r} + "/log.jsonl" if rank == 0 else None
ckpt = {out!r} + "/ckpt"
result = finetune(vm, make_data(), steps=6, transition=4, batch_size=4, lr=1e-2, log_path=log,
                  checkpoint_dir=ckpt, save_every=3)
json.dump({{"betas": [h["betas"] for h in result.history], "world": result.world_size,
           "weights": {{k: v.tolist() for k, v in vm.state_dict().items()}}}},
          open({out!r} + f"/rank{{rank}}.json", "w"))
"""


def test_two_process_gloo_run_keeps_beta_and_weights_identical(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER.format(tests=str(REPO / "tests"), out=str(tmp_path))))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2",
                           str(script)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["betas"] == r1["betas"]
    assert [b["fc1"] for b in r0["betas"]] == [1.0] + [linear_beta(t - 1, 4) for t in range(1, 7)]
    assert r0["weights"] == r1["weights"]  # DDP kept the replicas equal
    assert (tmp_path / "log.jsonl").is_file() and latest_checkpoint(tmp_path / "ckpt").name == "step-6"
