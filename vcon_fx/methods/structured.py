"""Structured pruning: whole channels leave a layer together with the next layer's inputs.

With `PruneConfig(structured=True)` (block granularity only), a layer L whose output reaches
exactly one next layer M through ops that keep a zero channel at zero (`channel_pairs.py`; a
BatchNorm between them has its weight and bias masked too) loses its weakest output channels
(L2 norm of W_L's rows) together with M's matching input channels:

    M(act(L(x)))  with rows c ∉ keep of W_L, b_L zeroed  =  M[:, keep](act(L[keep](x)))

so the vanished block holds smaller plain layers. Channels that reach a residual sum, a
LayerNorm, a reshape or the block's output stay, and the plan says why. `PruneMethod` calls the
block-level functions at the end of this file when its config is structured.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import LayerPlan, LayerSite
from .channel_pairs import CHANNEL_NORMS, find_channel_pairs
from .twin import WeightTwin

__all__ = [
    "ChannelPrunedLayer",
    "MaskedBatchNorm",
    "channel_mask",
    "plan_structured_layer",
    "check_structured_groups",
    "plan_channel_block",
    "build_channel_block",
    "materialize_channel_block",
]

log = logging.getLogger(__name__)

_FLOAT_BYTES = 4


@torch.no_grad()
def channel_mask(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over output channels: the `keep` rows of `weight` with the largest L2 norm."""
    norms = weight.detach().flatten(1).float().norm(dim=1)
    mask = torch.zeros(weight.shape[0], dtype=torch.bool, device=weight.device)
    mask[torch.topk(norms, min(int(keep), norms.numel()), sorted=False).indices] = True
    return mask


def _channel_masked(t: torch.Tensor, mask: torch.Tensor, ste: bool) -> torch.Tensor:
    """t with channel c (dim 0) zeroed where mask[c] is False; with `ste` the gradient is identity."""
    m = mask.to(t.dtype).view(-1, *([1] * (t.dim() - 1)))
    if not ste:
        return t * m
    return t.detach() * m + (t - t.detach())  # value: t ⊙ m; gradient: identity (STE)


