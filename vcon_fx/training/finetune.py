"""Fine-tuning through the transition: β falls 1 → 0 while the model trains.

    loss = cross-entropy(model(x), y)                    with labels ("task")
         = MSE / KL(model(x) ‖ model(x) at β = 1)        without ("distill": the same graph is its own teacher)

One optimizer step is one schedule step. Everything a step does is a pure function of
(seed, step, rank): its batch (a permutation per epoch) and its RNG (dropout), so a run that is
killed and resumed from a checkpoint ends with the same weights as one that was not
(`loop.py`, `batches.py`).

Checkpoints (`checkpoint_dir/step-N/`) hold no pickle: the model as a vcon artifact
(`model/`), optimizer tensors in `optimizer.safetensors`, everything else (schedule, optimizer
hyper-parameters, a compact history) in `state.json`. Each is written to a temporary folder and
renamed; the newest two are kept (`checkpoint.py`).

Under `torchrun` the model is wrapped in DistributedDataParallel (gloo on CPU, nccl on GPU);
each rank takes its slice of every global batch, β is the same on every rank (the schedule is
a pure function of the step; checked), and only rank 0 writes files (`distributed.py`). With
`fsdp=True` the ranks train a copy sharded with FSDP2 instead, write sharded checkpoints, and
copy the trained weights back into `vm` at the end (`fsdp.py`).
The loss, the metric and the per-group gap are measured as `evaluate.py` describes; the step
records go to `records.py`'s JSON-lines log; ^C is handled by `interrupt.py`.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from torch import fx
from torch.utils.data import Dataset, Subset

from ..errors import DataError, StageError
from ..graph.blend import blend_modules
from ..graph.precision import in_precision
from ..graph.recipe import recipe_of
from ..schedules.schedule import default_transition
from .batches import StepBatches
from .checkpoint import CHECKPOINT_FORMAT, latest_checkpoint
from .config import FinetuneConfig
from .distributed import Distributed
from .evaluate import LOSSES
from .loop import FinetuneRun
from ..data import load_data_for
from .result import FinetuneResult

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "LOSSES", "latest_checkpoint", "CHECKPOINT_FORMAT"]

log = logging.getLogger(__name__)

_EVAL_SUBSET = 1024            # without eval data, the metric is measured on this many training examples

# The batch sampler under its former name: tests and benchmarks/accuracy.py import it from here.
_StepBatches = StepBatches


def finetune(
    vm: fx.GraphModule,
    train_data: Dataset | str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    eval_data: Dataset | str | os.PathLike | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> FinetuneResult:
    """Train a blended model while its β follows a schedule from 1 to 0 (in place on `vm`).

    Args:
        vm: a blended vcon model (from `vcon_fx.transform` or `vcon_fx.load`).
        train_data: a Dataset (items `(x, y)`, `x`, or dicts of keyword inputs) or a data path
            for `vcon_fx.data.load_data`.
        config: the run's settings (steps, transition, schedule, lr, …; see FinetuneConfig).
        eval_data: measured before, every `config.eval_every` steps and after (default: up to
            1024 training examples).
        on_step: called after every step with the step's dict (step, beta, betas, loss, lr,
            elapsed, gap every `gap_every` steps, eval when measured).
        **options: FinetuneConfig fields, for convenience (`steps=1000, lr=1e-3`); with `config`
            they replace its fields.

    Returns:
        A FinetuneResult; `vm` holds the trained weights and the final β, in eval mode.

    Raises:
        ConfigError: an invalid setting or unknown option, or a checkpoint made with other settings.
        DataError: unusable data (task loss without labels, labels out of range, …).
        StageError: `vm` is not a blended vcon model.
        TrainingError: the loss became NaN/Inf (the last good checkpoint is kept).
        KeyboardInterrupt: on SIGINT, after a checkpoint of the step in progress is saved.

    Example:
        >>> result = finetune(vm, "train.npz", steps=1000, transition=200)
        >>> result.betas, result.metrics["after"]
    """
    config = FinetuneConfig.of(config, **options)
    recipe = recipe_of(vm)
    if recipe.stage != "blended" or not blend_modules(vm):
        raise StageError(f"the model is {recipe.stage}: there is no β left to schedule; fine-tune the compressed model "
                         "with plain PyTorch, or fine-tune before `vanish`")
    if config.transition is None:
        config = FinetuneConfig.of(config, transition=default_transition(config.steps))
    if config.transition > config.steps:
        log.warning("transition %d is longer than the run (%d steps): β will end above 0", config.transition,
                    config.steps)

    if config.dtype is not None:
        in_precision(vm, config.dtype)
    train_data = _as_dataset(vm, train_data, "train")
    eval_on = "eval"
    if eval_data is None:
        eval_on = "train"
        eval_data = train_data if len(train_data) <= _EVAL_SUBSET else Subset(train_data, range(_EVAL_SUBSET))
    else:
        eval_data = _as_dataset(vm, eval_data, "eval")

    with Distributed(config.device, fsdp=config.fsdp) as dist:
        return FinetuneRun(vm, train_data, eval_data, dist, config, on_step=on_step, eval_on=eval_on).train()


def _as_dataset(vm, data, what: str) -> Dataset:
    if isinstance(data, (str, os.PathLike)):
        return load_data_for(vm, data)
    if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
        raise DataError(f"{what} data must be a Dataset (with __len__ and __getitem__) or a path, "
                        f"got {type(data).__name__}")
    if len(data) == 0:
        raise DataError(f"{what} data holds no examples: give at least one")
    return data
