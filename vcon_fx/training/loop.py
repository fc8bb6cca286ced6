"""One fine-tuning run: set-up, the step loop, evaluation and checkpoints (what `finetune` drives).

Everything a step does is a pure function of (seed, step, rank): its batch (`StepBatches`) and
its RNG (dropout), so a run killed and resumed from a checkpoint ends with the same weights as
one that was not.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset, default_collate

from ..data.readers import check_labels, dataset_labels
from ..errors import ConfigError, DataError, TrainingError
from ..graph.blend import get_betas, mean_beta
from ..schedules.schedule import make_schedule
from .batches import StepBatches, mix_seed, split_batch, to_device
from .checkpoint import (latest_checkpoint, load_checkpoint, load_sharded_checkpoint, save_checkpoint,
                         save_sharded_checkpoint)
from .config import FinetuneConfig, training_batch_size
from ..graph.recipe import recipe_of
from .distributed import Distributed
from ..graph.modes import eval_mode
from .evaluate import GapProbe, at_beta, choose_loss, evaluate, prediction, training_loss
from .interrupt import interruption, sigint_flag
from .records import StepRecords
from .teacher import GroupMatch, TeacherWeights, hold_teacher, teacher_active
from .result import FinetuneResult

__all__ = ["FinetuneRun"]

log = logging.getLogger(__name__)


class FinetuneRun:
    """A run of `config` on a blended model (trains `vm` in place); `train()` runs it.

    Args:
        vm: the blended model.
        train_data / eval_data: checked datasets.
        dist: the entered `Distributed` (device, rank, collectives).
        config: the run's settings, `transition` resolved.
        on_step: called after every step with the step's record.
        eval_on: "eval", or "train" when `eval_data` is a training subset.
    """

    def __init__(self, vm, train_data: Dataset, eval_data: Dataset, dist: Distributed, config: FinetuneConfig, *,
                 on_step: Callable[[dict[str, Any]], None] | None, eval_on: str):
        self.vm, self.train_data, self.eval_data, self.dist, self.config = vm, train_data, eval_data, dist, config
        self.eval_on = eval_on
        self.checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
        log_path = Path(config.log_path) if config.log_path is not None else None
        self.records = StepRecords(log_path, write=dist.main, on_step=on_step, rank=dist.rank)
        self.device = dist.device
        self.metrics: dict[str, float] = {}
        self.signalled = False  # set by the SIGINT handler, on this rank
        self.stop = False       # agreed by every rank (one signalled), so all stop after the same step
        self.last_checkpoint: Path | None = None
        self.held: list[nn.Parameter] = []  # dense-branch weights kept fixed for this run (teacher.hold_teacher)
        # A model whose shapes were fixed at export runs only at that batch: every forward uses it.
        self.batch_size, self.batch_note = training_batch_size(recipe_of(vm).inputs, config.batch_size)
        self.fixed_batch = self.batch_note is not None
        if self.batch_note:
            log.info("%s", self.batch_note)

    # ── set-up ───────────────────────────────────────────────────────────────────────────

    def train(self) -> FinetuneResult:
        """Run every step (in place on the model); returns what the run did."""
        vm, config = self.vm, self.config
        was_training = vm.training
        self.dist.check_sharding(config.match_groups)
        self.vm = self.dist.place(vm)  # from here on the model trained: `vm`, or (FSDP) its sharded copy
        self._prepare()
        start = self._restore() if config.resume else 0
        self.t0 = time.monotonic()
        try:
            self.records.open(start)
            self._check_betas_agree()
            model = self.dist.wrap(self.vm)
            if start == 0:
                self._evaluate_start()
            with sigint_flag(self._on_sigint):
                self._loop(model, start)
            if "after" not in self.metrics:  # resumed at the end: no step ran
                self.metrics["after"] = self._evaluate()
            if config.save_every and self.schedule.t > start:
                self._save(self.schedule.t)
            self.dist.finish(self.vm, vm)
        finally:
            self.records.close()
            vm.train(was_training)
            for p in self.held:
                p.requires_grad_(True)
            TeacherWeights.detach(self.vm)
        history = self.records.history
        final_loss = next((h["loss"] for h in reversed(history) if "loss" in h), None)
        return FinetuneResult(metric=self.metric, metrics=dict(self.metrics), history=history,
                              betas=get_betas(vm), steps=self.schedule.t, loss=self.loss_kind, final_loss=final_loss,
                              resumed_from=start or None,
                              checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
                              eval_on=self.eval_on, rank=self.dist.rank, world_size=self.dist.world)

    def _prepare(self) -> None:
        """Probe the data, choose the loss and metric, build the schedule and the optimizer."""
        vm, config = self.vm, self.config
        self._probe_batches()
        first_args, first_kwargs, first_labels = split_batch(self._first(self.train_data))
        self.loss_kind = choose_loss(config.loss, vm, first_args, first_kwargs, first_labels, self.device)
        # With labels, --distill mixes in the distillation the unlabelled loss would use (KL on logits, else MSE).
        self.distill_kind = (choose_loss("distill", vm, first_args, first_kwargs, None, self.device)
                             if self.loss_kind == "task" and config.distill > 0 else None)
        self.metric = "accuracy" if split_batch(self._first(self.eval_data))[2] is not None else "cosine"
        self.num_classes = self._check_labels(first_args, first_kwargs)

        self.schedule = make_schedule(config.schedule, vm, transition=config.transition, **config.schedule_options)
        if self.loss_kind != "task":  # the model at β = 1 is the target: its dense branch must not chase the twin
            self.held = hold_teacher(vm)
            frozen = TeacherWeights(vm)
            if frozen.pairs and not config.fsdp:  # weights the twins share train on: the teacher reads a copy
                frozen.attach(vm)
            elif frozen.pairs:
                log.warning("under --fsdp the teacher reads the weights the twins share as they train, and can drift "
                            "with them: transform with --separate-weights to keep it the original")
            if self.held or frozen.pairs:
                log.info("distilling without labels: only the twins train, toward the model at β = 1 (%d weight tensor(s) "
                         "outside them stay fixed; the teacher reads a frozen copy of the %d the twins share)",
                         len(self.held), len(frozen.pairs))
        self.params = [p for p in vm.parameters() if p.requires_grad]
        if not self.params:
            raise ConfigError("the model has no trainable parameters (all frozen): unfreeze some before fine-tuning")
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr)

    def _first(self, data: Dataset):
        """The first example collated as a batch, or the first fixed batch (examples repeated if too few)."""
        n = self.batch_size if self.fixed_batch else 1
        return default_collate([data[i % len(data)] for i in range(n)])

    def _probe_batches(self) -> None:
        """One forward at 1 and at batch_size examples: a model that cannot take them fails here, in one line."""
        sizes = {self.batch_size} if self.fixed_batch else {1, min(self.batch_size, len(self.train_data))}
        for n in sorted(sizes):
            args, kwargs, _ = split_batch(default_collate([self.train_data[i % len(self.train_data)] for i in range(n)]))
            try:
                with torch.no_grad(), eval_mode(self.vm):
                    self.vm(*to_device(args, self.device), **to_device(kwargs, self.device))
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                raise DataError(
                    f"the model does not run on a batch of {n} example(s) of the training data ({type(exc).__name__}: "
                    f"{lines[0][:200] if lines else ''}); the data gives {_shapes(args, kwargs)}, the model's example "
                    f"inputs are {_spec_shapes(recipe_of(self.vm).inputs)}: give data of the model's input shapes"
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
        for name, ds in (("training", self.train_data), ("eval", self.eval_data)):
            base = ds.dataset if isinstance(ds, Subset) else ds
            check_labels(f"{name} data", dataset_labels(base), classes)
        return classes

    # ── the loop ─────────────────────────────────────────────────────────────────────────

    def _loop(self, model: nn.Module, start: int) -> None:
        config = self.config
        batches = StepBatches(len(self.train_data), self.batch_size, self.dist.rank, self.dist.world, config.seed,
                              start + 1, config.steps)
        loader = torch.utils.data.DataLoader(self.train_data, batch_sampler=batches, num_workers=config.num_workers,
                                             collate_fn=default_collate)
        model.train()
        for t, batch in zip(range(start + 1, config.steps + 1), loader):
            self._step(model, t, batch)
            if self.stop or (self.dist.world == 1 and self.signalled):
                if self.checkpoint_dir is not None:
                    self._save(t)
                raise interruption(t, self.last_checkpoint if self.checkpoint_dir is not None else None)

    def _step(self, model: nn.Module, t: int, batch) -> None:
        vm, config = self.vm, self.config
        args, kwargs, labels = split_batch(batch)
        if self.loss_kind == "task":
            bad = (labels != -100) & ((labels < 0) | (labels >= self.num_classes))
            if bool(bad.any()):
                raise DataError(f"step {t}: label {int(labels[bad][0])} is out of range for a model with "
                                f"{self.num_classes} outputs (classes 0…{self.num_classes - 1}): renumber the labels")
        args, kwargs = to_device(args, self.device), to_device(kwargs, self.device)
        labels = to_device(labels, self.device)
        betas = get_betas(vm)
        # An adaptive schedule reads every step's gaps (free while both branches run).
        measure_gap = t == 1 or t % config.gap_every == 0 or t == config.steps or self.schedule.wants_feedback
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(mix_seed(config.seed, t, self.dist.rank))
            teach = teacher_active(betas, config.teacher_after)
            matching = GroupMatch(vm) if teach and config.match_groups > 0 else contextlib.nullcontext()
            with GapProbe(vm) if measure_gap else contextlib.nullcontext() as probe, matching as matcher:
                out = model(*args, **kwargs)
            # After the forward hooks are gone: the teacher's own forward must not feed the probes.
            loss, parts = self._loss(out, args, kwargs, labels, teach, matcher)
            total, signalled = self.dist.sum([float(loss.detach()), float(self.signalled)])
            mean_loss = total / self.dist.world
            if not math.isfinite(mean_loss):
                raise self._diverged(t, mean_loss, betas)
            self.stop = signalled > 0
            self.optimizer.zero_grad(set_to_none=True)
            if loss.requires_grad:  # not at β = 1 without labels: the twins are skipped and nothing else trains
                loss.backward()
            self.optimizer.step()
        if self.schedule.wants_feedback:
            self.schedule.observe(probe.gaps(), mean_loss)
        self.schedule.step()
        info: dict[str, Any] = {"step": t, "beta": mean_beta(betas), "betas": betas, "loss": mean_loss,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "elapsed": round(time.monotonic() - self.t0, 4)}
        if len(parts) > 1:
            info["loss_parts"] = parts
        if measure_gap:
            info["gap"] = probe.gaps()
            self._check_betas_agree()
        if (config.eval_every and t % config.eval_every == 0) or t == config.steps:
            value = self._evaluate()
            info["eval"] = {self.metric: value}
            if t == config.steps:
                self.metrics["after"] = value
        self.records.add(info)
        if config.save_every and t % config.save_every == 0 and t != config.steps:
            self._save(t)

    def _loss(self, out, args, kwargs, labels, teach: bool, matcher) -> tuple[torch.Tensor, dict[str, float]]:
        """The step's loss and its parts: the task (or distillation) loss, plus the teacher terms asked for."""
        config, vm = self.config, self.vm
        loss = training_loss(self.loss_kind, vm, out, args, kwargs, labels)
        parts = {self.loss_kind: float(loss.detach())}
        if self.distill_kind is not None and teach:
            distill = training_loss(self.distill_kind, vm, out, args, kwargs, labels)
            loss = (1.0 - config.distill) * loss + config.distill * distill
            parts["distill"] = float(distill.detach())
        if matcher is not None:
            match = matcher.loss().to(loss.device)
            loss = loss + config.match_groups * match
            parts["match"] = float(match.detach())
        return loss, parts

    def _on_sigint(self) -> None:
        self.signalled = True

    def _check_betas_agree(self) -> None:
        if self.dist.world == 1:
            return
        mine = list(get_betas(self.vm).values())
        every = self.dist.gather(mine)
        if any(other != every[0] for other in every):
            raise TrainingError(f"β differs between ranks at step {self.schedule.t} ({every[0][:4]} on rank 0, "
                                "others differ): every rank must load the same model and checkpoint")

    def _diverged(self, t: int, value: float, betas: dict[str, float]) -> TrainingError:
        kept = f"; the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else ""
        return TrainingError(f"the loss is {value} at step {t} (β {mean_beta(betas):.3f}): lower the learning rate (now "
                             f"{self.config.lr:g}) or check the data{kept}")

    # ── evaluation ───────────────────────────────────────────────────────────────────────

    def _evaluate_start(self) -> None:
        with at_beta(self.vm, 1.0):
            before = 1.0 if self.metric == "cosine" else self._evaluate()
        with at_beta(self.vm, 0.0):
            compressed = self._evaluate()
        self.metrics.update(before=before, before_compressed=compressed)
        betas = get_betas(self.vm)
        self.records.add({"step": 0, "beta": mean_beta(betas), "betas": betas,
                          "eval": {self.metric: before, f"{self.metric}_compressed": compressed}})

    def _evaluate(self) -> float:
        return evaluate(self.vm, self.eval_data, self.metric, batch_size=self.batch_size, device=self.device,
                        dist=self.dist, pad=self.fixed_batch)

    # ── checkpoints ──────────────────────────────────────────────────────────────────────

    def _run_settings(self) -> dict[str, Any]:
        config = self.config
        return {"steps": config.steps, "lr": config.lr, "batch_size": self.batch_size, "loss": self.loss_kind,
                "distill": config.distill, "match_groups": config.match_groups, "teacher_after": config.teacher_after,
                "seed": config.seed, "world_size": self.dist.world, "schedule": config.schedule}

    def _save(self, t: int) -> None:
        if self.checkpoint_dir is None:
            return
        settings = dict(run=self._run_settings(), seed=self.config.seed, metrics=self.metrics,
                        history=self.records.history)
        if self.dist.sharded:
            save_sharded_checkpoint(self.checkpoint_dir, t, self.vm, self.optimizer, self.schedule, self.dist, **settings)
        elif self.dist.main:
            save_checkpoint(self.checkpoint_dir, t, self.vm, self.optimizer, self.schedule, **settings)
        self.last_checkpoint = self.checkpoint_dir / f"step-{t}"

    def _restore(self) -> int:
        found = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
        if found is None:
            log.info("no checkpoint in %s: starting from step 0", self.checkpoint_dir)
            return 0
        load = load_sharded_checkpoint if self.dist.sharded else load_checkpoint
        state = load(found, self.vm, self.optimizer, self.schedule, run=self._run_settings(), device=self.device)
        self.metrics = dict(state.get("metrics", {}))
        step = int(state["step"])
        self.records.history = self.records.logged(step) or list(state.get("history", []))
        self.last_checkpoint = found
        log.info("resumed from %s (step %d)", found, step)
        return step


def _shapes(args: tuple, kwargs: dict) -> str:
    """"input 0 32×10, mask 32×10": the shapes of a batch's tensors, for error messages (pure)."""
    named = [(f"input {i}", t) for i, t in enumerate(args)] + list(kwargs.items())
    return ", ".join(f"{n} {'×'.join(map(str, t.shape))}" for n, t in named if isinstance(t, torch.Tensor))


def _spec_shapes(spec: dict) -> str:
    """The same for a recipe's recorded example inputs (pure)."""
    named = [(f"input {i}", a) for i, a in enumerate(spec.get("args") or [])] + list((spec.get("kwargs") or {}).items())
    return ", ".join(f"{n} {'×'.join(map(str, a['shape']))}" for n, a in named)