class ChannelPrunedLayer(WeightTwin):
    """Twin of a layer in a structured-pruning pair.

    As the producer L (after `prune_outputs`): rows of the weight and entries of the bias
    outside the channel mask are zero, so those output channels are exactly 0. As the
    consumer M (`fed_by` set) it computes as the dense layer: its inputs on pruned channels
    are 0 already; `sliced` drops those columns at vanish. A layer can be both.
    """

    def __init__(self, layer: nn.Module, *, share: bool = True, init: bool = True):
        super().__init__(layer, share=share, init=init)
        self.keep: int | None = None  # output channels kept (None: all)
        self.fixed_mask = False
        self.feeds: str | None = None  # path, inside the block, of the layer reading the outputs
        self.norms: tuple[str, ...] = ()  # batch norms between the two, masked too
        self.fed_by: str | None = None  # path of the layer whose pruned outputs this one reads

    def prune_outputs(self, keep: int, *, feeds: str, norms: tuple[str, ...] = (), fixed_mask: bool = False,
                      init: bool = True) -> None:
        """Keep `keep` output channels (in place). `init=False`: a placeholder fixed mask that loading overwrites."""
        self.keep, self.feeds, self.norms, self.fixed_mask = int(keep), feeds, tuple(norms), fixed_mask
        if fixed_mask:
            if init:
                mask = channel_mask(self.weight, self.keep)
            else:
                mask = torch.zeros(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
                mask[: self.keep] = True
            self.register_buffer("mask", mask)

    def keep_mask(self) -> torch.Tensor | None:
        """The output channels kept now (None when all are): fixed, or from the current latent rows."""
        if self.keep is None:
            return None
        return self.mask if self.fixed_mask else channel_mask(self.weight, self.keep)

    def _masked(self, t: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        return t if t is None or mask is None else _channel_masked(t, mask, ste=not self.fixed_mask)

    def compressed_weight(self) -> torch.Tensor:
        return self._masked(self.weight, self.keep_mask())

    def forward(self, x):
        mask = self.keep_mask()
        return self.call(x, self._masked(self.weight, mask), self._masked(self.bias, mask))

    @torch.no_grad()
    def sliced(self, out_index: torch.Tensor | None = None, in_index: torch.Tensor | None = None) -> nn.Module:
        """A plain Linear / Conv (own Parameters) with only the given output and input channels."""
        mask = self.keep_mask()
        weight, bias = self._masked(self.weight, mask), self._masked(self.bias, mask)
        if out_index is not None:
            weight, bias = weight[out_index], (None if bias is None else bias[out_index])
        if in_index is not None:
            weight = weight[:, in_index]
        factory = {"device": weight.device, "dtype": weight.dtype}
        out_c, in_c = weight.shape[0], weight.shape[1]
        if self.layer_type is nn.Linear:
            layer = nn.utils.skip_init(nn.Linear, in_c, out_c, bias=bias is not None, **factory)
        else:
            layer = nn.utils.skip_init(
                self.layer_type, in_c, out_c, self.kernel_size, stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=1, bias=bias is not None, padding_mode=self.padding_mode, **factory,
            )
        layer.weight.copy_(weight)
        layer.weight.requires_grad_(self.weight.requires_grad)
        if bias is not None:
            layer.bias.copy_(bias)
            layer.bias.requires_grad_(self.bias.requires_grad)
        return layer.train(self.training)

    def extra_repr(self) -> str:
        roles = []
        if self.keep is not None:
            roles.append(f"outputs kept={self.keep}/{self.weight.shape[0]} → {self.feeds}, "
                         f"mask={'fixed' if self.fixed_mask else 'dynamic'}")
        if self.fed_by is not None:
            roles.append(f"inputs from {self.fed_by}")
        return ", ".join([super().extra_repr(), *roles])




class MaskedBatchNorm(nn.Module):
    """A BatchNorm whose weight and bias are zero on the channels its producer prunes.

    A pruned channel enters as 0 and must leave as 0: BN(0) = −μ·γ/σ + β ≠ 0 unless γ = β = 0.
    It holds the norm's own tensors under the same names (state-dict keys do not change) and a
    plain reference to the producer twin, whose current mask it reads.
    """

    def __init__(self, norm: nn.Module, source: ChannelPrunedLayer):
        super().__init__()
        if not isinstance(norm, CHANNEL_NORMS) or not norm.affine:
            raise ConfigError(f"{type(norm).__name__} cannot be masked: an affine BatchNorm1d / BatchNorm2d is needed")
        self.norm_type = type(norm)
        for attr in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, attr, getattr(norm, attr))
        self.weight, self.bias = norm.weight, norm.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(norm, name))
        self.train(norm.training)
        object.__setattr__(self, "_source", source)  # not a submodule: it lives at its own path

    def forward(self, x):
        # _BatchNorm.forward, with γ and β masked
        self.norm_type._check_input_dim(self, x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        mask = self._source.keep_mask()
        return F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                            self._source._masked(self.weight, mask), self._source._masked(self.bias, mask),
                            use_batch, factor, self.eps)

    @torch.no_grad()
    def sliced(self, index: torch.Tensor) -> nn.Module:
        """A plain BatchNorm of the kept channels (own tensors)."""
        norm = self.norm_type(len(index), eps=self.eps, momentum=self.momentum, affine=True,
                              track_running_stats=self.track_running_stats,
                              device=self.weight.device, dtype=self.weight.dtype)
        norm.weight.copy_(self.weight[index])
        norm.bias.copy_(self.bias[index])
        norm.weight.requires_grad_(self.weight.requires_grad)
        norm.bias.requires_grad_(self.bias.requires_grad)
        if self.track_running_stats and self.running_mean is not None:
            norm.running_mean.copy_(self.running_mean[index])
            norm.running_var.copy_(self.running_var[index])
            norm.num_batches_tracked.copy_(self.num_batches_tracked)
        return norm.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.norm_type.__name__}({self.num_features}), γ and β masked with the producer's channels"




