"""The shared-weight twin: a layer (Linear, conv, transposed conv, Embedding) whose weight is computed from a latent tensor.

Pruning and quantization both build their twin on it. By default the latent weight and bias
ARE the dense layer's Parameters (the authors' choice): one copy of the weights during the
transition, and the compressed branch trains the same tensor. `--separate-weights` gives the
twin its own copy.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import CliOption, Method
from .layer_types import SINGLE_WEIGHT_TYPES, call_layer, copy_layer_attrs, plain_layer, torch_type

__all__ = ["WeightTwin", "WeightTwinMethod", "SEPARATE_WEIGHTS"]

# One declaration for every method whose twin is a WeightTwin, so the CLI shows the flag once.
SEPARATE_WEIGHTS = CliOption("--separate-weights", "the twin gets its own weight copy", switch=True)


class WeightTwin(nn.Module):
    """A single-weight layer (layer_types.SINGLE_WEIGHT_TYPES) whose weight is a function of a latent tensor.

    With `share` the latent weight and bias ARE the dense layer's Parameters (no copy); else
    they are copies (or, without `init`, uninitialized tensors that loading fills).
    """

    def __init__(self, layer: nn.Module, *, share: bool, init: bool = True):
        super().__init__()
        if not isinstance(layer, SINGLE_WEIGHT_TYPES):
            raise ConfigError(f"{type(layer).__name__} is not one of {[c.__name__ for c in SINGLE_WEIGHT_TYPES]}")
        self.layer_type = torch_type(layer)
        self.train(layer.training)  # a twin built into an eval-mode model must not observe or update state
        copy_layer_attrs(self, layer)
        bias = getattr(layer, "bias", None)  # an Embedding has none
        if share:
            self.weight = layer.weight
            self.bias = bias
        else:
            self.weight = nn.Parameter(_fresh(layer.weight, init), requires_grad=layer.weight.requires_grad)
            self.bias = None if bias is None else nn.Parameter(_fresh(bias, init), requires_grad=bias.requires_grad)

    def compressed_weight(self) -> torch.Tensor:
        """The weight the twin computes with (differentiable in the latent weight)."""
        raise NotImplementedError

    def forward(self, x, output_size=None):
        return self.call(x, self.compressed_weight(), output_size=output_size)

    def call(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             output_size=None) -> torch.Tensor:
        bias = self.bias if bias is None else bias
        return call_layer(self.layer_type, self, x, weight, bias, output_size)

    def plain(self, weight: torch.Tensor) -> nn.Module:
        """A fresh layer of the dense type (own Parameters, nothing shared) computing with `weight`."""
        layer = plain_layer(self.layer_type, self, weight, self.bias)
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
