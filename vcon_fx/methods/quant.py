"""Quantization: the twin computes with weights fake-quantized per output channel.

b-bit symmetric (b = 8, 4, 2): scale_c = max|w_c| / (2^(b−1) − 1), q = round(w / scale_c).
Binary (b = 1): q = sign(w), scale_c = mean|w_c|. Ternary (TWN): q ∈ {−1, 0, +1} with
threshold Δ_c = 0.7·mean|w_c|, scale_c = mean of |w| above Δ_c. Every form trains through a
straight-through estimator on a latent float weight, shared with the dense layer by default.
Optionally the layer input is fake-quantized to 8 bits (asymmetric, per tensor) with a range
observed as an exponential moving average while training; the layer output's range is then
observed too (per output channel, so that a batch norm folded into the layer at export maps it
exactly), which static int8 export (`export/kernels/static_int8.py`) turns into output scales.
With `--clip-search` or a data-aware start (GPTQ) the weight scales are chosen once and kept
fixed instead (quant_start.py).

`materialize` stores the integers (int8 in PyTorch whatever b is) and the float scales; its
forward dequantizes with `quantized_decomposed.dequantize_per_channel`, which exports to ONNX
as an int8 initializer + DequantizeLinear, and its activation quantization as
QuantizeLinear/DequantizeLinear: a vanished model is ~4× smaller on disk and in ONNX.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
from torch import nn

from ..errors import ConfigError
from .base import CliOption, LayerPlan, LayerSite, MethodConfig, MethodExamples, layer_params, register_method
from .calibration import INIT, DataAwareStarts, check_init, resolve_init
from .act_range import ACT_MOMENTUM, ActRange, act_fake_quant
from .quant_start import start_fixed_grid
from .scale_grid import fixed_fake_quantize, grid_integers
from .base import unchanged_plan
from .embedding import QuantizedEmbedding
from .layer_types import EMBEDDING_TYPES, RECURRENT_TYPES, call_layer, copy_layer_attrs, dense_flops, single_weight_refusal
from .recurrent import RecurrentTwin, build_recurrent, materialize_recurrent, plan_recurrent
from .twin import SEPARATE_WEIGHTS, WeightTwin, WeightTwinMethod

__all__ = ["QuantConfig", "QuantMethod", "QuantTwin", "QuantizedLayer", "quantize_weight", "fake_quantize_weight",
           "SUPPORTED_BITS"]

log = logging.getLogger(__name__)

SUPPORTED_BITS = (8, 4, 2, 1, "ternary")
ACT_BITS = (8,)
_FLOAT_BYTES = 4


@dataclass(frozen=True)
class QuantConfig(DataAwareStarts, MethodConfig):
    """Weight quantization (fake-quant + STE while blending, integers after vanish).

    Args:
        bits: 8, 4, 2, 1 (binary) or "ternary"; per-output-channel symmetric scales.
        act_bits: None, or 8 to fake-quantize each layer's input (observed EMA min/max range).
        separate_weights: the twin gets its own latent weights (default: the dense layer's).
        init: "auto" (data-aware with calibration data and bits ≤ 4), "plain" (max-abs scales) or
            "data-aware": GPTQ (gptq.py; at 8 bits only if asked), the twin starting from its solution
            in its own weight copy.
        clip_search: fixed scales by an MSE-optimal clipping search (scale_grid.py), input-weighted
            with a data-aware start: the cheap option.
    """

    method = "quant"
    version = 1
    gram_starts = own_weight_starts = ("gptq",)
    cli_options = (
        CliOption("--bits", "weight bits 8, 4, 2, 1 or ternary"),
        CliOption("--act-bits", "fake-quantize layer inputs to 8 bits", type=int),
        SEPARATE_WEIGHTS,
        INIT,
        CliOption("--clip-search", "per-channel scales by an MSE-optimal clipping search (input-weighted with "
                  "calibration data), instead of GPTQ", switch=True),
    )
    bits: int | str = 8
    act_bits: int | None = None
    separate_weights: bool = False
    init: str = "auto"
    clip_search: bool = False

    def __post_init__(self):
        bits = self.bits
        if isinstance(bits, str) and bits.strip().isdigit():  # "4" from a command line
            bits = int(bits)
        if isinstance(bits, str):
            bits = bits.strip().lower()
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise ConfigError(f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}; got {self.bits!r}")
        object.__setattr__(self, "bits", bits)
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or self.act_bits not in ACT_BITS):
            raise ConfigError(
                f"--act-bits must be 8 or unset, got {self.act_bits!r}: ONNX QuantizeLinear stores activations "
                "in 8 bits, so lower widths would not export faithfully"
            )
        if not isinstance(self.separate_weights, bool) or not isinstance(self.clip_search, bool):
            raise ConfigError(f"separate_weights / clip_search must be true or false, got {self!r}")
        check_init(self.init, "quant")

    @property
    def start(self) -> str:
        """How the twin's grid starts: "max-abs" (recomputed every step), "clip-search" or "gptq" (fixed scales)."""
        if self.clip_search:
            return "clip-search"
        return "gptq" if self.init == "data-aware" else "max-abs"

    def calibrated(self, given: bool) -> "QuantConfig":
        data_aware = self.clip_search or self.bits != 8 or self.init == "data-aware"  # GPTQ at 8 bits if asked
        return dataclasses.replace(self, init=resolve_init(self.init, given, has_data_aware=data_aware, method="quant"))

    @property
    def qmax(self) -> int:
        """Largest integer magnitude: 127, 7, 1 (for 2 bits, binary and ternary)."""
        return 2 ** (self.bits - 1) - 1 if isinstance(self.bits, int) and self.bits > 1 else 1

    @classmethod
    def examples(cls) -> MethodExamples:
        return MethodExamples(test=cls(bits=8), cuda=cls(bits=4), demo=cls(bits=1), demo_setting="binary (1 bit)")


# ── weight quantization (pure) ──────────────────────────────────────────────────────────────


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, bits: int | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (as floats, shape of `weight`) and per-output-channel scales (shape (out,)).

    Dequantize with `q * scale` broadcast over dim 0. A channel of zeros gets q = 0, scale = 1.
    """
    w = weight.detach()
    flat = w.reshape(w.shape[0], -1)
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
    dead = ~(scale > 0)  # zero (or NaN) channels: exactly representable as 0 · 1
    if dead.any():
        q = torch.where(dead[:, None], torch.zeros_like(q), q)
        scale = torch.where(dead, torch.ones_like(scale), scale)
    return q.reshape(w.shape), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # the same arithmetic as quantized_decomposed.dequantize_per_channel (q · scale), so the
    # materialized layer reproduces the twin bit for bit
    return q * scale.view(-1, *([1] * (q.dim() - 1)))


def fake_quantize_weight(weight: torch.Tensor, bits: int | str) -> torch.Tensor:
    """q·scale in the forward, identity gradient to `weight` (straight-through estimator)."""
    q, scale = quantize_weight(weight, bits)
    return _dequantize(q, scale).detach() + (weight - weight.detach())


class QuantTwin(ActRange, WeightTwin):
    """The quantized twin: fake-quantized weights (and inputs) over a latent float weight."""

    def __init__(self, layer: nn.Module, *, bits: int | str = 8, act_bits: int | None = None,
                 share: bool = True, init: bool = True, fixed_scale: bool = False):
        super().__init__(layer, share=share, init=init)
        self.bits = bits
        self.allocated_only = not init  # rebuilt for loading: its state is about to be overwritten
        self._init_act(act_bits, self.weight.device)
        self.fixed_scale = fixed_scale
        if fixed_scale:  # one scale per output channel, chosen once (quant_start.py), not recomputed
            self.register_buffer("scale", quantize_weight(self.weight, bits)[1].float() if init
                                 else torch.ones(self.weight.shape[0], device=self.weight.device))
        if act_bits is not None:
            self._init_out_range(self.weight.shape[0], self.weight.device)

    def compressed_weight(self) -> torch.Tensor:
        if self.fixed_scale:
            return fixed_fake_quantize(self.weight, self.scale, self.bits)
        return fake_quantize_weight(self.weight, self.bits)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integers (as floats) and per-channel scales of the current latent weight (pure)."""
        if self.fixed_scale:
            return grid_integers(self.weight, self.scale, self.bits), self.scale
        return quantize_weight(self.weight, self.bits)

    def forward(self, x, output_size=None):
        if self.act_bits is not None:
            x = self._quantize_input(x)
        y = self.call(x, self.compressed_weight(), output_size=output_size)
        if self.act_bits is not None and self.training:
            self._observe_out(y)
        return y

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self._observe(x)
        qparams = self._act_qparams_now()
        if qparams is None:  # nothing observed yet (no fine-tuning step): inputs pass as they are
            return x
        xq = act_fake_quant(x.detach(), *qparams)
        return xq + (x - x.detach())  # straight-through

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        now = torch.stack([x.detach().min(), x.detach().max()]).float()
        if bool(self.act_observed):
            self.act_range.lerp_(now, ACT_MOMENTUM)
        else:
            self.act_range.copy_(now)
            self.act_observed.fill_(True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, act_bits={self.act_bits}"


class QuantizedLayer(ActRange, nn.Module):
    """The deployed form: int8 weight buffer + float per-channel scales, dequantized in forward.

    `quantized_decomposed.dequantize_per_channel` exports to ONNX DequantizeLinear on an int8
    initializer; the (optional) input quantization to QuantizeLinear → DequantizeLinear.
    """

    def __init__(self, twin: QuantTwin, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.layer_type = twin.layer_type
        copy_layer_attrs(self, twin)
        self.bits = twin.bits
        self.qmax = 2 ** (twin.bits - 1) - 1 if isinstance(twin.bits, int) and twin.bits > 1 else 1
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", scale.detach().clone().float())
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
        """The weight the layer computes with (q · scale)."""
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            self.qweight, self.scale, None, 0, -128, 127, torch.int8, out_dtype=self._out_dtype)

    def forward(self, x, output_size=None):
        if self._act is not None:
            x = act_fake_quant(x, *self._act)
        return call_layer(self.layer_type, self, x, self.dequantized_weight(), self.bias, output_size)

    def extra_repr(self) -> str:
        return (f"{self.layer_type.__name__}, qweight={tuple(self.qweight.shape)} int8, bits={self.bits}, "
                f"act={'uint8' if self._act else None}")


def _refresh_act_mirror(module: QuantizedLayer, _incompatible) -> None:
    module._act = module._act_qparams_now()


@register_method
class QuantMethod(WeightTwinMethod):
    config_type = QuantConfig
    summary_keys = ("bits", "act_bits")

    def plan(self, site: LayerSite) -> LayerPlan:
        config: QuantConfig = self.config
        if isinstance(site.module, RECURRENT_TYPES):  # each gate matrix as a Linear (recurrent.py)
            return plan_recurrent(self, site)
        if (refusal := single_weight_refusal(site.module)) is not None:
            return unchanged_plan(site, refusal)
        layer = site.module
        weight = layer.weight
        out_f = weight.shape[0]
        bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
        before = layer_params(layer)
        flops = dense_flops(layer, site.positions)
        packed = 8 if config.bits == 8 else 4  # ONNX container: INT8, or INT4 for ≤ 4 bits
        bytes_after = math.ceil(weight.numel() * packed / 8) + out_f * _FLOAT_BYTES + bias * _FLOAT_BYTES
        plan = LayerPlan(
            path=site.path, kind=site.kind, shape=tuple(weight.shape),
            params_before=before, params_after=before, flops_before=flops, flops_after=flops,
            bytes_before=before * _FLOAT_BYTES, bytes_after=bytes_after,
            detail={
                "bits": config.bits,
                "act_bits": config.act_bits,
                "weights": "separate" if config.separate else "shared",
                **({"init": config.start} if config.start != "max-abs" else {}),
                "store": ("int8 + per-channel float scale (PyTorch keeps int8 for every width; "
                          f"ONNX INT{packed} after compress_onnx_weights(bits={packed}))"),
                "note": "same FLOP count; onnxruntime CPU runs integer kernels only where it fuses QDQ",
            },
        )
        if isinstance(layer, EMBEDDING_TYPES):
            plan.detail.update({"act_bits": None, "store": (
                f"{'int8' if packed == 8 else '4-bit packed'} table + a float scale per row; the rows are gathered, "
                "then dequantized (Gather → Cast → Mul in ONNX)")})
        return plan

    def build(self, site: LayerSite, plan: LayerPlan, *, init: bool = True) -> nn.Module:
        config: QuantConfig = self.config
        if isinstance(site.module, RECURRENT_TYPES):
            return build_recurrent(self, site, plan, init=init)
        if plan.detail.get("bits", config.bits) != config.bits:  # --allocate gave this layer its own width
            config = dataclasses.replace(config, bits=plan.detail["bits"])
        ids = isinstance(site.module, EMBEDDING_TYPES)  # an embedding's inputs are token ids: never quantized
        twin = QuantTwin(site.module, bits=config.bits, act_bits=None if ids else config.act_bits,
                         share=not config.separate, init=init, fixed_scale=config.start != "max-abs")
        if init and twin.fixed_scale:
            start_fixed_grid(twin, config, site, plan)
        return twin

    def share_dense_weights(self) -> bool:
        return not self.config.separate

    def materialize(self, compressed: nn.Module) -> nn.Module:
        if isinstance(compressed, RecurrentTwin):
            return materialize_recurrent(self, compressed)
        if not isinstance(compressed, QuantTwin):
            return compressed
        q, scale = compressed.quantized()
        if issubclass(compressed.layer_type, EMBEDDING_TYPES):  # gather the integer rows, then dequantize
            return QuantizedEmbedding(compressed, q, scale)
        if compressed.act_bits is not None and not bool(compressed.act_observed) and not compressed.allocated_only:
            log.warning("quantized %s: no activation range was observed (the model never ran in train mode at β < 1); "
                        "its inputs stay float: fine-tune before vanish to quantize activations", compressed.extra_repr())
        return QuantizedLayer(compressed, q, scale)
