"""The shared-weight twin: a Linear / Conv whose weight is computed from a latent tensor.

Pruning and quantization both build their twin on it. By default the latent weight and bias
ARE the dense layer's Parameters (the authors' choice): one copy of the weights during the
transition, and the compressed branch trains the same tensor. `--separate-weights` gives the
twin its own copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import COMPRESSIBLE, CliOption, Method

__all__ = ["WeightTwin", "WeightTwinMethod", "SEPARATE_WEIGHTS"]

# One declaration for every method whose twin is a WeightTwin, so the CLI shows the flag once.
SEPARATE_WEIGHTS = CliOption("--separate-weights", "the twin gets its own weight copy", switch=True)


class WeightTwin(nn.Module):
    """A Linear / Conv whose weight is a function of a latent tensor.

    With `share` the latent weight and bias ARE the dense layer's Parameters (no copy); else
    they are copies (or, without `init`, uninitialized tensors that loading fills).
    """

    def __init__(self, layer: nn.Module, *, share: bool, init: bool = True):
        super().__init__()
        if not isinstance(layer, COMPRESSIBLE):
            raise ConfigError(f"{type(layer).__name__} is not one of {[c.__name__ for c in COMPRESSIBLE]}")
        self.layer_type = type(layer)
        self.train(layer.training)  # a twin built into an eval-mode model must not observe or update state
        if isinstance(layer, nn.Linear):
            self.in_features, self.out_features = layer.in_features, layer.out_features
        else:
            for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                         "padding_mode", "_reversed_padding_repeated_twice", "transposed", "output_padding"):
                setattr(self, attr, getattr(layer, attr))
        if share:
            self.weight = layer.weight
            self.bias = layer.bias
        else:
            self.weight = nn.Parameter(_fresh(layer.weight, init), requires_grad=layer.weight.requires_grad)
            self.bias = None if layer.bias is None else nn.Parameter(_fresh(layer.bias, init), requires_grad=layer.bias.requires_grad)

    def compressed_weight(self) -> torch.Tensor:
        """The weight the twin computes with (differentiable in the latent weight)."""
        raise NotImplementedError

    def forward(self, x):
        return self.call(x, self.compressed_weight())

    def call(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        if self.layer_type is nn.Linear:
            return F.linear(x, weight, bias)
        return self.layer_type._conv_forward(self, x, weight, bias)

    def plain(self, weight: torch.Tensor) -> nn.Module:
        """A fresh Linear / Conv (own Parameters, nothing shared) computing with `weight`."""
        factory = {"device": weight.device, "dtype": weight.dtype}
        has_bias = self.bias is not None
        if self.layer_type is nn.Linear:
            layer = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=has_bias, **factory)
        else:
            layer = nn.utils.skip_init(
                self.layer_type, self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                padding=self.padding, dilation=self.dilation, groups=self.groups, bias=has_bias,
                padding_mode=self.padding_mode, **factory,
            )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if has_bias:
                layer.bias.copy_(self.bias)
        layer.weight.requires_grad_(self.weight.requires_grad)
        return layer

    def extra_repr(self) -> str:
        return f"{self.layer_type.__name__}, weight={tuple(self.weight.shape)}, bias={self.bias is not None}"


def _fresh(t: torch.Tensor, init: bool) -> torch.Tensor:
    return t.detach().clone() if init else torch.empty_like(t)


class WeightTwinMethod(Method):
    """A method whose twin computes its weight from the dense layer's own (prune, quant)."""

    def share_dense_weights(self) -> bool:
        return not self.config.separate_weights
