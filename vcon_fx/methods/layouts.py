"""How each single-weight layer type is factorized at rank r, on its own weight layout.

The truncated SVD runs on the weight seen as a matrix (dim 0) × (everything else), W ≈ A·B with
A: (dim 0 × r), B: (r × rest). What the two factors become depends on the layout:

    Linear(in → out)             Linear(in → r)                  → Linear(r → out)
    Conv{1,2,3}d k…, (out, in, k…)  Conv k… to r channels (B)    → Conv 1×…×1 to out (A)
    ConvTranspose k…, (in, out, k…) Conv 1×…×1 from in to r (Aᵀ) → ConvTranspose k… r → out (B)
    Embedding(n, d)              Embedding(n, r) (A)             → Linear(r → d) (Bᵀ): a Gather, then a MatMul

A transposed convolution spreads each input position over a k… window of outputs: its input
channels are dim 0, so the 1×1 projection runs first, at the input's (smaller) resolution, and
commutes exactly with the transposed convolution that follows.

Grouped and depthwise convolutions are refused with the reason: each group's filters see only
their own input channels, so a factor shared across groups would mix channels the layer never mixes.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer_types import CONV_TYPES, EMBEDDING_TYPES, TRANSPOSED_CONV_TYPES, torch_type

__all__ = ["lowrank_refusal", "factor_layers", "assign_factors", "lowrank_flops"]

# ConvTranspose1d → Conv1d, … : the pointwise projection in front of a transposed conv
_POINTWISE = dict(zip(TRANSPOSED_CONV_TYPES, CONV_TYPES))


def lowrank_refusal(layer: nn.Module) -> str | None:
    """Why low-rank does not apply to `layer` (a grouped or depthwise conv), or None (pure)."""
    groups = getattr(layer, "groups", 1)
    if groups == 1:
        return None
    channels = layer.in_channels
    if groups == channels:
        return (f"depthwise convolution (a grouped convolution with groups = {groups} channels): each channel has its "
                "own filter over one input channel, so there is no channel mixing to factorize; low-rank does not apply")
    return (f"grouped convolution (groups={groups}): each group sees only its own inputs, and a factorization "
            "across groups would mix them; low-rank does not apply")


def factor_layers(layer: nn.Module, rank: int, **factory) -> tuple[nn.Module, nn.Module]:
    """The (down, up) pair of rank `rank` for `layer`, uninitialized (pure)."""
    has_bias = getattr(layer, "bias", None) is not None
    if isinstance(layer, nn.Linear):
        return (nn.Linear(layer.in_features, rank, bias=False, **factory),
                nn.Linear(rank, layer.out_features, bias=has_bias, **factory))
    if isinstance(layer, EMBEDDING_TYPES):
        return (nn.Embedding(layer.num_embeddings, rank, padding_idx=layer.padding_idx,
                             scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse, **factory),
                nn.Linear(rank, layer.embedding_dim, bias=False, **factory))
    if isinstance(layer, TRANSPOSED_CONV_TYPES):
        down = _POINTWISE[torch_type(layer)](layer.in_channels, rank, 1, bias=False, **factory)
        up = torch_type(layer)(rank, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                         output_padding=layer.output_padding, dilation=layer.dilation, bias=has_bias, **factory)
        return down, up
    conv = torch_type(layer)
    down = conv(layer.in_channels, rank, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                dilation=layer.dilation, bias=False, padding_mode=layer.padding_mode, **factory)
    return down, conv(rank, layer.out_channels, 1, bias=has_bias, **factory)


@torch.no_grad()
def assign_factors(layer: nn.Module, down: nn.Module, up: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """Copy the SVD factors (A: dim 0 × r, B: r × rest) and the bias into the pair (in place on down / up)."""
    if isinstance(layer, TRANSPOSED_CONV_TYPES):
        down.weight.copy_(a.T.reshape(down.weight.shape))
        up.weight.copy_(b.reshape(up.weight.shape))
    elif isinstance(layer, EMBEDDING_TYPES):
        down.weight.copy_(a)
        up.weight.copy_(b.T)
    else:
        down.weight.copy_(b.reshape(down.weight.shape))
        up.weight.copy_(a.reshape(up.weight.shape))
    if getattr(layer, "bias", None) is not None:
        up.bias.copy_(layer.bias)


def lowrank_flops(layer: nn.Module, rank: int, positions: int) -> int:
    """Multiply-adds ×2 of the factorized layer per forward (pure): r·(rows + rest) per position,
    of which an embedding's lookup of r values counts none."""
    rows, rest = layer.weight.shape[0], layer.weight[0].numel()
    if isinstance(layer, EMBEDDING_TYPES):
        return 2 * rank * rest * positions
    return 2 * rank * (rows + rest) * positions
