"""Quantization: the twin computes with weights fake-quantized per output channel, or per group of inputs.

b-bit symmetric (b = 8, 4, 2): scale_c = max|w_c| / (2^(b−1) − 1), q = round(w / scale_c).
Binary (b = 1): q = sign(w), scale_c = mean|w_c|. Ternary (TWN): q ∈ {−1, 0, +1} with
threshold Δ_c = 0.7·mean|w_c|, scale_c = mean of |w| above Δ_c. With `--group-size g` (integer
widths) a Linear gets one scale per g consecutive input weights of each row instead, as the int4
quantizers of language models do (group_scales.py), and with `--asymmetric` a zero point per
group too, the grid spanning the group's [min, max] (zero_point.py). Every form trains through a
straight-through estimator on a latent float weight, shared with the dense layer by default.
Optionally the layer input is fake-quantized to 8 bits (asymmetric, per tensor) with a range
observed as an exponential moving average while training; the layer output's range is then
observed too (per output channel, so that a batch norm folded into the layer at export maps it
exactly), which static int8 export (`export/kernels/static_int8.py`) turns into output scales.
With `--clip-search` or a data-aware start (GPTQ) the weight scales are chosen once and kept
fixed instead (quant_start.py).

`materialize` stores the integers (int8 in PyTorch whatever b is), the float scales and the zero
points as a QuantizedLayer (quantized_layer.py): a vanished model is ~4× smaller on disk and in ONNX.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import CliOption, LayerPlan, LayerSite, MethodConfig, MethodExamples, layer_params, register_method
from .calibration import INIT, DataAwareStarts, check_init, resolve_init
from .act_range import ACT_MOMENTUM, ActRange, act_fake_quant
from .group_scales import check_group_size, dequantize, fake_quantize_weight, layer_group_size, quantize_weight
from .quant_start import start_fixed_grid
from .quantized_layer import QuantizedLayer
from .zero_point import ASYMMETRIC_BITS, minmax_grid, quantize_weight_asymmetric
from .scale_grid import fixed_fake_quantize, grid_integers
from .base import unchanged_plan
from .embedding import QuantizedEmbedding
from .layer_types import EMBEDDING_TYPES, RECURRENT_TYPES, dense_flops, single_weight_refusal
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
        asymmetric: with `group_size`, a zero point per group too: all 2^b levels over the group's
            [min, max] (zero_point.py); layers that keep per-channel scales stay symmetric.
        act_bits: None, or 8 to fake-quantize each layer's input (observed EMA min/max range).
        separate_weights: the twin gets its own latent weights (default: the dense layer's).
        init: "auto" (data-aware with calibration data and bits ≤ 4), "plain" (max-abs scales) or
            "data-aware": GPTQ (gptq.py; at 8 bits only if asked), the twin starting from its solution
            in its own weight copy.
        clip_search: fixed scales by an MSE-optimal clipping search (scale_grid.py), input-weighted
            with a data-aware start: the cheap option.
    """

    method = "quant"
    version = 3  # 2: group_size; 3: asymmetric
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
        CliOption("--asymmetric", "with --group-size: a zero point per group too, the grid spanning each group's "
                  "[min, max] (onnxruntime's is_symmetric=False)", switch=True),
    )
    bits: int | str = 8
    act_bits: int | None = None
    separate_weights: bool = False
    init: str = "auto"
    clip_search: bool = False
    group_size: int | None = None
    asymmetric: bool = False

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
        if not all(isinstance(v, bool) for v in (self.separate_weights, self.clip_search, self.asymmetric)):
            raise ConfigError(f"separate_weights / clip_search / asymmetric must be true or false, got {self!r}")
        check_group_size(self.group_size, bits)
        if self.asymmetric and (self.group_size is None or bits not in ASYMMETRIC_BITS):
            raise ConfigError(f"--asymmetric puts a zero point beside each group's scale: it needs --group-size and "
                              f"--bits {', '.join(map(str, ASYMMETRIC_BITS))} (got --bits {bits}"
                              f"{'' if self.group_size else ', no --group-size'}); add --group-size 32, or leave "
                              "--asymmetric out")
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
                 share: bool = True, init: bool = True, fixed_scale: bool = False, group_size: int | None = None,
                 asymmetric: bool = False):
        super().__init__(layer, share=share, init=init)
        self.bits = bits
        self.group_size = group_size  # None: one scale per output channel; g: per g inputs (group_scales.py)
        self.asymmetric = asymmetric and group_size is not None  # a zero point per group (zero_point.py)
        self.allocated_only = not init  # rebuilt for loading: its state is about to be overwritten
        self._init_act(act_bits, self.weight.device)
        self.fixed_scale = fixed_scale
        if fixed_scale:  # the scales (and zero points) chosen once (quant_start.py), not recomputed
            if self.asymmetric:
                plain, zero = minmax_grid(self.weight, bits, group_size)
                self.register_buffer("zero", zero if init else torch.zeros_like(zero))
            else:
                plain = quantize_weight(self.weight, bits, group_size)[1]
            self.register_buffer("scale", plain.float() if init else torch.ones_like(plain, dtype=torch.float32))
        if act_bits is not None:
            self._init_out_range(self.weight.shape[0], self.weight.device)

    def compressed_weight(self) -> torch.Tensor:
        if self.fixed_scale:
            return fixed_fake_quantize(self.weight, self.scale, self.bits, self._zero())
        return fake_quantize_weight(self.weight, self.bits, self.group_size, self.asymmetric)

    def _zero(self) -> torch.Tensor | None:
        return self.zero if self.asymmetric else None

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The integers (as floats), scales (out,) or (out, groups) and zero points (or None) of the latent weight (pure)."""
        if self.fixed_scale:
            return grid_integers(self.weight, self.scale, self.bits, self._zero()), self.scale, self._zero()
        if self.asymmetric:
            return quantize_weight_asymmetric(self.weight, self.bits, self.group_size)
        return *quantize_weight(self.weight, self.bits, self.group_size), None

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
        groups += ", asymmetric" if self.asymmetric else ""
        return f"{super().extra_repr()}, bits={self.bits}{groups}, act_bits={self.act_bits}"


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
        zeros = scales if group and config.asymmetric else 0  # zero points, packed like the integers
        bytes_after = (math.ceil((weight.numel() + zeros) * packed / 8) + scales * _FLOAT_BYTES
                       + bias * _FLOAT_BYTES)
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
                **({"asymmetric": True} if group and config.asymmetric else {}),
                "store": (f"int8 + a float scale {'and a zero point ' if zeros else ''}"
                          f"per {f'{group} inputs of a row' if group else 'output channel'} "
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
                         group_size=plan.detail.get("group_size"),  # the plan's: a recipe without it is per channel
                         asymmetric=bool(plan.detail.get("asymmetric")))
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
        q, scale, zero = compressed.quantized()
        if issubclass(compressed.layer_type, EMBEDDING_TYPES):  # gather the integer rows, then dequantize
            return QuantizedEmbedding(compressed, q, scale)
        if compressed.act_bits is not None and not bool(compressed.act_observed) and not compressed.allocated_only:
            log.warning("quantized %s: no activation range was observed (the model never ran in train mode at β < 1); "
                        "its inputs stay float: fine-tune before vanish to quantize activations", compressed.extra_repr())
        return QuantizedLayer(compressed, q, scale, zero)
