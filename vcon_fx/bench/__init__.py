"""Timing ONNX models in onnxruntime, each in a fresh process (`vcon-fx bench`).

`worker` also holds the onnxruntime session helpers (`session_config`, `make_session`) that
export/ uses: bench sits below export in the import layers.
"""

from .compare import bench_onnx

__all__ = ["bench_onnx"]
