"""Fine-tuning through the transition: the API, the loop, its records, checkpoints, evaluation, distributed runs."""

from .config import FinetuneConfig
from .finetune import finetune
from .model_data import load_data_for
from .result import FinetuneResult

__all__ = ["finetune", "FinetuneConfig", "FinetuneResult", "load_data_for"]
