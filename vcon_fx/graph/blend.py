"""The Blend module: y = β·dense(x) + (1−β)·compressed(x), with β a per-group buffer.

β is a registered 0-dim float32 buffer, so it lives in the state dict and can follow a per-group
schedule; it stays float32 in a bf16 / fp16 model (`--dtype`). At β = 1 only the dense branch runs and at β = 0 only the compressed one: a finished
transition costs nothing extra. `set_beta` is the only writer of β.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import ConfigError
from . import contracts

__all__ = ["Blend", "set_beta", "get_betas", "mean_beta", "blend_modules"]


class Blend(nn.Module):
    """Joins a dense branch and its compressed twin; both take the same inputs.

    Args:
        dense: the original layer or block (trained too unless frozen).
        compressed: its compressed twin (same inputs, same output shape).
        group: the group's name, used by schedules and reports.
        beta: the initial β (1 reproduces the original model exactly).
        order: the group's position from input to output.
    """

    def __init__(self, dense: nn.Module, compressed: nn.Module, group: str, beta: float = 1.0, order: int = 0):
        super().__init__()
        self.dense = dense
        self.compressed = compressed
        self.group = group
        self.order = order  # position from input to output, for staggered schedules
        self.register_buffer("beta", torch.tensor(float(beta)))
        # A Python mirror of β, so forward branches without a device sync; kept in step by
        # set_beta and by loading a state dict.
        self._beta = float(beta)
        self.register_load_state_dict_post_hook(_refresh_beta_mirror)

    def _apply(self, fn, recurse=True):
        # β stays float32 whatever dtype the model is cast to (bf16 would round β = 0.999 to 1.0);
        # forward mixes with the Python float, which keeps the activations' dtype.
        super()._apply(fn, recurse)
        if self.beta.dtype != torch.float32:
            self.beta = self.beta.float()
        return self

    @property
    def beta_value(self) -> float:
        return self._beta

    def forward(self, *args, **kwargs):
        beta = self._beta
        if beta >= 1.0:
            return self.dense(*args, **kwargs)
        if beta <= 0.0:
            return self.compressed(*args, **kwargs)
        # y = β·dense(x) + (1−β)·comp(x)
        return _mix(self.dense(*args, **kwargs), self.compressed(*args, **kwargs), beta)

    def extra_repr(self) -> str:
        return f"group={self.group!r}, beta={self._beta:.4f}"


def _mix(dense_out, comp_out, beta: float):
    if isinstance(dense_out, torch.Tensor):
        return beta * dense_out + (1.0 - beta) * comp_out
    if isinstance(dense_out, (tuple, list)):
        return type(dense_out)(_mix(d, c, beta) for d, c in zip(dense_out, comp_out))
    raise TypeError(f"Blend can only mix tensors or tuples of tensors, got {type(dense_out).__name__}")


def _refresh_beta_mirror(module: Blend, _incompatible) -> None:
    module._beta = float(module.beta)


def blend_modules(model: nn.Module) -> dict[str, Blend]:
    """Every Blend in `model`, keyed by group name, from input to output (staggered schedules rely on it)."""
    blends = [m for m in model.modules() if isinstance(m, Blend)]
    return {m.group: m for m in sorted(blends, key=lambda m: m.order)}


def get_betas(model: nn.Module) -> dict[str, float]:
    """β of every group, keyed by group name (pure)."""
    return {name: m._beta for name, m in blend_modules(model).items()}


def mean_beta(betas: Mapping[str, float]) -> float:
    """The mean β over the groups, 0 for none (pure): the one number logs and progress bars show."""
    return sum(betas.values()) / max(len(betas), 1)


@torch.no_grad()
def set_beta(model: nn.Module, beta: float | Mapping[str, float]) -> None:
    """Set β in place, for every group (a float) or per group (a mapping name → β).

    A group set to β = 0 drops its dense branch's gradients (see `_release_dense_grads`).

    Raises:
        ConfigError: β outside [0, 1], or a group name the model does not have.

    Example:
        >>> set_beta(vcon_model, 0.5)
    """
    blends = blend_modules(model)
    values = {name: beta for name in blends} if not isinstance(beta, Mapping) else dict(beta)
    unknown = sorted(set(values) - set(blends))
    if unknown:
        raise ConfigError(f"no blend group named {unknown[0]!r}; the groups are {sorted(blends)[:8]}")
    for name, value in values.items():
        value = float(value)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"β for group {name!r} must lie in [0, 1], got {value}")
        blend = blends[name]
        blend.beta.fill_(value)
        blend._beta = value
        if value == 0.0:
            _release_dense_grads(blend)
    if contracts.active():
        contracts.ensure_betas_in_unit_interval(model)


def _release_dense_grads(blend: Blend) -> None:
    """At β = 0 the dense branch no longer runs: drop its gradients so they free their memory and
    optimizers skip those weights (a `zero_grad(set_to_none=False)` would otherwise keep zeros
    that Adam keeps stepping on with its momentum). Weights the twin shares (prune, quant) keep
    theirs: they are the compressed branch's own latent weights."""
    shared = {id(p) for p in blend.compressed.parameters()}
    for param in blend.dense.parameters():
        if id(param) not in shared:
            param.grad = None
