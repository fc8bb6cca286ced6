"""What a fine-tuning run hands back: metrics before and after, the step history, the final β."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["FinetuneResult"]


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
