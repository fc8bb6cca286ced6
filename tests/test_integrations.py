"""VconCallback: a Hugging Face Trainer moves β along the schedule, one optimizer step at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError, StageError
from vcon_fx.graph.blend import get_betas
from vcon_fx.schedules.schedule import cosine_beta, linear_beta

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from vcon_fx.integrations.hf_trainer import VconCallback  # noqa: E402


class Classifier(nn.Module):
    """What Trainer expects: keyword inputs, and a dict with loss and logits."""

    def __init__(self, vm: nn.Module):
        super().__init__()
        self.vm = vm

    def forward(self, x, labels=None):
        logits = self.vm(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


def make_model() -> Classifier:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                        nn.Linear(16, 3))
    return Classifier(vcon_fx.transform(net, vcon_fx.LowRankConfig(rank=2), example_inputs=(torch.randn(2, 8),)))


def dataset(n: int = 32) -> list[dict]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=gen)
    return [{"x": x[i], "labels": int(x[i, 0] > 0)} for i in range(n)]


# Trainer itself needs accelerate (transformers' own requirement), the callback does not.
needs_trainer = pytest.mark.skipif(__import__("importlib").util.find_spec("accelerate") is None,
                                   reason="transformers.Trainer needs accelerate")


class Record(TrainerCallback):
    def __init__(self, model):
        self.model, self.betas = model, []

    def on_step_end(self, args, state, control, **kwargs):
        self.betas.append(next(iter(get_betas(self.model).values())))


def train(tmp_path, callback, steps=5, accumulate=1):
    model = make_model()
    record = Record(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=accumulate, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True, learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback, record])
    trainer.train()
    return model, record.betas, trainer


@needs_trainer
def test_beta_ends_where_the_schedule_says(tmp_path):
    callback = VconCallback(transition=8)
    model, seen, _ = train(tmp_path, callback, steps=5)
    assert seen == [linear_beta(t, 8) for t in range(1, 6)]
    assert set(get_betas(model).values()) == {linear_beta(5, 8)}


@needs_trainer
def test_default_transition_is_a_fifth_of_max_steps(tmp_path):
    model, seen, _ = train(tmp_path, VconCallback(), steps=5)  # Q = round(0.2 · 5) = 1
    assert seen == [0.0] * 5 and set(get_betas(model).values()) == {0.0}


@needs_trainer
def test_gradient_accumulation_steps_beta_per_optimizer_step(tmp_path):
    model, seen, _ = train(tmp_path, VconCallback(transition=4, schedule="cosine"), steps=3, accumulate=2)
    assert seen == [cosine_beta(t, 4) for t in range(1, 4)]


def test_callback_protocol_without_trainer():
    """The calls Trainer makes, by hand: begin (maybe resumed), then one on_step_end per optimizer step."""
    model = make_model()
    state = transformers.TrainerState(max_steps=10)
    control = transformers.TrainerControl()
    callback = VconCallback(transition=4)
    callback.on_train_begin(None, state, control, model=model)
    assert callback.betas == {g: 1.0 for g in get_betas(model)}
    for step in range(1, 4):
        state.global_step = step
        callback.on_step_end(None, state, control, model=model)
        assert set(get_betas(model).values()) == {linear_beta(step, 4)}
    logs = {}
    callback.on_log(None, state, control, logs=logs)
    assert logs["vcon_beta"] == linear_beta(3, 4)
    state.global_step = 2  # resumed from a Trainer checkpoint at step 2
    resumed = VconCallback(transition=4)
    fresh = make_model()
    resumed.on_train_begin(None, state, control, model=fresh)
    assert set(get_betas(fresh).values()) == {linear_beta(2, 4)}
    state = transformers.TrainerState(max_steps=10)
    VconCallback().on_train_begin(None, state, control, model=fresh)  # default Q = 2
    assert set(get_betas(fresh).values()) == {1.0}


def test_errors():
    with pytest.raises(ConfigError, match="unknown schedule"):
        VconCallback(schedule="sawtooth")
    callback = VconCallback(transition=2)
    state = transformers.TrainerState(max_steps=4)
    with pytest.raises(StageError, match="no Blend"):
        callback.on_train_begin(None, state, None, model=nn.Linear(2, 2))
