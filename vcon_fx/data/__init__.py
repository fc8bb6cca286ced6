"""Training, evaluation and calibration data: one reader per format, chosen by the path.

A reader registers itself (`registry.register_reader`); `load_data` asks them in turn. A new
format is one file, imported in `readers.py` (docs/extending.md). `load_data_for` reads a path
for a vcon model (its recipe gives the task and shapes).
"""

from .for_model import load_data_for
from .readers import load_data
from .registry import register_reader, registered_readers

__all__ = ["load_data", "load_data_for", "register_reader", "registered_readers"]
