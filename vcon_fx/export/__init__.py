"""Export to ONNX and check it in onnxruntime."""

from .check import CheckReport, check_onnx
from .onnx import export_onnx
from .quantize import compress_onnx_weights

__all__ = ["export_onnx", "check_onnx", "CheckReport", "compress_onnx_weights"]
