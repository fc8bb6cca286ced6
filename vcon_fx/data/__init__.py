"""Training, evaluation and calibration data: one reader per format, chosen by the path.

A reader registers itself (`registry.register_reader`); `load_data` asks them in turn.
`vcon_fx.training.load_data_for` reads a path for a vcon model (its recipe gives the shapes).
"""

from .readers import load_data
from .registry import register_reader, registered_readers

__all__ = ["load_data", "register_reader", "registered_readers"]
