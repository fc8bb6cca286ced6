"""Quantization: the twin computes with weights fake-quantized per output channel, or per group of inputs.

b-bit symmetric (b = 8, 4, 2): scale_c = max|w_c| / (2^(b−1) − 1), q = round(w / scale_c).
Binary (b = 1): q = sign(w), scale_c = mean|w_c|. Ternary (TWN): q ∈ {−1, 0, +1} with
threshold Δ_c = 0.7·mean|w_c|, scale_c = mean of |w| above Δ_c. With `--group-size g` (integer
widths) a Linear gets one scale per g consecutive input weights of each row instead, as the int4
quantizers of language models do (group_scales.py). Every form trains through a
straight-through estimator on a latent float weight, shared with the dense layer by default.
Optionally the layer input is fake-quantized to 8 bits (asymmetric, per tensor) with a range
observed as an exponential moving average while training; the layer output's range is then
observed too (per output channel, so that a batch norm folded into the layer at export maps it
exactly), which static int8 export (`export/kernels/static_int8.py`) turns into output scales.
With `--clip-search` or a data-aware start (GPTQ) the weight scales are chosen once and kept
fixed instead (quant_start.py).

`materialize` stores the integers (int8 in PyTorch whatever b is) and the float scales; its
forward dequantizes with `quantized_decomposed.dequantize_per_channel` (over the (out·groups, g)
rows of a grouped weight, reshaped back), which exports to ONNX as an int8 initializer +
DequantizeLinear (+ Reshape when grouped: blocked DequantizeLinear once the weights are stored as
integers, `export/kernels/weight_only.py`), and its activation quantization as
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
from .group_scales import (check_group_size, dequantize, fake_quantize_weight, layer_group_size, quantize_weight,
                           scale_rows)
from .quant_start import start_fixed_grid
from .scale_grid import fixed_fake_quantize, grid_integers
from .base import unchanged_plan
from .embedding import QuantizedEmbedding
from .layer_types import EMBEDDING_TYPES, RECURRENT_TYPES, call_layer, copy_layer_attrs, dense_flops, single_weight_refusal
from .recurrent import RecurrentTwin, build_recurrent, materialize_recurrent, plan_recurrent
from .twin import SEPARATE_WEIGHTS, WeightTwin, WeightTwinMethod

__all__ = ["QuantConfig", "QuantMethod", "QuantTwin", "QuantizedLayer", "quantize_weight", "fake_quantize_weight",
           "SUPPORTED_BITS"]

_dequantize = dequantize  # the name tests and older callers import

log = logging.getLogger(__name__)

SUPPORTED_BITS = (8, 4, 2, 1, "ternary")
ACT_BITS = (8,)
_FLOAT_BYTES = 4


@dataclass(frozen=True)
class QuantConfig(DataAwareStarts, MethodConfig):
    """Weight quantization (fake-quant + STE while blending, integers after vanish).

    Args:
        bits: 8, 4, 2, 1 (binary) or "ternary"; symmetric scales.
        group_size: None for one scale per output channel, or g (a power of 2 ≥ 16, with 8, 4 or 2
            bits) for one per g consecutive input weights of a Linear (group_scales.py).
        act_bits: None, or 8 to fake-quantize each layer's input (observed EMA min/max range).
        separate_weights: the twin gets its own latent weights (default: the dense layer's).
        init: "auto" (data-aware with calibration data and bits ≤ 4), "plain" (max-abs scales) or
            "data-aware": GPTQ (gptq.py; at 8 bits only if asked), the twin starting from its solution
            in its own weight copy.
        clip_search: fixed scales by an MSE-optimal clipping search (scale_grid.py), input-weighted
            with a data-aware start: the cheap option.
    """

    method = "quant"
    version = 2  # 2: group_size
    gram_starts = own_weight_starts = ("gptq",)
    cli_options = (
        CliOption("--bits", "weight bits 8, 4, 2, 1 or ternary"),
        CliOption("--act-bits", "fake-quantize layer inputs to 8 bits", type=int),
        SEPARATE_WEIGHTS,
        INIT,
        CliOption("--clip-search", "fixed scales by an MSE-optimal clipping search (input-weighted with "
                  "calibration data), instead of GPTQ", switch=True),
        CliOption("--group-size", "one scale per N input weights of a Linear (a power of 2 ≥ 16, e.g. 32) "
                  "instead of one per output channel", type=int),
    )
    bits: int | str = 8
    act_bits: int | None = None
    separate_weights: bool = False
    init: str = "auto"
    clip_search: bool = False
    group_size: int | None = None

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
        check_group_size(self.group_size, bits)
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


class QuantTwin(ActRange, WeightTwin):
    """The quantized twin: fake-quantized weights (and inputs) over a latent float weight."""

    def __init__(self, layer: nn.Module, *, bits: int | str = 8, act_bits: int | None = None,
                 share: bool = True, init: bool = True, fixed_scale: bool = False, group_size: int | None = None):
        super().__init__(layer, share=share, init=init)
        self.bits = bits
        self.group_size = group_size  # None: one scale per output channel; g: per g inputs (group_scales.py)
        self.allocated_only = not init  # rebuilt for loading: its state is about to be overwritten
        self._init_act(act_bits, self.weight.device)
        self.fixed_scale = fixed_scale
        if fixed_scale:  # the scales chosen once (quant_start.py), not recomputed
            plain = quantize_weight(self.weight, bits, group_size)[1]
            self.register_buffer("scale", plain.float() if init else torch.ones_like(plain, dtype=torch.float32))
        if act_bits is not None:
            self._init_out_range(self.weight.shape[0], self.weight.device)

    def compressed_weight(self) -> torch.Tensor:
        if self.fixed_scale:
            return fixed_fake_quantize(self.weight, self.scale, self.bits)
        return fake_quantize_weight(self.weight, self.bits, self.group_size)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The integers (as floats) and scales, (out,) or (out, groups), of the current latent weight (pure)."""
        if self.fixed_scale:
            return grid_integers(self.weight, self.scale, self.bits), self.scale
        return quantize_weight(self.weight, self.bits, self.group_size)

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
        groups = f", group_size={self.group_size}" if self.group_size else ""
        return f"{super().extra_repr()}, bits={self.bits}{groups}, act_bits={self.act_bits}"


class QuantizedLayer(ActRange, nn.Module):
    """The deployed form: int8 weight buffer + float scales (out,) or (out, groups), dequantized in forward.

    `quantized_decomposed.dequantize_per_channel` exports to ONNX DequantizeLinear on an int8
    initializer (on the (out·groups, g) rows of a grouped weight, then a Reshape); the (optional)
    input quantization to QuantizeLinear → DequantizeLinear.
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
        """The weight the layer computes with (q · scale, each scale over its row or group)."""
        if self.scale.dim() == 1:
            return torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight, self.scale, None, 0, -128, 127, torch.int8, out_dtype=self._out_dtype)
        return torch.ops.quantized_decomposed.dequantize_per_channel(
            scale_rows(self.qweight, self.scale), self.scale.reshape(-1), None, 0, -128, 127, torch.int8,
            out_dtype=self._out_dtype).reshape(self.qweight.shape)

    def forward(self, x, output_size=None):
        if self._act is not None:
            x = act_fake_quant(x, *self._act)
        return call_layer(self.layer_type, self, x, self.dequantized_weight(), self.bias, output_size)

    def extra_repr(self) -> str:
        groups = f", scales={tuple(self.scale.shape)}" if self.scale.dim() == 2 else ""
        return (f"{self.layer_type.__name__}, qweight={tuple(self.qweight.shape)} int8, bits={self.bits}{groups}, "
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
            return self._plan_recurrent(site)
        if (refusal := single_weight_refusal(site.module)) is not None:
            return unchanged_plan(site, refusal)
        layer = site.module
        weight = layer.weight
        out_f = weight.shape[0]
        bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
        before = layer_params(layer)
        flops = dense_flops(layer, site.positions)
        packed = 8 if config.bits == 8 else 4  # ONNX container: INT8, or INT4 for ≤ 4 bits
        group, per_channel_why = layer_group_size(layer, config.group_size)
        scales = out_f * (weight.shape[1] // group if group else 1)
        bytes_after = math.ceil(weight.numel() * packed / 8) + scales * _FLOAT_BYTES + bias * _FLOAT_BYTES
        plan = LayerPlan(
            path=site.path, kind=site.kind, shape=tuple(weight.shape),
            params_before=before, params_after=before, flops_before=flops, flops_after=flops,
            bytes_before=before * _FLOAT_BYTES, bytes_after=bytes_after,
            detail={
                "bits": config.bits,
                "act_bits": config.act_bits,
                "weights": "separate" if config.separate else "shared",
                **({"init": config.start} if config.start != "max-abs" else {}),
                **({"group_size": group} if group else {"scales": per_channel_why} if per_channel_why else {}),
                "store": (f"int8 + a float scale per {f'{group} inputs of a row' if group else 'output channel'} "
                          f"(PyTorch keeps int8 for every width; ONNX INT{packed} after "
                          f"compress_onnx_weights(bits={packed}))"),
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
                         share=not config.separate, init=init, fixed_scale=config.start != "max-abs",
                         group_size=plan.detail.get("group_size"))  # the plan's: a recipe without it is per channel
        if init and twin.fixed_scale:
            start_fixed_grid(twin, config, site, plan)
        return twin

    def _plan_recurrent(self, site: LayerSite) -> LayerPlan:
        """The recurrent layer's plan, per-channel scales: the ONNX recurrent ops take whole gate matrices."""
        if self.config.group_size is None:
            return plan_recurrent(self, site)
        plan = plan_recurrent(QuantMethod(dataclasses.replace(self.config, group_size=None)), site)
        plan.detail["scales"] = "per output channel (--group-size applies to Linear layers, not recurrent gates)"
        return plan

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
