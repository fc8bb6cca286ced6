"""Export kernels: how an exported model runs its integer weights in onnxruntime, one file each.

Adding one = a file that registers its graph rewrite with `@register_kernel(...)`, plus one
import below (the order here is the order of the CLI flags and of error messages).
"""

from . import weight_only, dynamic_int8, static_int8, matmul_nbits  # each registers itself on import
from .registry import KERNELS, ExportKernel, get_kernel, register_kernel

__all__ = ["KERNELS", "ExportKernel", "get_kernel", "register_kernel", "weight_only", "dynamic_int8", "static_int8",
           "matmul_nbits"]
