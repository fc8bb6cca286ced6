"""Activation quantization of a quant layer: the input's observed range and fake-quantization, the output's range.

`quant --act-bits 8` fake-quantizes each layer's input on a uint8 grid from its observed range;
every quantized layer also records its output range per channel, which static int8 export
(export/static_int8.py) runs with. Both are moving averages over the fine-tuning steps.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ActRange", "act_qparams", "act_fake_quant", "ACT_MOMENTUM"]

ACT_MOMENTUM = 0.1  # EMA weight of the newest batch in the observed activation range


def act_qparams(lo: float, hi: float) -> tuple[float, int]:
    """Scale and zero point of an asymmetric uint8 range that contains 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max((hi - lo) / 255.0, 1e-8)
    zero_point = int(min(max(round(-lo / scale), 0), 255))
    return scale, zero_point


def act_fake_quant(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    q = torch.ops.quantized_decomposed.quantize_per_tensor(x, scale, zero_point, 0, 255, torch.uint8)
    out_dtype = None if x.dtype == torch.float32 else x.dtype  # an out_dtype exports as an extra Cast
    return torch.ops.quantized_decomposed.dequantize_per_tensor(q, scale, zero_point, 0, 255, torch.uint8,
                                                                out_dtype=out_dtype)


class ActRange:
    """Mixin: an observed activation range (buffers `act_range` = [min, max], `act_observed`)."""

    def _init_act(self, act_bits: int | None, device: torch.device | None = None) -> None:
        self.act_bits = act_bits
        if act_bits is not None:
            self.register_buffer("act_range", torch.zeros(2, device=device))
            self.register_buffer("act_observed", torch.zeros((), dtype=torch.bool, device=device))

    def _act_qparams_now(self) -> tuple[float, int] | None:
        if self.act_bits is None or not bool(self.act_observed):
            return None
        lo, hi = self.act_range.tolist()
        return act_qparams(lo, hi)

    # ── the output range (static int8 export reads it; the forward never uses it) ──

    def _init_out_range(self, channels: int, device: torch.device | None = None) -> None:
        self.register_buffer("out_range", torch.zeros(2, channels, device=device))  # [min, max] per channel
        self.register_buffer("out_observed", torch.zeros((), dtype=torch.bool, device=device))

    @torch.no_grad()
    def _observe_out(self, y: torch.Tensor) -> None:
        channel_dim = -1 if self.layer_type is nn.Linear else 1
        flat = y.detach().movedim(channel_dim, 0).reshape(y.shape[channel_dim], -1).float()
        now = torch.stack([flat.amin(1), flat.amax(1)])
        if bool(self.out_observed):
            self.out_range.lerp_(now, ACT_MOMENTUM)
        else:
            self.out_range.copy_(now)
            self.out_observed.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # artifacts written before output ranges were observed load as "not observed"
        if hasattr(self, "out_range") and prefix + "act_range" in state_dict:
            state_dict.setdefault(prefix + "out_range", torch.zeros_like(self.out_range))
            state_dict.setdefault(prefix + "out_observed", torch.zeros((), dtype=torch.bool))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
