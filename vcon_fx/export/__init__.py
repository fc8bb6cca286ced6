"""Export to ONNX, store integer weights for an export kernel, and check the file in onnxruntime."""

from .check import CheckReport, check_onnx
from .integer import check_tolerance, integer_export, kernel_choice, kernel_for_flags
from .kernels import KERNELS, ExportKernel
from .onnx import export_onnx
from .quantize import compress_onnx_weights

__all__ = ["export_onnx", "check_onnx", "CheckReport", "compress_onnx_weights", "integer_export",
           "kernel_for_flags", "kernel_choice", "check_tolerance", "KERNELS", "ExportKernel"]