# ── the block-level steps PruneMethod calls when its config is structured ─────────────────

_PENDING = "pending: channels are paired per block"


def plan_structured_layer(config, layer: nn.Module, plan: LayerPlan) -> LayerPlan:
    """One layer's plan before its block is seen: pending, or skipped (a grouped conv). In place on `plan`."""
    plan.detail = {"sparsity": float(config.sparsity), "structured": _PENDING,
                   "mask": "fixed" if config.fixed_mask else "dynamic",
                   "weights": "separate" if config.separate_weights else "shared"}
    if getattr(layer, "groups", 1) != 1:
        plan.skip_reason = f"structured: a grouped convolution (groups={layer.groups}) keeps its channels"
    return plan


def check_structured_groups(groups: list) -> None:
    """Raise ConfigError when a group is a single layer: channels are paired inside blocks."""
    layers = [g.path for g in groups if g.kind != "block"]
    if layers:
        raise ConfigError(
            f"structured pruning removes a layer's output channels together with the next layer's inputs, "
            f"so it works on blocks, not single layers (got {len(layers)} layer group(s), e.g. {layers[0]}): "
            "use --granularity block with --blocks naming the regions, e.g. "
            "--blocks 'encoder.layer.*.intermediate+output' (transformer MLPs) or 'layer*.*' (ResNet blocks)"
        )


def plan_channel_block(config, block: nn.Module, plans: dict[str, LayerPlan], sites: dict[str, LayerSite]) -> None:
    """Pair the block's pending layers and fill in their kept channels and sizes (in place on `plans`)."""
    pending = {rel: p for rel, p in plans.items() if not p.skipped and p.detail.get("structured") == _PENDING}
    if not pending:
        return
    pairs, reasons = find_channel_pairs(block, pending, sites)
    keep: dict[str, int] = {}
    for rel, (_consumer_rel, _norms) in list(pairs.items()):
        channels = block.get_submodule(rel).weight.shape[0]
        keep[rel] = max(channels - round(float(config.sparsity) * channels), 1)
        if keep[rel] >= channels:
            reasons[rel] = f"at sparsity {config.sparsity} none of its {channels} channels would go"
            del pairs[rel], keep[rel]
    fed_by = {consumer: rel for rel, (consumer, _norms) in pairs.items()}
    name = _namer(plans)
    for rel, plan in pending.items():
        out, src = pairs.get(rel), fed_by.get(rel)
        if out is None and src is None:
            plan.skip_reason = f"structured: no channels to remove ({reasons[rel]}; no pruned layer feeds it)"
            continue
        _plan_paired_layer(config, block.get_submodule(rel), plan, out, src and (src, keep[src]),
                           keep.get(rel), reasons.get(rel), name)
    if not pairs:
        log.warning("structured pruning found no layer pair in a block with %s: %s", sorted(pending),
                    "; ".join(f"{r}: {why}" for r, why in sorted(reasons.items())))


