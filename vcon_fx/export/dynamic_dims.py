"""Which dims of an export are dynamic, and the checks that they really came out dynamic.

Every tensor input gets a dynamic dim 0 ("batch"); inputs named in `seq_inputs` also a dynamic
dim 1 ("seq"). A dim that the model pins to one size is an error, not a file that only looks
dynamic.
"""

from __future__ import annotations

import logging

import torch

from ..errors import ExportError

__all__: list[str] = []  # used by export_onnx only

log = logging.getLogger(__name__)


def _wanted_dims(inputs, dynamic_batch: bool, seq_inputs) -> list[tuple[int, int, str]]:
    """(input index, axis, axis name) for every dim the caller asked to be dynamic (pure)."""
    wanted = []
    for i, (name, t) in enumerate(inputs):
        if dynamic_batch and t.dim() >= 1:
            wanted.append((i, 0, "batch"))
        if name in seq_inputs and t.dim() >= 2:
            wanted.append((i, 1, "seq"))
    return wanted


def _check_and_name_axes(program, wanted: list[tuple[int, int, str]], model_name: str) -> None:
    """Raise if a requested dynamic dim came out static; rename the symbols to batch/seq (in place).

    Static shows two ways: a fixed number in the ONNX signature, or (more often) a symbol that
    torch.export's range constraints pin to one value, e.g. after `if x.shape[0] == 2` or a
    reshape with literal sizes. The ONNX file keeps the symbol but drops the range, so it
    would run other sizes and compute the wrong thing; hence the error.
    """
    import onnx_ir as ir

    model = program.model
    ranges = _input_ranges(program)
    mapping: dict[str, str] = {}
    static = []
    for i, axis, axis_name in wanted:
        value = model.graph.inputs[i]
        dim = value.shape[axis] if value.shape is not None else None
        low, high = ranges.get((i, axis), (None, None))
        if not isinstance(dim, ir.SymbolicDim) or not isinstance(dim.value, str):
            static.append(f"{value.name} dim {axis} ({axis_name}) is fixed to {dim}")
            continue
        if low is not None and low == high:
            static.append(f"{value.name} dim {axis} ({axis_name}) is fixed to {low}")
            continue
        if high is not None:
            log.info("%s: input %s dim %d (%s) accepts only sizes %s..%s", model_name, value.name, axis, axis_name, low, high)
        # Every batch dim is called "batch" and every seq dim "seq", as optimum does, even where
        # torch.export kept two symbols (a mask that could broadcast from batch 1): the names
        # document the intended use, and onnxruntime does not hold inputs to equal sizes.
        mapping.setdefault(dim.value, axis_name)
    if static:
        raise ExportError(
            f"ONNX export of {model_name} made dims static that should be dynamic: {'; '.join(static)}. "
            "The model pins that size (a branch on x.shape, a reshape/view or a constant with literal "
            "sizes). Fix: use -1 or x.shape[0] in the model, or export static shapes on purpose "
            "(dynamic_batch=False, --static-shapes)"
        )
    if mapping:
        # also rewrites shape expressions (8*s77 -> 8*batch) in outputs and inner values
        program.rename_axes(mapping)


def _input_ranges(program) -> dict[tuple[int, int], tuple[int, int | None]]:
    """(input index, axis) -> (lowest, highest or None) allowed by torch.export's constraints (pure)."""
    ep = getattr(program, "exported_program", None)
    if ep is None:
        return {}
    users = set(ep.graph_signature.user_inputs)
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in users]
    fakes = [n.meta.get("val") for n in placeholders]
    fakes = [v for v in fakes if isinstance(v, torch.Tensor)]
    ranges = {}
    for i, fake in enumerate(fakes):
        for axis, size in enumerate(fake.shape):
            if not isinstance(size, torch.SymInt):
                continue
            vr = ep.range_constraints.get(size.node.expr)
            if vr is None:
                continue
            # the unbounded upper end is torch's int_oo, which int() refuses
            high = None if bool(vr.upper > 2**62) else int(vr.upper)
            ranges[(i, axis)] = (int(vr.lower), high)
    return ranges
