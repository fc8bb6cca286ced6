"""Calibrate: the selected layers' input statistics, on calibration data or on the example inputs.

With calibration data (`transform(..., calibration=…)`, `--calibration-data FILE`), one streaming
pass (statistics.py) gives every selected layer its `InputStatistics`: per-feature second moments
and, for the methods that need it, XᵀX. The data-aware twins start from them (methods/whitening.py,
wanda.py, sparsegpt.py, gptq.py, scale_grid.py), and activation-aware low-rank takes its RMS
from them.

Without calibration data, activation-aware low-rank (`LowRankConfig(activation_aware=True)`)
still measures the RMS of each input feature on the example inputs, one forward: it factorizes
W·diag(s) instead of W, then undoes the scaling on the down factor,

    W ≈ A · (B' · diag(1/s)),   A·B' = best rank-r approximation of W·diag(s),

so the truncation keeps the directions that matter for the activations the layer actually sees
(as ASVD does for LLMs). Give real example inputs for that to mean anything.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import fx, nn

from ..methods.base import LayerSite
from ..methods.calibration import InputStatistics
from . import contracts
from .statistics import BATCH, calibration_batches, gather_statistics, statistics_bytes

__all__ = ["input_rms", "with_input_rms", "calibrate", "with_statistics"]

log = logging.getLogger(__name__)

_PER_INPUT_FEATURE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_rms(gm: fx.GraphModule, paths: list[str], example_args: tuple,
              example_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """RMS of each input feature (Linear: last dim; Conv: channel) of every layer in `paths`, on the example inputs.

    A layer called several times pools every call. Runs in eval mode under no_grad, so batch-norm
    statistics and dropout are untouched.
    """
    # ids, transposed or recurrent inputs have no per-feature scale to measure
    paths = [p for p in paths if isinstance(gm.get_submodule(p), _PER_INPUT_FEATURE)]
    stats = gather_statistics(gm, paths, [(tuple(example_args), dict(example_kwargs or {}))], gram=False)
    out = {p: s.rms().float() for p, s in stats.items()}
    log.info("calibrated %d layer(s) on the example inputs", len(out))
    if contracts.active():
        contracts.ensure_input_rms(gm, out)
    return out


def with_input_rms(sites: dict[str, LayerSite], rms: dict[str, torch.Tensor]) -> dict[str, LayerSite]:
    """The sites, each carrying its input RMS (where one was recorded)."""
    return {p: dataclasses.replace(s, input_rms=rms[p]) if p in rms else s for p, s in sites.items()}


def with_statistics(sites: dict[str, LayerSite], stats: dict[str, InputStatistics]) -> dict[str, LayerSite]:
    """The sites, each carrying its calibration statistics and the input RMS they give (where measured)."""
    return {p: dataclasses.replace(s, statistics=stats[p], input_rms=stats[p].rms().float()) if p in stats else s
            for p, s in sites.items()}


def calibrate(gm: fx.GraphModule, sites: dict[str, LayerSite], paths: list[str], calibration, *, samples: int,
              gram: bool, positional: int = 1, fixed_batch: int | None = None) -> tuple[dict[str, LayerSite], str]:
    """The sites of `paths` with the statistics of `calibration` (pure on `gm`), and a note saying what was measured.

    Args:
        calibration: a Dataset, a tensor or an iterable of batches (statistics.calibration_batches).
        samples: how many samples to read at most.
        gram: also XᵀX (`MethodConfig.needs_gram`).
        positional: the model's positional inputs (a tuple batch may carry labels after them).
        fixed_batch: the batch size a graph with a fixed batch runs at, else None.

    Raises:
        DataError: calibration data of a form the model cannot take, or empty.
    """
    batches = calibration_batches(calibration, samples=samples, batch_size=fixed_batch or BATCH,
                                  positional=positional, pad=fixed_batch is not None)
    seen = _Counted(batches)
    stats = gather_statistics(gm, paths, seen, gram=gram)
    if contracts.active():
        contracts.ensure_input_rms(gm, {p: s.rms().float() for p, s in stats.items()})
    memory = statistics_bytes((gm.get_submodule(p) for p in stats), gram=gram)
    note = (f"calibration: {seen.samples} sample(s) in {seen.batches} batch(es); input statistics of {len(stats)} "
            f"layer(s){' with XᵀX' if gram else ''}, {_megabytes(memory)}")
    return with_statistics(sites, stats), note


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


class _Counted:
    """Passes (args, kwargs) batches through, counting batches and samples."""

    def __init__(self, batches):
        self.source, self.batches, self.samples = batches, 0, 0

    def __iter__(self):
        for args, kwargs in self.source:
            self.batches += 1
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
            self.samples += int(first.shape[0]) if first is not None else 0
            yield args, kwargs
