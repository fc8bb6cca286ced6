"""Fine-tuning through the transition: the API, the loop, its records, checkpoints, evaluation, distributed runs."""

from .config import FinetuneConfig
from .finetune import finetune
from .result import FinetuneResult

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult"]
