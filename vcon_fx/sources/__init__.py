"""Model sources: what a user hands over (.pt2, torchvision:NAME, a Hugging Face folder, a pickled
module, a state dict + --arch), one file per kind, each registered (`registry.py`); `load_model` asks them.

A new kind is one `SourceKind` subclass decorated with `register_source`, imported in `load.py`
(docs/extending.md).
"""

from .load import LoadedModel, load_model, parse_shape, rebuild_model
from .registry import SourceKind, register_source, source_kinds

__all__ = ["LoadedModel", "load_model", "rebuild_model", "parse_shape", "SourceKind", "register_source",
           "source_kinds"]
