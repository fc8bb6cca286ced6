"""Calibrate: the root-mean-square of every input feature of the selected layers, on example inputs.

Activation-aware low-rank (`LowRankConfig(activation_aware=True)`) factorizes W·diag(s) instead
of W, with s the RMS of each input feature, then undoes the scaling on the down factor:

    W ≈ A · (B' · diag(1/s)),   A·B' = best rank-r approximation of W·diag(s)

so the truncation keeps the directions that matter for the activations the layer actually sees
(the output error ‖(W − AB)·x‖ is what the model feels, not ‖W − AB‖), as ASVD does for LLMs.
The statistics come from one forward of the captured graph on the example inputs: give real
inputs (a batch of real data) for them to mean anything.
"""

from __future__ import annotations

import logging

import torch
from torch import fx, nn

from ..methods.base import LayerSite
from . import contracts

__all__ = ["input_rms", "with_input_rms"]

log = logging.getLogger(__name__)

_PER_INPUT_FEATURE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def input_rms(gm: fx.GraphModule, paths: list[str], example_args: tuple,
              example_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """RMS of each input feature (Linear: last dim; Conv: channel) of every layer in `paths`.

    A layer called several times pools every call. Runs in eval mode under no_grad, so batch-norm
    statistics and dropout are untouched.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(path: str, layer: nn.Module, x: torch.Tensor) -> None:
        x = x.detach().float()
        if isinstance(layer, nn.Linear):
            flat = x.reshape(-1, x.shape[-1])
        else:  # Conv1d / 2d / 3d: (N, C, ...) → per channel
            flat = x.transpose(0, 1).reshape(x.shape[1], -1).T
        sums[path] = sums.get(path, 0) + flat.pow(2).sum(0)
        counts[path] = counts.get(path, 0) + flat.shape[0]

    handles = []
    for path in paths:
        layer = gm.get_submodule(path)
        if not isinstance(layer, _PER_INPUT_FEATURE):  # ids, transposed or recurrent inputs: nothing to scale
            continue
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, path=path: record(path, m, args[0]) if args and isinstance(args[0], torch.Tensor) else None))
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            gm(*example_args, **(example_kwargs or {}))
    finally:
        gm.train(was_training)
        for handle in handles:
            handle.remove()
    out = {p: (sums[p] / max(counts[p], 1)).sqrt() for p in sums}
    log.info("calibrated %d layer(s) on the example inputs", len(out))
    if contracts.active():
        contracts.ensure_input_rms(gm, out)
    return out


def with_input_rms(sites: dict[str, LayerSite], rms: dict[str, torch.Tensor]) -> dict[str, LayerSite]:
    """The sites, each carrying its input RMS (where one was recorded)."""
    return {p: LayerSite(s.path, s.module, s.out_shape, s.calls, rms.get(p)) if p in rms else s
            for p, s in sites.items()}
