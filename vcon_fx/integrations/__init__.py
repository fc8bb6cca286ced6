"""Hooks into other training libraries: `VconCallback` for `transformers.Trainer`."""

from .hf_trainer import VconCallback

__all__ = ["VconCallback"]
