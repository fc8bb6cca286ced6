"""What the methods read of calibration data: each layer's input statistics, and the `--init` choice.

`graph/statistics.py` runs the calibration data through the captured model once and hands each
selected layer an `InputStatistics`: sums over every input row (a token of a Linear, an unfolded
patch of a Conv) of x² per input feature / channel and per weight column, and, where the method
needs it, the Gram matrix XᵀX over the weight's columns, all in float64. The data-aware twins
(whitening.py, wanda.py, sparsegpt.py, gptq.py, clip_search.py) turn them into a better start.

`--init` chooses between the plain start and the data-aware one. Left at "auto", a method starts
data-aware whenever calibration data is given (`MethodConfig.calibrated` records the choice in
the config, so a saved recipe rebuilds the same twin without the data).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..errors import ConfigError
from .base import CliOption, MethodConfig

__all__ = ["InputStatistics", "INIT", "INIT_CHOICES", "check_init", "resolve_init", "GRAM_BYTES",
           "nested_configs", "map_nested", "DataAwareStarts"]

INIT_CHOICES = ("auto", "plain", "data-aware")
# One declaration for every method with a data-aware start, so the CLI shows the flag once.
INIT = CliOption("--init", "twin start: plain, or data-aware (the default with --calibration-data)",
                 choices=INIT_CHOICES)
GRAM_BYTES = 8  # float64 per Gram entry


@dataclass(frozen=True)
class InputStatistics:
    """One layer's input statistics over the calibration data (float64 sums, never means).

    Args:
        rows: how many input rows were summed (tokens × samples, or patches × samples).
        channel_squares: Σ x² per input feature (Linear) or channel (Conv), shape (C,).
        column_squares: Σ x² per weight column (Linear: = channel_squares; Conv: per unfolded
            (channel, kernel position) column, in the order of `weight.reshape(out, -1)`), shape (d,).
        gram: Σ xᵀx over the weight's columns, shape (d, d), or None when no method asked for it.
        channel_rows: how many values each channel sum holds (a Conv's input positions × samples;
            None: `rows`). A grouped convolution has channel sums only (its `column_squares` is empty).
    """

    rows: int
    channel_squares: torch.Tensor
    column_squares: torch.Tensor
    gram: torch.Tensor | None = None
    channel_rows: int | None = None

    def rms(self) -> torch.Tensor:
        """RMS of each input feature / channel (the diagonal scaling of activation-aware low-rank)."""
        count = self.rows if self.channel_rows is None else self.channel_rows
        return (self.channel_squares / max(count, 1)).sqrt()

    def column_norms(self) -> torch.Tensor:
        """‖X_j‖₂ of each weight column over every row (Wanda's input norm)."""
        return self.column_squares.clamp_min(0).sqrt()

    def hessian(self) -> torch.Tensor:
        """XᵀX / rows: the layer-wise Hessian of ‖XWᵀ − XŴᵀ‖² up to a factor 2 (float64)."""
        if self.gram is None:
            raise ConfigError("this layer's statistics hold no Gram matrix: the method did not ask for one")
        return self.gram / max(self.rows, 1)


class DataAwareStarts:
    """Mixin for a method config with an `init` field and a `start` property naming its twin's start.

    Declares which starts read each layer's XᵀX (`gram_starts`) and which need the twin's own
    weight copy (`own_weight_starts`: the dense weight must stay as it is for β = 1).
    """

    gram_starts: ClassVar[tuple[str, ...]] = ()
    own_weight_starts: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_gram(self) -> bool:
        return self.start in self.gram_starts

    @property
    def separate(self) -> bool:
        """The twin holds its own weights: asked for (`separate_weights`), or its start needs them."""
        return bool(getattr(self, "separate_weights", False)) or self.start in self.own_weight_starts


def check_init(init: str, flag_owner: str) -> None:
    """Raise ConfigError unless `init` is one of INIT_CHOICES."""
    if init not in INIT_CHOICES:
        raise ConfigError(f"{flag_owner}: --init must be one of {', '.join(INIT_CHOICES)}; got {init!r}")


def resolve_init(init: str, calibrated: bool, *, has_data_aware: bool, method: str) -> str:
    """The init a config records once it is known whether calibration data is given (pure).

    "auto" becomes "data-aware" with calibration data where the method has a data-aware start;
    "data-aware" without calibration data is refused.

    Raises:
        ConfigError: "data-aware" asked for without calibration data, or where the method has none.
    """
    if init == "data-aware" and not has_data_aware:
        raise ConfigError(f"{method}: this setting has no data-aware start; drop --init data-aware")
    if init == "data-aware" and not calibrated:
        raise ConfigError(f"{method}: --init data-aware needs calibration data: give --calibration-data FILE "
                          "(calibration= in Python), or drop --init data-aware")
    if init == "auto" and calibrated and has_data_aware:
        return "data-aware"
    return init


def nested_configs(config: MethodConfig) -> list[MethodConfig]:
    """The configs nested in `config`'s fields (a composition's methods), in field order (pure)."""
    parts = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        parts += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, MethodConfig)]
    return parts


def map_nested(config: MethodConfig, fn: Callable[[MethodConfig], MethodConfig]) -> MethodConfig:
    """`config` with `fn` applied to every config nested in its fields (pure; itself when none)."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, MethodConfig):
            changes[f.name] = fn(value)
        elif isinstance(value, tuple) and any(isinstance(v, MethodConfig) for v in value):
            changes[f.name] = tuple(fn(v) if isinstance(v, MethodConfig) else v for v in value)
    return dataclasses.replace(config, **changes) if changes else config
