"""The deployed form of a quantized layer: int8 integers, float scales (and zero points), dequantized in forward.

`materialize` (quant.py) turns a vanished QuantTwin into this. Its forward dequantizes with
`quantized_decomposed.dequantize_per_channel` (over the (out·groups, g) rows of a grouped
weight, reshaped back), which exports to ONNX as an int8 initializer + DequantizeLinear
(+ Reshape when grouped: one blocked DequantizeLinear once the weights are stored as integers,
`export/blocked.py`), with an int8 zero point input on an asymmetric grid (zero_point.py); its
activation quantization becomes QuantizeLinear/DequantizeLinear. A vanished model is ~4×
smaller on disk and in ONNX, and reproduces the twin at β = 0 bit for bit.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import nn

from .act_range import ActRange, act_fake_quant
from .group_scales import scale_rows
from .layer_types import call_layer, copy_layer_attrs

__all__ = ["QuantizedLayer"]


class QuantizedLayer(ActRange, nn.Module):
    """int8 weight buffer + float scales (out,) or (out, groups) [+ int8 zero points like the scales].

    `quantized_decomposed.dequantize_per_channel` exports to ONNX DequantizeLinear on an int8
    initializer (on the (out·groups, g) rows of a grouped weight, then a Reshape); the (optional)
    input quantization to QuantizeLinear → DequantizeLinear.
    """

    def __init__(self, twin, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None):
        super().__init__()
        self.layer_type = twin.layer_type
        copy_layer_attrs(self, twin)
        self.bits = twin.bits
        self.qmax = 2 ** (twin.bits - 1) - 1 if isinstance(twin.bits, int) and twin.bits > 1 else 1
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", scale.detach().clone().float())
        if zero is not None:  # an asymmetric grid: w = (q − zero)·scale
            self.register_buffer("zero_point", zero.detach().to(torch.int8))
        else:
            self.zero_point = None
        self.bias = None if twin.bias is None else nn.Parameter(twin.bias.detach().clone(), requires_grad=twin.bias.requires_grad)
        self._init_act(twin.act_bits, q.device)
        if twin.act_bits is not None:
            self.act_range.copy_(twin.act_range)
            self.act_observed.copy_(twin.act_observed)
            self._init_out_range(q.shape[0], q.device)
            self.out_range.copy_(twin.out_range)
            self.out_observed.copy_(twin.out_observed)
        self._out_dtype = None if twin.weight.dtype == torch.float32 else twin.weight.dtype
        self.train(twin.training)
        self._act = self._act_qparams_now()  # a Python mirror, so forward needs no device sync
        self.register_load_state_dict_post_hook(_refresh_act_mirror)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with ((q − zero) · scale, each scale over its row or group)."""
        if self.scale.dim() == 1:
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight, self.scale, None if self.zero_point is None else self.zero_point.to(torch.int32), 0, -128,
                127, torch.int8, out_dtype=self._out_dtype)
        # int32: the op subtracts in the zero point's dtype, and int8 q − z wraps past ±127 at 8 bits
        zero = None if self.zero_point is None else self.zero_point.reshape(-1).to(torch.int32)
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            scale_rows(self.qweight, self.scale), self.scale.reshape(-1), zero, 0, -128, 127, torch.int8,
            out_dtype=self._out_dtype).reshape(self.qweight.shape)

    def forward(self, x, output_size=None):
        if self._act is not None:
            x = act_fake_quant(x, *self._act)
        return call_layer(self.layer_type, self, x, self.dequantized_weight(), self.bias, output_size)

    def extra_repr(self) -> str:
        groups = f", scales={tuple(self.scale.shape)}" if self.scale.dim() == 2 else ""
        groups += ", asymmetric" if self.zero_point is not None else ""
        return (f"{self.layer_type.__name__}, qweight={tuple(self.qweight.shape)} int8, bits={self.bits}{groups}, "
                f"act={'uint8' if self._act else None}")


def _refresh_act_mirror(module: QuantizedLayer, _incompatible) -> None:
    module._act = module._act_qparams_now()
