"""Drive β from another training loop: a Hugging Face `Trainer` callback.

    trainer = Trainer(model=wrapper_around_vm, args=args, train_dataset=ds,
                      callbacks=[VconCallback(transition=200)])

The callback steps the same `BetaSchedule` as `vcon_fx.finetune`, once per optimizer step, with
β set from `state.global_step` (so gradient accumulation and resuming from a Trainer
checkpoint keep β in step). Only this module imports transformers.

Under DDP or FSDP the model Trainer hands to callbacks is wrapped (DDP, FSDP1's wrapper) or
sharded in place (FSDP2's `fully_shard`); the blends are found through `model.modules()` either
way, and β, a buffer, stays whole and the same on every rank (each rank steps the same schedule).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from ..errors import ConfigError
from ..graph.blend import mean_beta
from ..schedules.registry import check_kind
from ..schedules.schedule import BetaSchedule, default_transition, make_schedule

__all__ = ["VconCallback"]

log = logging.getLogger(__name__)


class VconCallback(TrainerCallback):
    """Moves β of every blend group along a schedule as a `transformers.Trainer` trains.

    Args:
        transition: Q in optimizer steps (default: 20% of `state.max_steps`; 0 = abrupt).
        schedule: one of SCHEDULES.
        **options: the schedule's options (exp: beta_end; step: n_steps; staggered: overlap, curve).

    Raises:
        ConfigError: unknown schedule (at construction) or invalid option (when training begins).
        StageError: the trained model holds no Blend modules (when training begins).

    Example:
        >>> cb = VconCallback(transition=100, schedule="cosine")
        >>> trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    """

    def __init__(self, transition: int | None = None, schedule: str = "linear", **options: Any):
        check_kind(schedule)
        self.transition = transition
        self.kind = schedule
        self.options = options
        self.schedule: BetaSchedule | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ConfigError("VconCallback got no model from the Trainer: pass the model to Trainer(model=...)")
        q = default_transition(state.max_steps) if self.transition is None else self.transition
        self.schedule = make_schedule(self.kind, model, transition=q, **self.options)
        if state.global_step:
            self._go_to(state.global_step)  # resumed from a Trainer checkpoint
        log.info("VconCallback: %s schedule, Q=%d of %d steps", self.kind, q, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self._go_to(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.schedule is not None and logs is not None:
            betas = self.schedule.betas
            logs["vcon_beta"] = mean_beta(betas)

    @property
    def betas(self) -> dict[str, float]:
        """β per group at the current step (empty before training begins)."""
        return self.schedule.betas if self.schedule is not None else {}

    def _go_to(self, step: int) -> None:
        if step == self.schedule.t + 1:
            self.schedule.step()
        elif step != self.schedule.t:
            state = self.schedule.state_dict()
            state["t"] = int(step)
            self.schedule.load_state_dict(state)
