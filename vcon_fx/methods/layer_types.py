"""The weight-holding layer types vcon-fx compresses, grouped by how their weight is laid out.

    Linear                    (out, in)                      y = x·Wᵀ
    Conv1d / 2d / 3d          (out, in/groups, k…)           y = W ⋆ x
    ConvTranspose1d / 2d / 3d (in, out/groups, k…)           y = Wᵀ ⋆ x, upsampling by the stride
    Embedding                 (rows, dim)                    y = W[ids]
    LSTM / GRU / RNN          per layer and direction: W_ih (gates·h, in), W_hh (gates·h, h), biases

A twin that computes with a replaced weight (twin.py) calls the layer's own function through
`call_layer`, and `plain_layer` rebuilds an ordinary layer around a weight at vanish. Recurrent
layers hold several matrices: recurrent.py compresses each of them as a Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CONV_TYPES",
    "TRANSPOSED_CONV_TYPES",
    "EMBEDDING_TYPES",
    "RECURRENT_TYPES",
    "SINGLE_WEIGHT_TYPES",
    "LAYER_TYPES",
    "LAYER_ATTRS",
    "torch_type",
    "is_layer_subclass",
    "channel_first",
    "input_positions",
    "copy_layer_attrs",
    "call_layer",
    "plain_layer",
    "effective_weight",
    "single_weight_refusal",
    "dense_flops",
]

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
EMBEDDING_TYPES = (nn.Embedding,)
RECURRENT_TYPES = (nn.LSTM, nn.GRU, nn.RNN)
# Layers with one `weight` (and maybe a `bias`): the twins of twin.py compute with a replaced one.
SINGLE_WEIGHT_TYPES = (nn.Linear, *CONV_TYPES, *TRANSPOSED_CONV_TYPES, *EMBEDDING_TYPES)
LAYER_TYPES = (*SINGLE_WEIGHT_TYPES, *RECURRENT_TYPES)

# What a twin copies from its dense layer to call the layer's function with another weight.
LAYER_ATTRS = (
    "in_features", "out_features",  # Linear
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",  # convs
    "padding_mode", "_reversed_padding_repeated_twice", "transposed", "output_padding",
    "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",  # Embedding
    "sparse",
)


def torch_type(module: nn.Module) -> type:
    """The torch.nn layer class `module` is (its own, or the one a subclass such as torchvision's
    Conv3DSimple derives from): what a twin rebuilds it as."""
    return next((c for c in type(module).__mro__ if c in LAYER_TYPES), type(module))


def is_layer_subclass(module: nn.Module) -> bool:
    """True for a subclass of a compressible layer that computes as it (does not override forward)."""
    base = torch_type(module)
    return base is not type(module) and base in LAYER_TYPES and type(module).forward is base.forward


def channel_first(module: nn.Module) -> bool:
    """True when the layer's output holds its channels in dim 1 (convolutions), not the last dim."""
    return isinstance(module, (*CONV_TYPES, *TRANSPOSED_CONV_TYPES))


def input_positions(module: nn.Module, output_positions: int) -> int:
    """Positions at which the weight is applied: a transposed conv's input positions (its output
    has stride× more per spatial dim), else the output positions."""
    if isinstance(module, TRANSPOSED_CONV_TYPES):
        return output_positions // max(math.prod(module.stride), 1)
    return output_positions


def copy_layer_attrs(target, layer: nn.Module) -> None:
    """Copy the call attributes of `layer` (those it has among LAYER_ATTRS) onto `target` (in place)."""
    for attr in LAYER_ATTRS:
        if hasattr(layer, attr):
            setattr(target, attr, getattr(layer, attr))


def call_layer(layer_type: type, attrs, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               output_size=None) -> torch.Tensor:
    """`layer_type`'s forward on `x` with this weight and bias; `attrs` holds the layer's call
    attributes (copy_layer_attrs). Pure."""
    if layer_type is nn.Linear:
        return F.linear(x, weight, bias)
    if issubclass(layer_type, CONV_TYPES):
        return layer_type._conv_forward(attrs, x, weight, bias)
    if issubclass(layer_type, TRANSPOSED_CONV_TYPES):
        dims = len(attrs.kernel_size)
        padding = layer_type._output_padding(attrs, x, output_size, attrs.stride, attrs.padding, attrs.kernel_size,
                                              dims, attrs.dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[dims - 1]
        return fn(x, weight, bias, attrs.stride, attrs.padding, padding, attrs.groups, attrs.dilation)
    if issubclass(layer_type, EMBEDDING_TYPES):
        return F.embedding(x, weight, attrs.padding_idx, attrs.max_norm, attrs.norm_type, attrs.scale_grad_by_freq,
                           attrs.sparse)
    raise TypeError(f"no single-weight call for {layer_type.__name__}")


def plain_layer(layer_type: type, attrs, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A fresh `layer_type` (own Parameters, nothing shared) holding copies of `weight` and `bias` (pure)."""
    factory = {"device": weight.device, "dtype": weight.dtype}
    has_bias = bias is not None
    if layer_type is nn.Linear:
        layer = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=has_bias, **factory)
    elif issubclass(layer_type, EMBEDDING_TYPES):
        layer = nn.utils.skip_init(layer_type, weight.shape[0], weight.shape[1], padding_idx=attrs.padding_idx,
                                   max_norm=attrs.max_norm, norm_type=attrs.norm_type,
                                   scale_grad_by_freq=attrs.scale_grad_by_freq, sparse=attrs.sparse, **factory)
    else:
        extra = {"output_padding": attrs.output_padding} if issubclass(layer_type, TRANSPOSED_CONV_TYPES) else {}
        layer = nn.utils.skip_init(
            layer_type, attrs.in_channels, attrs.out_channels, attrs.kernel_size, stride=attrs.stride,
            padding=attrs.padding, dilation=attrs.dilation, groups=attrs.groups, bias=has_bias,
            padding_mode=attrs.padding_mode, **extra, **factory,
        )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if has_bias:
            layer.bias.copy_(bias)
    return layer


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a (compressed) layer computes with: a twin's, dequantized integers, A·B of a
    low-rank pair (as a Linear's (out, in) matrix), or a plain layer's weight."""
    if hasattr(module, "compressed_weight"):
        return module.compressed_weight()
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    if isinstance(module, nn.Sequential) and hasattr(module, "down") and hasattr(module, "up"):  # LowRank
        return effective_weight(module.up) @ effective_weight(module.down)
    return module.weight


def single_weight_refusal(layer: nn.Module) -> str | None:
    """Why no method compresses this layer, or None (pure): an Embedding with max_norm rescales the
    rows it looks up, in place, inside its own weight, which a twin computing another weight cannot follow."""
    if isinstance(layer, EMBEDDING_TYPES) and layer.max_norm is not None:
        return (f"Embedding with max_norm={layer.max_norm} renormalizes the rows it looks up in place: "
                "its weight changes as it runs, so it stays dense")
    return None


def dense_flops(module: nn.Module, positions: int) -> int:
    """Multiply-adds ×2 of the dense layer per forward: its weight matrices times the positions (a
    recurrent layer's time steps); a lookup counts none."""
    if isinstance(module, EMBEDDING_TYPES):
        return 0
    if isinstance(module, RECURRENT_TYPES):
        return 2 * sum(p.numel() for p in module.parameters() if p.dim() == 2) * positions
    return 2 * module.weight.numel() * positions
