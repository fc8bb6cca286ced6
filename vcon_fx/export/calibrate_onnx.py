"""Calibrated activation ranges: min / max of every float activation of an ONNX file over a few batches.

The fallback for static int8 when a model carries no learned scales (quantized without
`--act-bits 8`): the exported file runs in onnxruntime on the first calibration batches, with
every float activation made a graph output, and each tensor's smallest and largest value
becomes its range (onnxruntime's own `quantize_static` defaults to the same MinMax rule).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..bench.worker import make_session, session_config

__all__ = ["calibrate_ranges"]


def calibrate_ranges(onnx_path: str | os.PathLike, batches: Iterable[Mapping[str, np.ndarray]]) -> dict[str, dict]:
    """Tensor name → {"lo", "hi", "source": "calibrated"} over `batches` (pure: the file is only read).

    Args:
        onnx_path: the float (weight-only) export.
        batches: feeds by ONNX input name, e.g. the first few batches of the calibration data.

    Returns:
        Ranges for `layer_ranges.attach_ranges`; {} when `batches` is empty.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(onnx_path))
    names = _float_activations(model)
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.onnx"
        onnx.save(model, str(probe))
        session = make_session(probe, config=session_config(onnx_path))
        wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
        for feeds in batches:
            for name, value in zip(wanted, session.run(wanted, dict(feeds))):
                if value.size and np.issubdtype(value.dtype, np.floating):
                    lo[name] = min(lo.get(name, np.inf), float(value.min()))
                    hi[name] = max(hi.get(name, -np.inf), float(value.max()))
    return {name: {"lo": lo[name], "hi": hi[name], "source": "calibrated"} for name in lo}


def _float_activations(model) -> list[str]:
    """Names of the float tensors computed from the inputs (not weights, not dequantized constants) (pure)."""
    import onnx
    from onnx import TensorProto

    inferred = onnx.shape_inference.infer_shapes(model)
    values = list(inferred.graph.value_info) + list(inferred.graph.input)
    floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    constants = {i.name for i in model.graph.initializer}
    derived = {i.name for i in model.graph.input if i.name not in constants}
    names = [i for i in derived if i in floats]
    for node in model.graph.node:
        if any(name in derived for name in node.input):
            derived.update(node.output)
            names.extend(o for o in node.output if o in floats)
    return names