def _plan_paired_layer(config, layer: nn.Module, plan: LayerPlan, out, src, keep_out, why_not_out, name) -> None:
    """Sizes and detail of one layer that loses outputs (`out` = (M, norms)), inputs (`src` = (L, kept)), or both."""
    out_c, in_c = layer.weight.shape[0], layer.weight.shape[1]
    k_out = keep_out if out else out_c
    k_in = src[1] if src else in_c
    per_pair = layer.weight[0, 0].numel()  # kernel positions
    bias = layer.bias is not None
    norms = list(out[1]) if out else []
    norm_before = 2 * out_c * len(norms)  # γ and β of each masked norm go with the channels
    plan.params_before += norm_before
    plan.params_after = k_out * k_in * per_pair + (k_out if bias else 0) + 2 * k_out * len(norms)
    plan.flops_after = plan.flops_before // (out_c * in_c) * k_out * k_in
    plan.bytes_before = plan.params_before * _FLOAT_BYTES
    plan.bytes_after = plan.params_after * _FLOAT_BYTES
    detail = {"sparsity": float(config.sparsity), "structured": "channels"}
    if out:
        # params of the masked norms (γ, β) are counted with the layer: they go with its channels
        detail.update({"channels kept": f"{k_out}/{out_c} outputs → {name(out[0])}", "keep": k_out,
                       "feeds": name(out[0]), "norms": [name(n) for n in norms]})
    else:
        detail["outputs"] = f"all {out_c} kept: {why_not_out}"
    if src:
        detail.update({"inputs kept": f"{k_in}/{in_c} from {name(src[0])}", "keep_in": k_in, "fed_by": name(src[0])})
    detail.update({"mask": plan.detail["mask"], "weights": plan.detail["weights"]})
    plan.detail = detail


def build_channel_block(config, dense: nn.Module, compressed: nn.Module, plans: dict[str, LayerPlan],
                        sites: dict[str, LayerSite], *, init: bool = True) -> None:
    """Give the block's twins their roles (producer, consumer) and mask its norms (in place on `compressed`)."""
    plan_channel_block(config, dense, plans, sites)  # no-op when the plans are final (a recipe, or inspect's)
    rel = _relativizer(plans)
    for path, plan in plans.items():
        twin = compressed.get_submodule(path)
        if plan.skipped:
            if isinstance(twin, ChannelPrunedLayer):  # built before the pairing found nothing to remove
                compressed.set_submodule(path, copy.deepcopy(dense.get_submodule(path)))
            continue
        detail = plan.detail
        if detail.get("feeds"):
            norms = tuple(rel(n) for n in detail.get("norms", ()))
            twin.prune_outputs(detail["keep"], feeds=rel(detail["feeds"]), norms=norms,
                               fixed_mask=config.fixed_mask, init=init)
            for norm in norms:
                compressed.set_submodule(norm, MaskedBatchNorm(compressed.get_submodule(norm), twin))
        if detail.get("fed_by"):
            twin.fed_by = rel(detail["fed_by"])


def materialize_channel_block(compressed: nn.Module) -> None:
    """Slice every paired twin and masked norm of the block to its kept channels (in place)."""
    twins = {p: m for p, m in compressed.named_modules() if isinstance(m, ChannelPrunedLayer)}
    with torch.no_grad():
        kept = {p: t.keep_mask().nonzero().flatten() for p, t in twins.items() if t.keep is not None}
        inputs = {twins[p].feeds: index for p, index in kept.items()}
        for path, twin in twins.items():
            for norm in twin.norms:
                compressed.set_submodule(norm, compressed.get_submodule(norm).sliced(kept[path]))
        for path, twin in twins.items():
            compressed.set_submodule(path, twin.sliced(kept.get(path), inputs.get(path)))


def _block_prefix(plans: dict[str, LayerPlan]) -> str:
    """The path under which the block's relative names live ("" at the root)."""
    for rel, plan in plans.items():
        if plan.path.endswith("." + rel):
            return plan.path[: -len(rel) - 1]
    return ""


def _namer(plans: dict[str, LayerPlan]):
    """Relative name inside the block → the model path shown in plans and recipes."""
    prefix = _block_prefix(plans)
    return lambda rel: f"{prefix}.{rel}" if prefix else rel


def _relativizer(plans: dict[str, LayerPlan]):
    """Model path (from a plan) → name inside the block, the inverse of `_namer`."""
    prefix = _block_prefix(plans)
    return lambda path: path[len(prefix) + 1:] if prefix and path.startswith(prefix + ".") else path
