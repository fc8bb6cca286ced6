"""What the static kernel needs before it runs: the activation ranges, from the model or from calibration data.

Learned scales travel in the exported graph itself; observed output ranges are looked up by
module (`layer_ranges.py`); a model that recorded neither is calibrated on the first batches of
the calibration data when some are given (`calibrate_onnx.py`), and the notes say which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from torch import nn

from ..errors import UsageError
from .calibrate_onnx import calibrate_ranges
from .layer_ranges import attach_ranges, has_learned_scales, layer_ops, observed_ranges, quantized_layers
from .naming import flatten_inputs

__all__ = ["StaticInputs", "prepare_static", "calibration_feeds", "needs_calibration"]


@dataclass
class StaticInputs:
    """Whether static int8 has scales to work with, what was said about them, and each layer's ops."""

    usable: bool = False
    notes: list[str] = field(default_factory=list)
    ops: dict[str, tuple[str, str]] = field(default_factory=dict)  # layer path → (weight op output, last output)

    def layer_kernels(self, by_output: dict[str, str]) -> dict[str, str]:
        """Layer path → the kernel its weight op got ("weight-only" where none took it) (pure)."""
        return {path: by_output.get(first, "weight-only") for path, (first, _) in self.ops.items()}


def calibration_feeds(model: nn.Module, batches: Sequence[tuple[tuple, dict]]) -> list[dict]:
    """onnxruntime feeds (ONNX input name → array) for each (args, kwargs) batch (pure)."""
    return [{name: t.detach().cpu().numpy() for name, t in flatten_inputs(model, args, kwargs)}
            for args, kwargs in batches]


def needs_calibration(model: nn.Module) -> bool:
    """True when some quantized layer of `model` recorded no output range while fine-tuning (pure)."""
    return any(not bool(getattr(m, "out_observed", False)) for m in quantized_layers(model).values())


def prepare_static(model: nn.Module, exported: Path, scopes: dict[str, str],
                   calibration: Sequence[tuple[tuple, dict]] | None, *, required: bool,
                   calibration_name: str = "the calibration data") -> StaticInputs:
    """Attach the activation ranges static int8 needs to the float export `exported` (in place on that file).

    Args:
        model: the model `exported` came from.
        exported: its float ONNX file (`export_onnx(..., scopes=scopes)`).
        scopes: node output name → module path, from that export.
        calibration: (args, kwargs) batches to calibrate on when the model recorded no ranges.
        required: the static kernel was asked for by name: no ranges at all is an error.
        calibration_name: what the notes call `calibration` (the CLI falls back to the training data).

    Raises:
        UsageError: `required`, and neither learned scales nor calibration data.
    """
    import onnx

    proto = onnx.load(str(exported))
    layers = quantized_layers(model)
    ops = layer_ops(proto.graph, scopes, layers)
    ranges = observed_ranges(model, proto.graph, scopes)
    learned = has_learned_scales(proto.graph)
    found = StaticInputs(usable=learned or bool(ranges), ops=ops)
    missing = len(ops) - len(ranges)
    if calibration and (not learned or missing):
        count = sum(_batch_size(args, kwargs) for args, kwargs in calibration)
        ranges = {**calibrate_ranges(exported, calibration_feeds(model, calibration)), **ranges}
        why = ("the model learned no activation scales (quantized without --act-bits 8)" if not learned
               else f"{missing} quantized layer(s) recorded no output range")
        found.notes.append(f"static int8: {why}: activation ranges calibrated on the first {count} example(s) of "
                           f"{calibration_name} (min / max)")
        found.usable = True
    elif not found.usable:
        message = ("the model learned no activation scales (it was quantized without --act-bits 8) and no calibration "
                   "data was given")
        if required:
            raise UsageError(f"kernel 'static' needs activation scales: {message}; pass --calibration-data FILE "
                             "(a few hundred examples), or quantize with --act-bits 8 and fine-tune")
        found.notes.append(f"static int8 not possible: {message} (pass --calibration-data FILE to calibrate)")
        return found
    elif calibration:
        found.notes.append(f"static int8: the model's own activation scales are used; {calibration_name} was not needed")
    attach_ranges(proto, ranges)
    onnx.save(proto, str(exported))
    return found


def _batch_size(args: tuple, kwargs: dict) -> int:
    first = next((t for t in (*args, *kwargs.values()) if hasattr(t, "shape") and len(t.shape)), None)
    return int(first.shape[0]) if first is not None else 1
