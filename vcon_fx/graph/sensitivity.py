"""How much of a layer's output error reaches the model's output: one gain per layer, measured end to end.

A layer's own relative error says little about the model: the output of an attention projection
is added to a residual stream many times larger, a query's error goes through a softmax. So for
every layer `--allocate` spreads over, its twin at one setting (the uniform one) alone replaces
it in the captured graph, the calibration batches run, and

    gain = (‖Ŷ − Y‖² / ‖Y‖² of the model's outputs) / (the layer's own relative error)²

turns each candidate's layer error (read off XᵀX, methods/allocation.py) into a predicted model
error: √gain · layer error. One forward per batch and layer, one twin alive at a time; the dense
outputs are kept while they fit in `_KEPT_BYTES`, else recomputed per layer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch
from torch import fx

from ..methods.allocation import Option, quiet_whitening
from ..methods.base import LayerSite, method_for
from .modes import eval_mode
from .statistics import _to

__all__ = ["layer_gains", "predicted"]

_KEPT_BYTES = 256 * 2 ** 20
_TINY = 1e-6  # a layer error below this (a layer the setting leaves exact) gives no gain to read


def layer_gains(gm: fx.GraphModule, sites: dict[str, LayerSite], probes: dict[str, Option],
                batches: list[tuple[tuple, dict]]) -> dict[str, float]:
    """Each layer's gain from its error to the model's (pure on `gm`: every layer is put back).

    Args:
        probes: layer → the option measured end to end (a compressed one, with its layer error).
        batches: the calibration batches, (args, kwargs) each.
    """
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    batches = [(_to(a, device), _to(k, device)) for a, k in batches]
    gains: dict[str, float] = {}
    with eval_mode(gm), torch.no_grad():
        kept = _dense_outputs(gm, batches)
        for path, option in probes.items():
            if option.layer_error < _TINY:
                continue
            dense_layer = gm.get_submodule(path)
            with quiet_whitening():
                twin = method_for(option.config).build(sites[path], option.plan, init=True).eval()
            gm.set_submodule(path, twin)
            try:
                lost, held = 0.0, 0.0
                for index, (args, kwargs) in enumerate(batches):
                    ref = kept[index] if kept is not None else _leaves(_dense_run(gm, path, dense_layer, twin, args, kwargs))
                    out = _leaves(gm(*args, **kwargs))
                    lost += sum(float((o - r).double().pow(2).sum()) for o, r in zip(out, ref))
                    held += sum(float(r.double().pow(2).sum()) for r in ref)
            finally:
                gm.set_submodule(path, dense_layer)
            del twin
            if held > 0:
                gains[path] = (lost / held) / option.layer_error ** 2
    typical = statistics.median(gains.values()) if gains else 1.0
    return {path: gains.get(path, typical) for path in probes}


def _dense_outputs(gm: fx.GraphModule, batches) -> list[list[torch.Tensor]] | None:
    """The dense model's outputs of every batch, or None when they would take more than `_KEPT_BYTES`."""
    kept, size = [], 0
    for args, kwargs in batches:
        out = _leaves(gm(*args, **kwargs))
        size += sum(t.numel() * t.element_size() for t in out)
        if size > _KEPT_BYTES:
            return None
        kept.append(out)
    return kept


def _dense_run(gm, path, dense_layer, twin, args, kwargs):
    gm.set_submodule(path, dense_layer)
    try:
        return gm(*args, **kwargs)
    finally:
        gm.set_submodule(path, twin)


def _leaves(out) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, tuple, list, dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out.detach()] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _leaves(v)]
    return []


def predicted(options: list[Option], gain: float) -> None:
    """Set each option's predicted model error, √gain · its layer error (in place)."""
    for option in options:
        option.error = math.sqrt(gain) * option.layer_error
