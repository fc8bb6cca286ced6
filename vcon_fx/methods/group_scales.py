"""Where a quantized weight's scales sit: one per output channel, or one per group of input weights.

Per output channel (the default) a weight (out, …) has scales (out,). With `--group-size g` a
Linear's row of `in` weights is cut into in/g groups of g consecutive inputs, each with its own
scale: scales (out, in/g), as the int4 quantizers of language models store them (GPTQ, AWQ,
onnxruntime's MatMulNBits). A group with one loud weight no longer coarsens the grid of the
whole row, so the rounding error falls.

Every grid function reads a weight through its scales' rows: `weight.reshape(scale.numel(), −1)`
pairs row r with scale r, which is an output channel for scales (out,) and one group for scales
(out, in/g) (the groups of a row are consecutive inputs, row-major like the scales). The
per-channel arithmetic (max-abs, clip search, rounding) therefore applies to groups unchanged.

Groups need an integer grid (2 to 8 bits: binary and ternary have no per-group form here) and
g a power of 2 of at least 16, the block sizes MatMulNBits takes, so an int4 export packs the
groups as its blocks. Convolutions, embeddings, recurrent gate matrices and Linears whose input
features g does not divide keep per-channel scales, and their plan says so.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["check_group_size", "layer_group_size", "scale_rows", "quantize_weight", "dequantize",
           "fake_quantize_weight", "GROUP_BITS", "MIN_GROUP_SIZE"]

GROUP_BITS = (8, 4, 2)  # the integer widths: binary and ternary scales are means, per channel
MIN_GROUP_SIZE = 16


def check_group_size(group_size, bits) -> None:
    """Raise unless `group_size` is None or a power of 2 of at least 16 with an integer width (pure).

    Raises:
        ConfigError: naming --group-size and the fix.
    """
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < MIN_GROUP_SIZE \
            or group_size & (group_size - 1):
        raise ConfigError(f"--group-size must be a power of 2 of at least {MIN_GROUP_SIZE} (16, 32, 64, 128, …: one "
                          f"scale per that many input weights, MatMulNBits' block sizes), got {group_size!r}; "
                          "leave it out for one scale per output channel")
    if bits not in GROUP_BITS:
        raise ConfigError(f"--group-size needs an integer grid (--bits {', '.join(map(str, GROUP_BITS))}), got "
                          f"--bits {bits}: binary and ternary scales stay per output channel, leave --group-size out")


def layer_group_size(layer: nn.Module, group_size: int | None) -> tuple[int | None, str | None]:
    """(the group size this layer's scales use, or None for per channel; why not, when asked for) (pure)."""
    if group_size is None:
        return None, None
    weight = getattr(layer, "weight", None)
    if not isinstance(layer, nn.Linear) or weight is None or weight.dim() != 2:
        return None, f"per output channel (--group-size applies to Linear layers, not {type(layer).__name__})"
    if weight.shape[1] % group_size:
        return None, f"per output channel ({weight.shape[1]} input features are not a multiple of --group-size {group_size})"
    return group_size, None


def scale_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`weight` as one row per scale (a view): (out, …) for scales (out,), (out·groups, g) for (out, groups)."""
    return weight.reshape(scale.numel(), -1)


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int | str,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (as floats, shape of `weight`) and scales: (out,), or (out, in/g) with `group_size` g (pure).

    Dequantize with `dequantize`. A channel (or group) of zeros gets q = 0, scale = 1.
    """
    w = weight.detach()
    flat = w.reshape(-1, group_size) if group_size else w.reshape(w.shape[0], -1)
    mag = flat.abs()
    if bits == 1:
        q = torch.where(flat >= 0, 1.0, -1.0).to(flat.dtype)
        scale = mag.mean(1)
    elif bits == "ternary":
        delta = 0.7 * mag.mean(1, keepdim=True)
        keep = mag > delta
        q = torch.sign(flat) * keep
        scale = (mag * keep).sum(1) / keep.sum(1).clamp(min=1)
    else:
        qmax = 2 ** (int(bits) - 1) - 1
        scale = mag.amax(1) / qmax
        q = torch.clamp(torch.round(flat / torch.where(scale > 0, scale, 1.0)[:, None]), -qmax, qmax)
    dead = ~(scale > 0)  # zero (or NaN) rows: exactly representable as 0 · 1
    if dead.any():
        q = torch.where(dead[:, None], torch.zeros_like(q), q)
        scale = torch.where(dead, torch.ones_like(scale), scale)
    return q.reshape(w.shape), scale.reshape(w.shape[0], -1) if group_size else scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """(q − zero) · scale, each scale (and zero point) over its row of `q` (pure).

    The same arithmetic as `quantized_decomposed.dequantize_per_channel` on those rows, so a
    materialized layer reproduces the twin bit for bit.
    """
    rows = scale_rows(q, scale)
    if zero is not None:
        rows = rows - zero.to(rows.dtype).reshape(-1, 1)
    return (rows * scale.reshape(-1, 1)).reshape(q.shape)


def fake_quantize_weight(weight: torch.Tensor, bits: int | str, group_size: int | None = None,
                         asymmetric: bool = False) -> torch.Tensor:
    """(q − zero)·scale in the forward, identity gradient to `weight` (straight-through estimator).

    `asymmetric` (with a `group_size`): each group's grid spans its [min, max] (zero_point.py).
    """
    if asymmetric:
        from .zero_point import quantize_weight_asymmetric

        dequantized = dequantize(*quantize_weight_asymmetric(weight, bits, group_size))
    else:
        dequantized = dequantize(*quantize_weight(weight, bits, group_size))
    return dequantized.detach() + (weight - weight.detach())
