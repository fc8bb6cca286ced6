"""The precision a model is loaded, transformed and fine-tuned in: `--dtype fp32|bf16|fp16`.

fp16 runs on the CPU too (PyTorch has CPU kernels for the layers vcon-fx compresses) but slowly;
bf16 is the reduced precision to use on a CPU, fp16 on a GPU without bf16.

A reduced dtype halves the memory of every weight, gradient and Adam state. Only the model's
floating parameters and buffers are cast, and its floating example inputs with them; integer
inputs (token ids, masks) stay as they are. What vcon-fx adds later keeps float32 on purpose:
each Blend's β (graph/blend.py keeps it float32 through any later `.to(dtype)`), the
calibration statistics (float64), the quantization scales. The dtype is recorded in the source
spec (`"dtype": "bf16"`, absent for float32), so loading an artifact rebuilds its source in the
same precision.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError

__all__ = ["DTYPES", "DEFAULT_DTYPE", "torch_dtype", "dtype_name", "cast_floating", "cast_inputs", "model_dtype",
           "match_input_dtype", "in_precision"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_DTYPE = "fp32"
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float": "fp32"}


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """The torch dtype of "fp32" / "bf16" / "fp16" (or their torch names; None is fp32) (pure).

    Raises:
        UsageError: any other name.
    """
    if isinstance(name, torch.dtype):
        name = dtype_name(name)
    key = DEFAULT_DTYPE if name is None else _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise UsageError(f"--dtype {name!r} is not a precision vcon-fx trains in: choose one of {', '.join(DTYPES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """"fp32", "bf16" or "fp16" for a torch dtype (pure).

    Raises:
        UsageError: a dtype that is not one of the three.
    """
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise UsageError(f"dtype {dtype} is not a precision vcon-fx trains in: choose one of {', '.join(DTYPES)}")


def cast_floating(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast the module's floating parameters and buffers to `dtype`, in place; integer ones stay (returns it)."""
    # nn.Module.to(dtype) casts only floating tensors, and each one as it goes: no second full copy.
    return module.to(dtype)


def model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first floating parameter (float32 when it has none) (pure)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def match_input_dtype(module: nn.Module) -> nn.Module:
    """Make a reduced-precision module cast its floating inputs to its own dtype (in place; returns it).

    Data readers give float32 images and features; a bf16 model would refuse them. The hook reads
    the module's dtype at each call, so a model cast back to float32 (for ONNX) takes float32.
    A float32 module gets no hook.
    """
    # a deep copy of a GraphModule drops its hooks: look for the hook itself, not a flag
    if model_dtype(module) != torch.float32 and _cast_to_own_dtype not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_cast_to_own_dtype, with_kwargs=True)
    return module


def _cast_to_own_dtype(module, args, kwargs):
    dtype = model_dtype(module)
    return cast_inputs(args, dtype), cast_inputs(kwargs, dtype)


def cast_inputs(obj, dtype: torch.dtype):
    """Floating tensors in a (nested) input cast to `dtype`; everything else as it is (pure)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: cast_inputs(v, dtype) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cast_inputs(v, dtype) for v in obj)
    return obj


def in_precision(model: nn.Module, name: str | torch.dtype) -> nn.Module:
    """Cast a model (a vcon model: its recipe's source dtype with it) to "fp32" / "bf16" / "fp16", in place.

    β stays float32 (graph/blend.py); the model then casts its floating inputs to its dtype.

    Raises:
        UsageError: an unknown dtype name.
    """
    dtype = torch_dtype(name)
    if model_dtype(model) != dtype:
        cast_floating(model, dtype)
    match_input_dtype(model)
    recipe = getattr(model, "meta", {}).get("vcon")
    source = getattr(recipe, "source", None)
    if source:  # an artifact saved from it rebuilds its source in the same dtype
        source = {k: v for k, v in source.items() if k != "dtype"}
        if dtype != DTYPES[DEFAULT_DTYPE]:
            source["dtype"] = dtype_name(dtype)
        model.meta["vcon"] = recipe.replace(source=source)
    return model
