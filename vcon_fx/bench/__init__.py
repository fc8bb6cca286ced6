"""Timing ONNX models in onnxruntime, each in a fresh process (`vcon-fx bench`)."""

from .compare import bench_onnx

__all__ = ["bench_onnx"]
