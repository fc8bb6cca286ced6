"""Fine-tuning through the transition: β falls 1 → 0 while the model trains.

    loss = cross-entropy(model(x), y)                    with labels ("task")
         = MSE / KL(model(x) ‖ model(x) at β = 1)        without ("distill": the same graph is its own teacher)

One optimizer step is one schedule step. Everything a step does is a pure function of
(seed, step, rank): its batch (a permutation per epoch) and its RNG (dropout), so a run that is
killed and resumed from a checkpoint ends with the same weights as one that was not
(`vcon_fx.batches`).

Checkpoints (`checkpoint_dir/step-N/`) hold no pickle: the model as a vcon artifact
(`model/`), optimizer tensors in `optimizer.safetensors`, everything else (schedule, optimizer
hyper-parameters, a compact history) in `state.json`. Each is written to a temporary folder and
renamed; the newest two are kept (`vcon_fx.checkpoint`).

Under `torchrun` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU);
each rank takes its slice of every global batch, β is the same on every rank (the schedule is
a pure function of the step; checked), and only rank 0 writes files (`vcon_fx.distributed`).
The loss, the metric and the per-group gap are measured as `vcon_fx.evaluate` describes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn
from torch.utils.data import Dataset, Subset, default_collate

from .batches import StepBatches, mix_seed, split_batch, to_device
from .checkpoint import CHECKPOINT_FORMAT, latest_checkpoint, load_checkpoint, save_checkpoint
from .distributed import Distributed
from ..errors import ConfigError, DataError, StageError, TrainingError
from .evaluate import LOSSES, GapProbe, at_beta, choose_loss, eval_mode, evaluate, prediction, training_loss
from ..graph.blend import blend_modules, get_betas
from ..io.recipe import recipe_of
from ..schedules.schedule import SCHEDULES, default_transition, make_schedule

__all__ = ["finetune", "FinetuneResult", "LOSSES", "latest_checkpoint", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

_EVAL_SUBSET = 1024            # without eval data, the metric is measured on this many training examples

# The batch sampler under its former name: tests and benchmarks/accuracy.py import it from here.
_StepBatches = StepBatches


@dataclass
class FinetuneResult:
    """What a fine-tuning run did.

    Attributes:
        metric: "accuracy" (labelled eval data) or "cosine" (to the original, β = 1, outputs).
        metrics: before (at β = 1, the original model), before_compressed (at β = 0, untrained:
            abrupt compression without fine-tuning), after (at the final β).
        history: one dict per step (the JSON log's objects), step 0 being the start.
        betas: β per group after the last step.
        steps: the step reached.
        loss: "task", "mse" or "kl".
        final_loss: the last step's loss (mean over ranks).
        resumed_from: the checkpoint step this run continued from, or None.
        checkpoint: the newest checkpoint folder written or read, or None.
        eval_on: "eval" or "train" (a training subset, when no eval data was given).
    """

    metric: str
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    betas: dict[str, float]
    steps: int
    loss: str
    final_loss: float | None = None
    resumed_from: int | None = None
    checkpoint: str | None = None
    eval_on: str = "eval"
    rank: int = 0
    world_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def finetune(
    vm: fx.GraphModule,
    train_data: Dataset | str | os.PathLike,
    *,
    steps: int,
    transition: int | None = None,
    schedule: str = "linear",
    lr: float = 1e-3,
    batch_size: int = 32,
    loss: str = "auto",
    eval_data: Dataset | str | os.PathLike | None = None,
    eval_every: int | None = None,
    seed: int = 0,
    save_every: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log_path: str | os.PathLike | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    device: str | torch.device = "cpu",
    schedule_options: Mapping[str, Any] | None = None,
    gap_every: int = 10,
    num_workers: int = 0,
) -> FinetuneResult:
    """Train a blended model while its β follows a schedule from 1 to 0 (in place on `vm`).

    Args:
        vm: a blended vcon model (from `vcon_fx.transform` or `vcon_fx.load`).
        train_data: a Dataset (items `(x, y)`, `x`, or dicts of keyword inputs) or a data path
            for `vcon_fx.data.load_data`.
        steps: optimizer steps in all (including those of a resumed run).
        transition: Q, the steps over which β falls (default 20% of `steps`; 0 = abrupt).
        schedule: one of SCHEDULES; `schedule_options` are its options (e.g. beta_end).
        lr: Adam learning rate (constant).
        batch_size: examples per step on each process.
        loss: "auto" (task with labels, else distill), "task" (cross-entropy), "distill"
            (KL on logits when the model returns `logits`, else MSE), "mse" or "kl".
        eval_data: measured before, every `eval_every` steps and after (default: up to 1024
            training examples).
        seed: fixes data order and dropout, as functions of (seed, step).
        save_every: write a checkpoint every this many steps and at the end (needs
            `checkpoint_dir`). On SIGINT one is written whenever `checkpoint_dir` is given.
        checkpoint_dir: where checkpoints go (`step-N` folders; the newest two are kept).
        resume: continue from the newest checkpoint in `checkpoint_dir` (fresh start if none).
        log_path: a JSON-lines file, one object per step.
        on_step: called after every step with the step's dict (step, beta, betas, loss, lr,
            elapsed, gap every `gap_every` steps, eval when measured).
        device: "cpu", "cuda" (under torchrun: this rank's GPU), or a torch.device.
        gap_every: measure ‖dense − compressed‖ / ‖dense‖ per group every this many steps.
        num_workers: DataLoader worker processes.

    Returns:
        A FinetuneResult; `vm` holds the trained weights and the final β, in eval mode.

    Raises:
        ConfigError: an invalid argument, or a checkpoint made with other settings.
        DataError: unusable data (task loss without labels, labels out of range, …).
        StageError: `vm` is not a blended vcon model.
        TrainingError: the loss became NaN/Inf (the last good checkpoint is kept).
        KeyboardInterrupt: on SIGINT, after a checkpoint of the step in progress is saved.

    Example:
        >>> result = finetune(vm, "train.npz", steps=1000, transition=200)
        >>> result.betas, result.metrics["after"]
    """
    _check_args(steps, transition, lr, batch_size, loss, eval_every, save_every, checkpoint_dir, resume, gap_every,
                schedule)
    recipe = recipe_of(vm)
    if recipe.stage != "blended" or not blend_modules(vm):
        raise StageError(f"the model is {recipe.stage}: there is no β left to schedule; fine-tune the compressed model "
                         "with plain PyTorch, or fine-tune before `vanish`")
    transition = default_transition(steps) if transition is None else int(transition)
    if transition > steps:
        log.warning("transition %d is longer than the run (%d steps): β will end above 0", transition, steps)

    train_data = _as_dataset(vm, train_data, "train")
    eval_on = "eval"
    if eval_data is None:
        eval_on = "train"
        eval_data = train_data if len(train_data) <= _EVAL_SUBSET else Subset(train_data, range(_EVAL_SUBSET))
    else:
        eval_data = _as_dataset(vm, eval_data, "eval")

    with Distributed(device) as dist:
        run = _Run(vm, train_data, eval_data, dist, steps=steps, transition=transition, schedule=schedule, lr=lr,
                   batch_size=batch_size, loss=loss, eval_every=eval_every, seed=seed, save_every=save_every,
                   checkpoint_dir=checkpoint_dir, resume=resume, log_path=log_path, on_step=on_step,
                   schedule_options=dict(schedule_options or {}), gap_every=gap_every, num_workers=num_workers,
                   eval_on=eval_on)
        return run.train()


# ── argument checks ────────────────────────────────────────────────────────────────────────


def _check_args(steps, transition, lr, batch_size, loss, eval_every, save_every, checkpoint_dir, resume, gap_every,
                schedule):
    def whole(name, value, low, hint=""):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer ≥ {low}{hint}, got {value!r}")

    whole("steps", steps, 1)
    if transition is not None:
        whole("transition", transition, 0, " (0 = abrupt compression)")
    whole("batch_size", batch_size, 1)
    whole("gap_every", gap_every, 1)
    for name, value in (("eval_every", eval_every), ("save_every", save_every)):
        if value is not None:
            whole(name, value, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if loss not in LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if (save_every is not None or resume) and checkpoint_dir is None:
        raise ConfigError(f"{'resume' if resume else 'save_every'} needs checkpoint_dir: say where checkpoints live")


def _as_dataset(vm, data, what: str) -> Dataset:
    if isinstance(data, (str, os.PathLike)):
        from .model_data import load_data_for

        return load_data_for(vm, data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise DataError(f"{what} data must be a Dataset (with __len__ and __getitem__) or a path, "
                        f"got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{what} data holds no examples: give at least one")
    return data


# ── the run ────────────────────────────────────────────────────────────────────────────────


class _Run:
    def __init__(self, vm, train_data, eval_data, dist: Distributed, *, steps, transition, schedule, lr, batch_size,
                 loss, eval_every, seed, save_every, checkpoint_dir, resume, log_path, on_step, schedule_options,
                 gap_every, num_workers, eval_on):
        self.vm, self.train_data, self.eval_data, self.dist = vm, train_data, eval_data, dist
        self.steps, self.transition, self.schedule_kind, self.lr = steps, transition, schedule, float(lr)
        self.batch_size, self.eval_every, self.seed = batch_size, eval_every, seed
        self.save_every, self.resume, self.on_step = save_every, resume, on_step
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.log_path = Path(log_path) if log_path is not None else None
        self.schedule_options, self.gap_every, self.num_workers = schedule_options, gap_every, num_workers
        self.eval_on, self.loss_requested = eval_on, loss
        self.device = dist.device
        self.history: list[dict[str, Any]] = []
        self.metrics: dict[str, float] = {}
        self.signalled = False  # set by the SIGINT handler, on this rank
        self.stop = False       # agreed by every rank (one signalled), so all stop after the same step
        self.last_checkpoint: Path | None = None
        self._log = None

    # ── set-up ───────────────────────────────────────────────────────────────────────────

    def train(self) -> FinetuneResult:
        vm = self.vm
        was_training = vm.training
        vm.to(self.device)
        self._probe_batches()
        first_args, first_kwargs, first_labels = split_batch(default_collate([self.train_data[0]]))
        self.loss_kind = choose_loss(self.loss_requested, vm, first_args, first_kwargs, first_labels, self.device)
        self.metric = "accuracy" if split_batch(default_collate([self.eval_data[0]]))[2] is not None else "cosine"
        self.num_classes = self._check_labels(first_args, first_kwargs)

        self.schedule = make_schedule(self.schedule_kind, vm, transition=self.transition, **self.schedule_options)
        self.params = [p for p in vm.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters (all frozen): unfreeze some before fine-tuning")
        self.optimizer = torch.optim.Adam(self.params, lr=self.lr)
        start = self._restore() if self.resume else 0
        self.t0 = time.monotonic()
        try:
            self._open_log(start)
            self._check_betas_agree()
            model = self.dist.wrap(vm)
            if start == 0:
                self._evaluate_start()
            with self._sigint():
                self._loop(model, start)
            if "after" not in self.metrics:  # resumed at the end: no step ran
                self.metrics["after"] = self._evaluate()
            if self.save_every and self.schedule.t > start:
                self._save(self.schedule.t)
        finally:
            if self._log is not None:
                self._log.close()
            vm.train(was_training)
        final_loss = next((h["loss"] for h in reversed(self.history) if "loss" in h), None)
        return FinetuneResult(metric=self.metric, metrics=dict(self.metrics), history=self.history,
                              betas=get_betas(vm), steps=self.schedule.t, loss=self.loss_kind, final_loss=final_loss,
                              resumed_from=start or None,
                              checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                              eval_on=self.eval_on, rank=self.dist.rank, world_size=self.dist.world)

    def _probe_batches(self) -> None:
        """One forward at 1 and at batch_size examples: a model that cannot take them fails here, in one line."""
        for n in sorted({1, min(self.batch_size, len(self.train_data))}):
            args, kwargs, _ = split_batch(default_collate([self.train_data[i] for i in range(n)]))
            try:
                with torch.no_grad(), eval_mode(self.vm):
                    self.vm(*to_device(args, self.device), **to_device(kwargs, self.device))
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                raise DataError(
                    f"the model does not run on a batch of {n} example(s) ({type(exc).__name__}: "
                    f"{lines[0][:200] if lines else ''}); a .pt2 exported with a fixed batch size runs only at that "
                    "size: re-export it with dynamic_shapes={'x': {0: torch.export.Dim.DYNAMIC}}"
                ) from None

    def _check_labels(self, args, kwargs) -> int | None:
        """The model's class count, after checking every label the data keeps apart lies below it."""
        if self.loss_kind != "task" and self.metric != "accuracy":
            return None
        with torch.no_grad(), eval_mode(self.vm):
            pred = prediction(self.vm(*to_device(args, self.device), **to_device(kwargs, self.device)))
        if pred.dim() < 2:
            raise DataError(f"the model's output has shape {tuple(pred.shape)}, not (N, classes): labels cannot be "
                            "used; drop them to distill from the original model")
        classes = int(pred.shape[-1])
        from ..data.readers import check_labels, dataset_labels

        for name, ds in (("training", self.train_data), ("eval", self.eval_data)):
            base = ds.dataset if isinstance(ds, Subset) else ds
            check_labels(f"{name} data", dataset_labels(base), classes)
        return classes

    # ── the loop ─────────────────────────────────────────────────────────────────────────

    def _loop(self, model: nn.Module, start: int) -> None:
        batches = StepBatches(len(self.train_data), self.batch_size, self.dist.rank, self.dist.world, self.seed,
                              start + 1, self.steps)
        loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=batches, num_workers=self.num_workers,
                                             collate_fn=default_collate)
        model.train()
        for t, batch in zip(range(start + 1, self.steps + 1), loader):
            self._step(model, t, batch)
            if self.stop or (self.dist.world == 1 and self.signalled):
                raise self._interrupt(t)

    def _step(self, model: nn.Module, t: int, batch) -> None:
        vm = self.vm
        args, kwargs, labels = split_batch(batch)
        if self.loss_kind == "task":
            bad = (labels != -100) & ((labels < 0) | (labels >= self.num_classes))
            if bool(bad.any()):
                raise DataError(f"step {t}: label {int(labels[bad][0])} is out of range for a model with "
                                f"{self.num_classes} outputs (classes 0…{self.num_classes - 1}): renumber the labels")
        args, kwargs = to_device(args, self.device), to_device(kwargs, self.device)
        labels = to_device(labels, self.device)
        betas = get_betas(vm)
        measure_gap = t == 1 or t % self.gap_every == 0 or t == self.steps
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(mix_seed(self.seed, t, self.dist.rank))
            with GapProbe(vm) if measure_gap else contextlib.nullcontext() as probe:
                out = model(*args, **kwargs)
            loss = training_loss(self.loss_kind, vm, out, args, kwargs, labels)
            total, signalled = self.dist.sum([float(loss.detach()), float(self.signalled)])
            mean_loss = total / self.dist.world
            if not math.isfinite(mean_loss):
                raise self._diverged(t, mean_loss, betas)
            self.stop = signalled > 0
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.schedule.step()
        info: dict[str, Any] = {
            "step": t,
            "beta": sum(betas.values()) / len(betas),
            "betas": betas,
            "loss": mean_loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "elapsed": round(time.monotonic() - self.t0, 4),
        }
        if measure_gap:
            info["gap"] = probe.gaps()
            self._check_betas_agree()
        if (self.eval_every and t % self.eval_every == 0) or t == self.steps:
            value = self._evaluate()
            info["eval"] = {self.metric: value}
            if t == self.steps:
                self.metrics["after"] = value
        self._record(info)
        if self.save_every and t % self.save_every == 0 and t != self.steps:
            self._save(t)

    # ── evaluation ───────────────────────────────────────────────────────────────────────

    def _evaluate_start(self) -> None:
        with at_beta(self.vm, 1.0):
            before = 1.0 if self.metric == "cosine" else self._evaluate()
        with at_beta(self.vm, 0.0):
            compressed = self._evaluate()
        self.metrics.update(before=before, before_compressed=compressed)
        betas = get_betas(self.vm)
        self._record({"step": 0, "beta": sum(betas.values()) / len(betas), "betas": betas,
                      "eval": {self.metric: before, f"{self.metric}_compressed": compressed}})

    def _evaluate(self) -> float:
        return evaluate(self.vm, self.eval_data, self.metric, batch_size=self.batch_size, device=self.device,
                        dist=self.dist)

    # ── records ──────────────────────────────────────────────────────────────────────────

    def _open_log(self, start: int) -> None:
        if self.log_path is None or not self.dist.main:
            return
        from ..io.atomic import write_text_atomic

        if start and self.log_path.is_file():
            # A resumed run keeps the steps up to its checkpoint and drops those after it.
            kept = []
            for line in self.log_path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= start:
                        kept.append(line)
                except json.JSONDecodeError:
                    break
            write_text_atomic(self.log_path, "".join(f"{ln}\n" for ln in kept))
        else:
            write_text_atomic(self.log_path, "")
        self._log = self.log_path.open("a")

    def _record(self, info: dict[str, Any]) -> None:
        info = {k: v for k, v in info.items()}
        self.history.append(info)
        if self._log is not None:
            self._log.write(json.dumps(info) + "\n")
            self._log.flush()
        if self.on_step is not None and info["step"] > 0:
            self.on_step(dict(info, rank=self.dist.rank))

    def _logged_history(self, upto: int) -> list[dict[str, Any]]:
        """The full records of steps 0..upto from an earlier run's JSON log, if it has them all."""
        if self.log_path is None or not self.log_path.is_file():
            return []
        rows = []
        for line in self.log_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row.get("step", -1) <= upto:
                rows.append(row)
        return rows if [r.get("step") for r in rows] == list(range(upto + 1)) else []

    def _check_betas_agree(self) -> None:
        if self.dist.world == 1:
            return
        mine = list(get_betas(self.vm).values())
        every = self.dist.gather(mine)
        if any(other != every[0] for other in every):
            raise TrainingError(f"β differs between ranks at step {self.schedule.t} ({every[0][:4]} on rank 0, "
                                "others differ): every rank must load the same model and checkpoint")

    def _diverged(self, t: int, value: float, betas: dict[str, float]) -> TrainingError:
        beta = sum(betas.values()) / len(betas)
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        return TrainingError(f"the loss is {value} at step {t} (β {beta:.3f}): lower the learning rate (now {self.lr:g}) "
                             f"or check the data{kept}")

    # ── checkpoints ──────────────────────────────────────────────────────────────────────

    def _run_settings(self) -> dict[str, Any]:
        return {"steps": self.steps, "lr": self.lr, "batch_size": self.batch_size, "loss": self.loss_kind,
                "seed": self.seed, "world_size": self.dist.world, "schedule": self.schedule_kind}

    def _save(self, t: int) -> None:
        if self.checkpoint_dir is None:
            return
        if self.dist.main:
            save_checkpoint(self.checkpoint_dir, t, self.vm, self.optimizer, self.schedule, run=self._run_settings(),
                            seed=self.seed, metrics=self.metrics, history=self.history)
        self.last_checkpoint = self.checkpoint_dir / f"step-{t}"

    def _restore(self) -> int:
        found = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
        if found is None:
            log.info("no checkpoint in %s: starting from step 0", self.checkpoint_dir)
            return 0
        state = load_checkpoint(found, self.vm, self.optimizer, self.schedule, run=self._run_settings(),
                                device=self.device)
        self.metrics = dict(state.get("metrics", {}))
        step = int(state["step"])
        self.history = self._logged_history(step) or list(state.get("history", []))
        self.last_checkpoint = found
        log.info("resumed from %s (step %d)", found, step)
        return step

    # ── SIGINT ───────────────────────────────────────────────────────────────────────────

    @contextlib.contextmanager
    def _sigint(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            # Finish the step in progress, save, then raise; a second ^C stops at once.
            self.signalled = True
            signal.signal(signal.SIGINT, previous)

        previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _interrupt(self, t: int) -> KeyboardInterrupt:
        if self.checkpoint_dir is not None:
            self._save(t)
            log.warning("interrupted at step %d: checkpoint %s", t, self.last_checkpoint)
            return KeyboardInterrupt(f"interrupted at step {t}; resume from {self.last_checkpoint}")
        log.warning("interrupted at step %d: no checkpoint_dir, nothing saved", t)
        return KeyboardInterrupt(f"interrupted at step {t} (no checkpoint_dir: nothing saved)")

