"""Export a model to one ONNX file with `torch.onnx.export(dynamo=True)`, batch (and seq) dynamic.

This module runs the steps in order; the policies live beside it: `naming.py` gives graph
inputs and outputs stable names (`check.py` feeds onnxruntime by them), `dynamic_dims.py`
decides which dims are dynamic and refuses a file whose dynamic dims came out static.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import ExportError, UsageError
from ..io.atomic import atomic_path, check_output
from ..graph.dims import dynamic_shapes, fixed_dims
from ..graph.modes import eval_mode
from .dynamic_dims import _check_and_name_axes, _wanted_dims
from .proto import INLINE_LIMIT_BYTES
from .recurrent_ops import recurrent_translations
from .naming import _name_values, _output_names, flatten_inputs, flatten_outputs

__all__ = ["export_onnx", "run_model"]

log = logging.getLogger(__name__)

# The exporter itself moves weights out of the file above 1.5 GiB (protobuf's hard limit is
# 2 GiB); below it we keep one self-contained file.

# The exporter's optimizer logs every pass at INFO; that is debug detail for our users.
_CHATTY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx")


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_inputs: tuple,
    *,
    example_kwargs: dict | None = None,
    dynamic_batch: bool = True,
    seq_inputs: tuple[str, ...] = (),
    opset: int | None = None,
    force: bool = False,
    kv_cache: bool | None = None,
    scopes: dict[str, str] | None = None,
) -> Path:
    """Export `model` to the ONNX file `path` (pure: the model is left as it was).

    The model runs in eval mode during export and gets its train/eval flags back afterwards.
    Weights stay inside the one file unless they exceed 1.5 GiB; then they go to `PATH.data`.

    Args:
        model: an `nn.Module`, an fx `GraphModule`, or `torch.export.export(...).module()`.
        path: the `.onnx` file to write (atomically).
        example_inputs: positional inputs for `model.forward`, used for tracing.
        example_kwargs: keyword inputs for `model.forward` (e.g. `input_ids`, `attention_mask`).
        dynamic_batch: make dim 0 of every tensor input dynamic ("batch").
        seq_inputs: input names whose dim 1 is dynamic too ("seq"), e.g. `("input_ids",
            "attention_mask")`.
        opset: ONNX opset; None takes the exporter's default.
        force: replace `path` if it exists.
        kv_cache: a decoder language model (a Hugging Face causal LM, or a vanished vcon model
            made from one) is exported with its KV cache as inputs and outputs
            (`decoder_onnx.py`; the example inputs are then not used). None: when it is one
            and `dynamic_batch`; True: required; False: never, the whole sequence every call.
        scopes: when given, filled (in place) with each node's output name → the path of the
            module that computed it (static int8 export maps layers' recorded ranges by it).

    Returns:
        The written path.

    Raises:
        OutputExistsError: `path` (or an encoder-decoder LM's encoder file beside it) exists and `force` is false.
        UsageError: the example inputs do not fit `model.forward`, a `seq_inputs` name is
            not an input, or `kv_cache` and the model is no decoder language model.
        ExportError: the exporter failed, or a requested dynamic dim came out static.

    Example:
        >>> export_onnx(nn.Linear(4, 2), tmp / "m.onnx", (torch.randn(2, 4),))  # doctest: +SKIP
        PosixPath('.../m.onnx')
    """
    out = check_output(path, force=force)
    if kv_cache or (kv_cache is None and dynamic_batch):
        from .decoder_onnx import export_with_cache  # it builds on this module's steps

        if export_with_cache(model, out, opset=opset, required=bool(kv_cache), force=force) is not None:
            return out
    args, kwargs = _as_args(example_inputs, example_kwargs)
    name = type(model).__name__
    inputs = flatten_inputs(model, args, kwargs)
    input_names = [n for n, _ in inputs]
    unknown = [s for s in seq_inputs if s not in input_names]
    if unknown:
        raise UsageError(f"seq_inputs {unknown} are not inputs of {name}: its tensor inputs are {input_names}")
    # A graph that computes with fixed sizes (a .pt2 exported without dynamic_shapes) gets an ONNX
    # with those sizes, whose input shapes say so, instead of an error after all the work.
    fixed = fixed_dims(model, inputs, tuple(seq_inputs)) if isinstance(model, torch.fx.GraphModule) else {}
    if fixed:
        log.info("%s computes with fixed %s: exported with those sizes", name, fixed)
        dynamic_batch = dynamic_batch and "batch" not in fixed
        seq_inputs = () if "sequence" in fixed else seq_inputs
    shapes = dynamic_shapes(model, args, kwargs, dynamic_batch=dynamic_batch, seq_inputs=seq_inputs)
    wanted = _wanted_dims(inputs, dynamic_batch, seq_inputs)
    with eval_mode(model):
        outputs = flatten_outputs(run_model(model, args, kwargs))
        program = _run_exporter(model, args, kwargs, shapes if wanted else None, opset)
    _name_values(program.model, input_names, _output_names(outputs, input_names), name)
    _check_and_name_axes(program, wanted, name)
    if scopes is not None:
        scopes.update(_module_scopes(program.model))
    _drop_debug_metadata(program.model)
    external = _save(program, out)
    log.info("exported %s to %s (%d inputs, %d outputs%s)", name, out, len(inputs), len(outputs),
             ", weights in " + out.name + ".data" if external else "")
    return out


def _drop_debug_metadata(model) -> None:
    """Remove the exporter's per-node debug metadata (stack traces with local source paths).

    It is a fifth of a small model's file and leaks the exporting machine's paths into what
    gets shipped; onnxruntime never reads it.
    """
    import onnx_ir

    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        for key in [k for k in node.metadata_props if k.startswith("pkg.torch.onnx.")]:
            del node.metadata_props[key]



def _module_scopes(model) -> dict[str, str]:
    """Node output name → the innermost module path the exporter recorded for the node (pure)."""
    import ast

    import onnx_ir

    found = {}
    for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph):
        raw = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        try:
            scopes = ast.literal_eval(raw) if raw else None
        except (ValueError, SyntaxError):
            continue
        if isinstance(scopes, list) and len(scopes) >= 2 and scopes[-2]:
            for value in node.outputs:
                found[value.name] = scopes[-2]  # the last entry is the op itself
    return found


def run_model(model: nn.Module, args: tuple, kwargs: dict | None = None) -> Any:
    """Call `model(*args, **kwargs)` without gradients (pure).

    Raises:
        UsageError: the model fails on these inputs (wrong shape, dtype or device).
    """
    try:
        with torch.no_grad():
            return model(*args, **(kwargs or {}))
    except Exception as e:
        shapes = [tuple(t.shape) for _, t in flatten_inputs(model, args, kwargs)]
        raise UsageError(
            f"{type(model).__name__} failed on the example inputs (tensor shapes {shapes}): "
            f"{type(e).__name__}: {_exporter_error_line(e)}. Fix: pass inputs the model accepts (shape, dtype, device)"
        ) from e


def _as_args(example_inputs, example_kwargs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise UsageError(
            f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}: "
            "wrap a single tensor as (x,)"
        )
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise UsageError(f"example_kwargs must be a dict, got {type(example_kwargs).__name__}")
    return tuple(example_inputs), dict(example_kwargs or {})



def _run_exporter(model, args, kwargs, shapes, opset):
    """Run torch.onnx.export without letting it print; wrap any failure in ExportError."""
    out, err = io.StringIO(), io.StringIO()
    try:
        # The exporter prints graph dumps to stderr when torch.export fails, and progress to
        # stdout; the library must not print, so both go to the debug log.
        with _quiet_loggers(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            program = torch.onnx.export(
                model, args, None, kwargs=kwargs or None, dynamo=True, dynamic_shapes=shapes,
                opset_version=opset, verbose=False, external_data=False,
                custom_translation_table=recurrent_translations(),
            )
    except Exception as e:
        raise ExportError(
            f"could not export {type(model).__name__} to ONNX: {_exporter_error_line(e)}. Fix: capture the model "
            "with torch.export first (--capture export), or export static shapes (dynamic_batch=False, "
            "--static-shapes); VCON_DEBUG=1 shows the exporter's full message"
        ) from e
    finally:
        for stream, text in (("stdout", out.getvalue()), ("stderr", err.getvalue())):
            if text.strip():
                log.debug("torch.onnx.export %s:\n%s", stream, text)
    if program is None:  # only when f is given; ours is None
        raise ExportError(f"torch.onnx.export returned no program for {type(model).__name__}: use torch ≥ 2.6")
    return program


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    """Raise the exporter's loggers to WARNING for the block, unless we are debugging."""
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _exporter_error_line(exc: BaseException) -> str:
    """The line of an exporter error that says what went wrong (not its boilerplate)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    summary = text.split("## Exception summary", 1)
    if len(summary) == 2:
        text = summary[1]
    for line in text.splitlines():
        line = line.strip()
        if line:
            return re.sub(r"^<class '(?:[\w.]*\.)?(\w+)'>:", r"\1:", line)
    return type(exc).__name__


def _save(program, out: Path) -> bool:
    """Write the program to `out` atomically; True when its weights went to `OUT.data`."""
    external = _initializer_bytes(program.model) > INLINE_LIMIT_BYTES
    with atomic_path(out) as tmp:
        if external:
            _save_external(program, out, tmp)
        else:
            program.save(tmp, external_data=False)
    return external


def _initializer_bytes(model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def _save_external(program, out: Path, tmp: Path) -> None:
    """Save with weights in `OUT.data`: stage both under the final names, data moved first.

    The data file's name is recorded inside the .onnx, so it is written under its final name
    in a staging folder, not under the temporary name `atomic_path` gives.
    """
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.absolute().parent) as stage:
        staged = Path(stage) / out.name
        program.save(staged, external_data=True)
        data = staged.with_name(out.name + ".data")
        if data.exists():
            with atomic_path(out.with_name(data.name)) as data_tmp:
                os.replace(data, data_tmp)
        os.replace(staged, tmp)
