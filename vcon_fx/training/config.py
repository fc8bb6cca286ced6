"""The settings of one fine-tuning run, as a frozen, self-checking, JSON-able config.

    config = FinetuneConfig(steps=1000, transition=200, lr=1e-3)
    vcon_fx.finetune(vm, "train.npz", config)            # or finetune(vm, "train.npz", steps=1000, …)
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..errors import ConfigError
from ..graph.precision import DTYPES
from ..schedules.registry import check_kind
from .evaluate import LOSSES

__all__ = ["FinetuneConfig", "training_batch_size", "DEFAULT_BATCH_SIZE"]


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a blended model while its β falls from 1 to 0.

    Args:
        steps: optimizer steps in all (including those of a resumed run).
        transition: Q, the steps over which β falls (default 20% of `steps`; 0 = abrupt).
        schedule: one of SCHEDULES; `schedule_options` are its options (e.g. beta_end).
        lr: Adam learning rate (constant).
        batch_size: examples per step on each process (None: 32, or the batch a model whose
            shapes were fixed at export runs at; see `training_batch_size`).
        loss: "auto" (task with labels, else distill), "task" (cross-entropy), "distill"
            (KL on logits when the model returns `logits`, else MSE), "mse" or "kl".
        eval_every: evaluate every this many steps (always before and after).
        seed: fixes data order and dropout, as functions of (seed, step).
        save_every: write a checkpoint every this many steps and at the end (needs
            `checkpoint_dir`). On SIGINT one is written whenever `checkpoint_dir` is given.
        checkpoint_dir: where checkpoints go (`step-N` folders; the newest two are kept).
        resume: continue from the newest checkpoint in `checkpoint_dir` (fresh start if none).
        log_path: a JSON-lines file, one object per step.
        device: "cpu", "cuda" (under torchrun: this rank's GPU), or a torch.device.
        schedule_options: the schedule's options (exp: beta_end; step: n_steps; staggered: …).
        gap_every: measure ‖dense − compressed‖ / ‖dense‖ per group every this many steps.
        num_workers: DataLoader worker processes.
        distill: with labels, the weight w of a distillation term from the dense branch (the same
            graph at β = 1, no second copy): loss = (1 − w)·task + w·distill (KL on logits, else MSE).
            Without labels the loss is pure distillation whatever w is.
        match_groups: the weight of a term matching each group's compressed output to its dense
            branch's (‖c − d‖² / ‖d‖², averaged over groups), added to the loss.
        teacher_after: keep `distill` and `match_groups` on after β reaches 0 (default: they stop
            there, with the transition).
        fsdp: under torchrun, shard the model over the processes with FSDP2 (each Blend a unit)
            instead of a whole DDP replica per process; checkpoints are sharded (`checkpoint.py`).
            Refused in one process and with `match_groups`.
        dtype: "fp32", "bf16" or "fp16": the model's weights (so its gradients and Adam states) are cast
            to it before training; β stays float32. None (default): the dtype it was transformed in.

    Raises:
        ConfigError: an invalid value (the message names the field and the fix).
    """

    steps: int
    transition: int | None = None
    schedule: str = "linear"
    lr: float = 1e-3
    batch_size: int | None = None
    loss: str = "auto"
    eval_every: int | None = None
    seed: int = 0
    save_every: int | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    log_path: str | None = None
    device: str | torch.device = "cpu"
    schedule_options: Mapping[str, Any] = field(default_factory=dict)
    gap_every: int = 10
    num_workers: int = 0
    distill: float = 0.0
    match_groups: float = 0.0
    teacher_after: bool = False
    fsdp: bool = False
    dtype: str | None = None

    def __post_init__(self):
        _whole("steps", self.steps, 1)
        if self.transition is not None:
            _whole("transition", self.transition, 0, " (0 = abrupt compression)")
        if self.batch_size is not None:
            _whole("batch_size", self.batch_size, 1)
        _whole("gap_every", self.gap_every, 1)
        for name in ("eval_every", "save_every"):
            if getattr(self, name) is not None:
                _whole(name, getattr(self, name), 1)
        for name in ("distill", "match_groups"):
            _weight(name, getattr(self, name), high=1.0 if name == "distill" else None)
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"lr must be a positive number, got {lr!r}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        check_kind(self.schedule)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)} (or None: the model's own), got {self.dtype!r}")
        if (self.save_every is not None or self.resume) and self.checkpoint_dir is None:
            raise ConfigError(f"{'resume' if self.resume else 'save_every'} needs checkpoint_dir: "
                              "say where checkpoints live")
        if not isinstance(self.schedule_options, Mapping):
            raise ConfigError(f"schedule_options must be a dict of the schedule's options, "
                              f"got {type(self.schedule_options).__name__}")
        # frozen: normalise through object.__setattr__ so that the config round-trips through JSON
        object.__setattr__(self, "lr", float(lr))
        object.__setattr__(self, "schedule_options", dict(self.schedule_options))
        if isinstance(self.device, torch.device):
            object.__setattr__(self, "device", str(self.device))
        for name in ("checkpoint_dir", "log_path"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))

    @staticmethod
    def of(config: "FinetuneConfig | None" = None, **options: Any) -> "FinetuneConfig":
        """`config` with `options` (FinetuneConfig fields) replaced, or a config built from `options` (pure).

        Raises:
            ConfigError: `config` is not a FinetuneConfig, or an option is not one of its fields.
        """
        known = [f.name for f in dataclasses.fields(FinetuneConfig)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"finetune has no option {unknown[0]!r}; its options are: {', '.join(known)}")
        if config is None:
            return FinetuneConfig(**options)
        if not isinstance(config, FinetuneConfig):
            raise ConfigError(f"config must be a FinetuneConfig, got {type(config).__name__}")
        return dataclasses.replace(config, **options) if options else config

    def to_dict(self) -> dict[str, Any]:
        """Every field as a JSON-able value (pure); `FinetuneConfig(**d)` gives the config back."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {
            "schedule_options": dict(self.schedule_options)}


def _whole(name: str, value: Any, low: int, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer ≥ {low}{hint}, got {value!r}")


def _weight(name: str, value: Any, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
            high is not None and value > high):
        upper = f"and ≤ {high:g}" if high is not None else ""
        raise ConfigError(f"{name} must be a number ≥ 0 {upper}, got {value!r}".replace("  ", " "))


DEFAULT_BATCH_SIZE = 32


def training_batch_size(inputs: Mapping[str, Any], requested: int | None) -> tuple[int, str | None]:
    """The batch size a run uses and, for a model with a fixed batch, the note that says why (pure).

    Args:
        inputs: the recipe's example-input spec; its "fixed" entry holds the sizes the graph fixed.
        requested: FinetuneConfig.batch_size (None: the default).

    Raises:
        ConfigError: a batch size other than the one the model runs at.
    """
    fixed = (inputs.get("fixed") or {}).get("batch")
    if fixed is None:
        return (DEFAULT_BATCH_SIZE if requested is None else requested), None
    if requested is not None and requested != fixed:
        raise ConfigError(f"batch_size {requested}: the model runs only at batch {fixed} (its shapes were fixed when it "
                          f"was exported): leave --batch-size out or pass --batch-size {fixed}")
    return fixed, (f"the model runs only at batch {fixed} (fixed at export): each training step takes {fixed} example(s), "
                   "drawn from the data reshuffled every epoch, so no step has a partial batch; evaluation pads its last "
                   "partial batch with repeated examples and scores only the real ones")
