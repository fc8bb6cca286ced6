"""Quantized embedding tables: integers gathered first, dequantized after the Gather.

A quantized Linear dequantizes its whole weight before the matmul (DequantizeLinear → MatMul);
an embedding reads only the rows its ids name, so `QuantizedEmbedding` gathers the integer rows
and their per-row scales, then multiplies: the ONNX graph is Gather(int table) → Cast → Mul, and
the float table never exists. 8-bit tables are int8; tables of 4 bits or fewer (4, 2, 1,
ternary) are packed two values per byte (uint8, offset by 8), unpacked after the Gather with
BitwiseAnd / BitShift, so the file holds half a byte per value. The arithmetic is the twin's
(q · scale per row), so the vanished model reproduces the blended one at β = 0 exactly.
"""

from __future__ import annotations

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from torch import nn

from .layer_types import copy_layer_attrs

__all__ = ["QuantizedEmbedding", "pack_int4", "unpack_int4"]

_OFFSET = 8  # a 4-bit value v ∈ [−8, 7] is stored as the nibble v + 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [−8, 7], shape (rows, d) → uint8 (rows, ⌈d/2⌉), column 2i in the low nibble (pure)."""
    q = q.to(torch.int16) + _OFFSET
    if q.shape[-1] % 2:
        q = torch.cat([q, torch.full_like(q[..., :1], _OFFSET)], -1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """`pack_int4`'s inverse, to `dtype`, for any leading shape (pure; exports as BitwiseAnd / BitShift)."""
    low = (packed & 15).to(dtype) - _OFFSET
    high = (packed >> 4).to(dtype) - _OFFSET
    return torch.stack([low, high], -1).flatten(-2)[..., :width]


class QuantizedEmbedding(nn.Module):
    """The deployed quantized Embedding: an integer table (int8, or packed 4-bit) + a float scale per row.

    Args:
        twin: the trained QuantTwin of the Embedding (its call attributes and bits).
        q: the integers, shape (rows, dim), as `quantize_weight` returns them.
        scale: one scale per row.
    """

    def __init__(self, twin: nn.Module, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.layer_type = twin.layer_type
        copy_layer_attrs(self, twin)
        self.bits = twin.bits
        self.width = q.shape[1]
        self.packed = twin.bits != 8
        table = pack_int4(q) if self.packed else q.to(torch.int8)
        self.register_buffer("table", table)
        self.register_buffer("scale", scale.detach().clone().float())
        self.out_dtype = twin.weight.dtype
        self.train(twin.training)

    def _rows(self, rows: torch.Tensor) -> torch.Tensor:
        return unpack_int4(rows, self.width, self.out_dtype) if self.packed else rows.to(self.out_dtype)

    def forward(self, ids):
        rows = self._rows(F.embedding(ids, self.table))
        return rows * F.embedding(ids, self.scale.to(self.out_dtype)[:, None])

    def dequantized_weight(self) -> torch.Tensor:
        """The whole float table (q · scale per row): what a tied output head computes with.

        An int8 table dequantizes as a quantized Linear's weight does (ONNX DequantizeLinear, which
        the exporter never folds into a float copy); a 4-bit one is unpacked first.
        """
        if not self.packed:
            out_dtype = None if self.out_dtype == torch.float32 else self.out_dtype
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                self.table, self.scale, None, 0, -128, 127, torch.int8, out_dtype=out_dtype)
        return self._rows(self.table) * self.scale.to(self.out_dtype)[:, None]

    def extra_repr(self) -> str:
        store = "4-bit packed in uint8" if self.packed else "int8"
        return f"{tuple(self.scale.shape[0:1]) + (self.width,)}, {store}, bits={self.bits}"
