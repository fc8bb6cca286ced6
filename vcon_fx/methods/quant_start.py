"""Where a quantized twin with a fixed scale grid starts: clip-searched scales, or the GPTQ solution.

quant.py's twin normally recomputes max-abs scales at every step. With `--clip-search` or a
data-aware start it keeps its scales fixed instead (the `scale` buffer: one per output channel,
or one per group of inputs with `--group-size`), chosen here from the dense weight and, when
given, the layer's calibration statistics:

- "clip-search": the MSE-optimal clipping of each scale's weights (scale_grid.py), weighted by the input
  second moments when the layer has statistics; the twin keeps sharing the dense weight.
- "gptq": the method's own scales, then GPTQ's column-by-column rounding with error feedback
  (gptq.py); the twin starts from that solution in its own weight copy. On an asymmetric grid
  (zero_point.py) the scales are first clip-searched, input-weighted: on benchmarks/llm.py's 122M
  Llama and windows at 4 bits, group 32 (a one-off PyTorch comparison, not kept as a benchmark),
  that took the logits' relative error from 0.308 to 0.302 and the KL from 1.46e-2 to 1.40e-2,
  where on the symmetric grid it changed nothing (0.349 either way), so only there.
"""

from __future__ import annotations

import torch

from .calibration import InputStatistics
from .gptq import gptq_quantize
from .scale_grid import clip_search_scales

__all__ = ["starting_grid", "start_fixed_grid"]


def starting_grid(start: str, weight: torch.Tensor, plain_scale: torch.Tensor, bits: int | str,
                  statistics: InputStatistics | None, groups: int = 1,
                  zero: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    """(fixed scales, the twin's starting weight or None to keep the dense one, a note or None) (pure).

    Args:
        start: "clip-search" or "gptq" (`QuantConfig.start`).
        weight: the dense layer's weight.
        plain_scale: its scales as the plain twin computes them, (out,) or (out, groups).
        bits: the weight width.
        statistics: the layer's calibration statistics, or None.
        groups: a convolution's groups (statistics of a grouped one do not fit its columns).
        zero: an asymmetric grid's zero points (kept as they are), or None.
    """
    usable = statistics if statistics is not None and groups == 1 \
        and statistics.column_squares.numel() == weight[0].numel() else None
    if start == "clip-search":
        importance = None if usable is None else usable.column_squares
        return clip_search_scales(weight, plain_scale, bits, importance, zero), None, None
    if usable is None or usable.gram is None:
        return plain_scale, None, "gptq: no input statistics for this layer, round-to-nearest on fixed scales"
    if zero is not None:  # asymmetric: GPTQ on input-weighted clip-searched scales (measured better, docstring)
        plain_scale = clip_search_scales(weight, plain_scale, bits, usable.column_squares, zero)
    return plain_scale, gptq_quantize(weight, usable.hessian(), plain_scale, bits, zero=zero), None


@torch.no_grad()
def start_fixed_grid(twin, config, site, plan) -> None:
    """Set a fixed-scale QuantTwin's scales (and, for GPTQ, its own weight copy) from `config.start` (in place).

    Statistics are used only with a data-aware start (`config.init`); a note goes into the plan
    when a layer had none to use.
    """
    layer = site.module
    statistics = site.statistics if config.init == "data-aware" else None
    plain = twin.scale.clone()  # the max-abs (min-max, binary, ternary) scales the twin was built with
    zero = getattr(twin, "zero", None)
    scale, weight, note = starting_grid(config.start, layer.weight, plain, config.bits, statistics,
                                        getattr(layer, "groups", 1), zero)
    twin.scale.copy_(scale)
    if weight is not None:
        twin.weight.copy_(weight)
    if note:
        plan.detail["init"] = note
