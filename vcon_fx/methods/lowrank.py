"""Low-rank decomposition: W ≈ U_r·S_r·V_rᵀ, so one layer becomes two thinner ones.

Linear(in→out) becomes Linear(in→r) then Linear(r→out); a k×k conv becomes a k×k conv to r
channels then a 1×1 conv to the original outputs; transposed convs and embeddings are factorized
on their own layouts (layouts.py), recurrent layers gate matrix by gate matrix (recurrent.py).
Both factors start from the truncated SVD of the dense weight, √S split between them so they
train at similar scales.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from .base import CliOption, LayerPlan, LayerSite, Method, MethodConfig, MethodExamples, layer_params, register_method
from .calibration import INIT, InputStatistics, check_init, resolve_init
from .layer_types import CONV_TYPES, RECURRENT_TYPES, dense_flops, single_weight_refusal
from .layouts import assign_factors, factor_layers, lowrank_flops, lowrank_refusal
from .recurrent import build_recurrent, materialize_recurrent, plan_recurrent
from .svd import truncated_svd
from .whitening import whitened_factors

__all__ = ["LowRankConfig", "LowRank", "LowRankMethod", "choose_rank", "truncated_svd"]

_FLOAT_BYTES = 4
_SCALED_INPUTS = (nn.Linear, *CONV_TYPES)


@dataclass(frozen=True)
class LowRankConfig(MethodConfig):
    """Low-rank factorization; give exactly one of rank, energy or ratio.

    Args:
        rank: keep this many singular values in every layer.
        energy: keep the fewest singular values holding this share of Σσ² (0 < energy ≤ 1).
        ratio: parameter budget: the factors hold about this share of the layer's weights.
        rank_multiple: round every rank up to a multiple of this (16 suits CPU kernels: ranks like
            25 fall out of onnxruntime's 16-channel blocked convolutions and run slower than their
            FLOPs; see benchmarks/DEPLOY.md). A rounded rank that saves nothing is skipped as usual.
        svd: how the factors are initialized: "exact" (eigh of the Gram matrix), "randomized"
            (sketch + power iterations), or "auto": randomized when the rank is at most a quarter of
            the layer's smaller side (≥ 256), 3-6× faster and within ~0.7 % of the optimal error.
        activation_aware: factorize W·diag(s), s = RMS of each input feature on the example
            inputs, then undo the scaling (graph/calibrate.py): the truncation keeps what the
            layer's real inputs use. Statistics from calibration data when given, else from the
            example inputs (give real ones). The cheap data-aware start.
        init: "auto" (data-aware when calibration data is given), "plain" (the truncated SVD) or
            "data-aware": truncation-aware whitening (whitening.py), the SVD of W·S with S the
            Cholesky factor of the inputs' XᵀX, which minimizes the output error on that data.
    """

    method = "lowrank"
    version = 1
    cli_label = "low-rank"
    cli_options = (
        CliOption("--rank", "singular values kept per layer", type=int),
        CliOption("--energy", "share of singular-value energy kept (0-1]", type=float),
        CliOption("--ratio", "parameter budget per layer (0-1)", type=float),
        CliOption("--rank-multiple", "round ranks up to a multiple (16 suits CPU kernels)", type=int),
        CliOption("--activation-aware", "weight the SVD by each input's RMS (on --calibration-data, else on the "
                  "example inputs)", switch=True),
        CliOption("--svd", "factor initialization (auto: randomized when rank ≤ ¼ of the layer's size)",
                  choices=("auto", "exact", "randomized")),
        INIT,
    )
    rank: int | None = None
    energy: float | None = None
    ratio: float | None = None
    rank_multiple: int | None = None
    svd: str = "auto"
    activation_aware: bool = False
    init: str = "auto"

    def __post_init__(self):
        given = [k for k in ("rank", "energy", "ratio") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ConfigError(f"low-rank needs exactly one of --rank, --energy, --ratio; got {given or 'none'}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ConfigError(f"--rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not 0.0 < float(self.energy) <= 1.0:
            raise ConfigError(f"--energy must lie in (0, 1], got {self.energy!r}")
        if self.ratio is not None and not 0.0 < float(self.ratio) < 1.0:
            raise ConfigError(f"--ratio must lie in (0, 1), got {self.ratio!r}")
        if self.rank_multiple is not None and (isinstance(self.rank_multiple, bool)
                                               or not isinstance(self.rank_multiple, int) or self.rank_multiple <= 0):
            raise ConfigError(f"--rank-multiple must be a positive integer, got {self.rank_multiple!r}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise ConfigError(f"--svd must be auto, exact or randomized, got {self.svd!r}")
        check_init(self.init, "low-rank")
        if self.activation_aware and self.init == "plain":
            raise ConfigError("low-rank: --activation-aware is a data-aware start; drop --init plain (or the flag)")

    @property
    def uses_input_statistics(self) -> bool:
        return bool(self.activation_aware)

    @property
    def needs_gram(self) -> bool:
        return self.start == "whitened"

    @property
    def start(self) -> str:
        """How the factors start: "svd", "activation-aware" (diagonal scaling) or "whitened"."""
        if self.activation_aware:
            return "activation-aware"
        return "whitened" if self.init == "data-aware" else "svd"

    def calibrated(self, given: bool) -> "LowRankConfig":
        return dataclasses.replace(self, init=resolve_init(self.init, given, has_data_aware=True, method="low-rank"))

    @classmethod
    def examples(cls) -> MethodExamples:
        return MethodExamples(test=cls(ratio=0.25), cuda=cls(rank=8), demo=cls(rank=4), demo_setting="rank 4")


class LowRank(nn.Sequential):
    """Two thin layers in sequence: `down` (to rank r) then `up` (back to the outputs)."""

    def __init__(self, down: nn.Module, up: nn.Module):
        super().__init__()
        self.add_module("down", down)
        self.add_module("up", up)


def _as_matrix(layer: nn.Module) -> torch.Tensor:
    """The weight as a 2-D (out, in·k…) matrix."""
    return layer.weight.detach().reshape(layer.weight.shape[0], -1)


def choose_rank(config: LowRankConfig, layer: nn.Module) -> int:
    """The rank `config` asks for on `layer`, rounded up to `rank_multiple` (pure; SVD only for `energy`)."""
    rank = _base_rank(config, layer)
    if config.rank_multiple:
        rank = -(-rank // config.rank_multiple) * config.rank_multiple
    return rank


def _base_rank(config: LowRankConfig, layer: nn.Module) -> int:
    out_f, in_f = _as_matrix(layer).shape
    if config.rank is not None:
        return config.rank
    if config.ratio is not None:
        return max(1, math.floor(config.ratio * out_f * in_f / (out_f + in_f)))
    wide = _as_matrix(layer).double()
    wide = wide if wide.shape[0] <= wide.shape[1] else wide.T
    energy = torch.linalg.eigvalsh(wide @ wide.T).flip(0).clamp_min(0)  # σ², largest first
    total = float(energy.sum())
    if total == 0.0:  # an all-zero weight: one component represents it exactly
        return 1
    cumulative = torch.cumsum(energy, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(float(config.energy) - 1e-7)).item()) + 1


@register_method
class LowRankMethod(Method):
    config_type = LowRankConfig
    summary_keys = ("rank",)

    def plan(self, site: LayerSite) -> LayerPlan:
        if isinstance(site.module, RECURRENT_TYPES):  # each gate matrix as a Linear (recurrent.py)
            return plan_recurrent(self, site)
        layer = site.module
        weight = layer.weight
        out_f, in_f = weight.shape[0], weight[0].numel()
        bias = 0 if getattr(layer, "bias", None) is None else layer.bias.numel()
        before = layer_params(layer)
        positions = site.positions
        flops = dense_flops(layer, positions)
        plan = LayerPlan(
            path=site.path, kind=site.kind, shape=tuple(weight.shape),
            params_before=before, params_after=before, flops_before=flops, flops_after=flops,
            bytes_before=before * _FLOAT_BYTES, bytes_after=before * _FLOAT_BYTES,
        )
        refusal = lowrank_refusal(layer) or single_weight_refusal(layer)
        if refusal:
            plan.skip_reason = refusal
            return plan
        rank = choose_rank(self.config, layer)
        after = rank * (in_f + out_f) + bias
        plan.detail = {"rank": rank}
        if self.config.start != "svd":
            plan.detail["init"] = self.config.start
        if rank >= min(out_f, in_f) or after >= before:
            plan.skip_reason = (
                f"rank {rank} would not reduce parameters ({after} ≥ {before}); "
                f"a rank below {(out_f * in_f) // (out_f + in_f)} would"
            )
            return plan
        plan.params_after = after
        plan.bytes_after = after * _FLOAT_BYTES
        plan.flops_after = lowrank_flops(layer, rank, positions)
        return plan

    def build(self, site: LayerSite, plan: LayerPlan, *, init: bool = True) -> nn.Module:
        layer = site.module
        if isinstance(layer, RECURRENT_TYPES):
            return build_recurrent(self, site, plan, init=init)
        rank = plan.detail["rank"]
        down, up = factor_layers(layer, rank, device=layer.weight.device, dtype=layer.weight.dtype)
        if init:
            with torch.no_grad():
                a, b = self._factors(site, plan, rank)
                assign_factors(layer, down, up, a, b)
        return LowRank(down, up)

    def materialize(self, compressed: nn.Module) -> nn.Module:
        return materialize_recurrent(self, compressed)

    def inner_statistics(self, site: LayerSite, twin: nn.Module) -> dict[str, InputStatistics]:
        """`down` reads the layer's inputs; `up` reads down's outputs B·x, so its XᵀX is B·(XᵀX)·Bᵀ."""
        stats = site.statistics
        if stats is None or not isinstance(twin, LowRank) or stats.column_squares.numel() != twin.down.weight[0].numel():
            return {}
        inner = {"down": stats}
        if stats.gram is not None:
            b = twin.down.weight.detach().reshape(twin.down.weight.shape[0], -1).to(stats.gram)
            gram = b @ stats.gram @ b.T
            inner["up"] = InputStatistics(stats.rows, gram.diagonal().clone(), gram.diagonal().clone(), gram)
        return inner

    def _factors(self, site: LayerSite, plan: LayerPlan, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated SVD of the weight, of W·diag(s) with the scaling undone (activation-aware), or whitened."""
        matrix = _as_matrix(site.module)
        # input statistics describe a Linear's / conv's input columns; other layouts (ids, transposed) factor W as is
        scaled = isinstance(site.module, _SCALED_INPUTS)
        if self.config.start == "whitened" and scaled and site.statistics is not None and site.statistics.gram is not None:
            a, b, shift = whitened_factors(matrix, site.statistics.hessian(), rank, self.config.svd)
            if shift:
                plan.detail["gram_shift"] = shift  # the pipeline turns it into a note
            return a, b
        if self.config.start == "whitened":
            plan.detail["init"] = "svd (no input statistics for this layer)"
        if not self.config.activation_aware or site.input_rms is None or not scaled:
            return truncated_svd(matrix, rank, self.config.svd)
        layer = site.module
        per_column = layer.weight[0].numel() // site.input_rms.numel()  # conv: kh·kw columns per channel
        scale = site.input_rms.to(matrix).repeat_interleave(per_column)
        # an input that never fires carries no information: keep it at a small, non-zero weight
        scale = scale.clamp_min(scale.max() * 1e-4 if scale.numel() and scale.max() > 0 else 1.0)
        a, b = truncated_svd(matrix * scale, rank, self.config.svd)
        return a, b / scale
