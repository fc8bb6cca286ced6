"""Training, evaluation and calibration data: one reader per format, chosen by the path."""

from .readers import load_data, load_data_for

__all__ = ["load_data", "load_data_for"]
