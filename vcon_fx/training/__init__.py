"""Fine-tuning through the transition: the loop, checkpoints, evaluation, distributed runs."""

from .finetune import FinetuneResult, finetune

__all__ = ["finetune", "FinetuneResult"]
