"""Export a model to one ONNX file with `torch.onnx.export(dynamo=True)`, batch (and seq) dynamic.

Every tensor input gets a dynamic dim 0 ("batch"); inputs named in `seq_inputs` also a dynamic
dim 1 ("seq"). Graph inputs and outputs get stable names: inputs from the forward signature
(`x`, `input_ids`, `pair_0` for a list argument), outputs from the output's pytree path
(`output`, `output_0`, `logits`, `hidden_states_1`). `check.py` feeds onnxruntime by these
same names.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.utils._pytree as pytree
from torch import nn

from ..errors import ExportError, UsageError
from ..io.atomic import atomic_path, check_output

__all__ = ["export_onnx", "flatten_inputs", "flatten_outputs", "eval_mode", "run_model"]

log = logging.getLogger(__name__)

# The exporter itself moves weights out of the file above 1.5 GiB (protobuf's hard limit is
# 2 GiB); below it we keep one self-contained file.
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024

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

    Returns:
        The written path.

    Raises:
        OutputExistsError: `path` exists and `force` is false.
        UsageError: the example inputs do not fit `model.forward`, or a `seq_inputs` name is
            not an input.
        ExportError: the exporter failed, or a requested dynamic dim came out static.

    Example:
        >>> export_onnx(nn.Linear(4, 2), tmp / "m.onnx", (torch.randn(2, 4),))  # doctest: +SKIP
        PosixPath('.../m.onnx')
    """
    out = check_output(path, force=force)
    args, kwargs = _as_args(example_inputs, example_kwargs)
    name = type(model).__name__
    inputs = flatten_inputs(model, args, kwargs)
    input_names = [n for n, _ in inputs]
    unknown = [s for s in seq_inputs if s not in input_names]
    if unknown:
        raise UsageError(f"seq_inputs {unknown} are not inputs of {name}: its tensor inputs are {input_names}")
    shapes = _dynamic_shapes(model, args, kwargs, dynamic_batch, seq_inputs)
    wanted = _wanted_dims(inputs, dynamic_batch, seq_inputs)
    _refuse_static_capture(model, inputs, wanted)
    with eval_mode(model):
        outputs = flatten_outputs(run_model(model, args, kwargs))
        program = _run_exporter(model, args, kwargs, shapes if wanted else None, opset)
    _name_values(program.model, input_names, _output_names(outputs, input_names), name)
    _check_and_name_axes(program, wanted, name)
    _drop_debug_metadata(program.model)
    external = _initializer_bytes(program.model) > EXTERNAL_DATA_THRESHOLD
    with atomic_path(out) as tmp:
        if external:
            _save_external(program, out, tmp)
        else:
            program.save(tmp, external_data=False)
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


def flatten_inputs(model: nn.Module, args: tuple, kwargs: dict | None = None) -> list[tuple[str, torch.Tensor]]:
    """List the tensor inputs in the order the exporter flattens them, each with its ONNX name.

    Args:
        model: the model whose `forward` signature names the positional inputs.
        args: positional inputs.
        kwargs: keyword inputs.

    Returns:
        `(name, tensor)` pairs; non-tensor inputs (None, ints, flags) are left out, as the
        exporter bakes them into the graph.
    """
    params = _positional_names(model)
    named = []
    for path, leaf in pytree.tree_flatten_with_path((tuple(args), dict(kwargs or {})))[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        top, *rest = path[1:]
        if path[0].idx == 0:
            head = params[top.idx] if top.idx < len(params) else f"input_{top.idx}"
        else:
            head = str(top.key)
        named.append(("_".join([head, *(_key_str(k) for k in rest)]), leaf))
    return _unique(named)


def flatten_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """List the tensor leaves of a model output (tensor, tuple, dict, ModelOutput), each named.

    Args:
        output: what the model's forward returned.

    Returns:
        `(name, tensor)` pairs in pytree order: `output` for a lone tensor, `output_0`, ... for
        a sequence, the key (`logits`, `hidden_states_0`) for a mapping or ModelOutput.
    """
    named = []
    for path, leaf in pytree.tree_flatten_with_path(output)[0]:
        if not isinstance(leaf, torch.Tensor):
            continue
        parts = [_key_str(k) for k in path]
        if not path or not isinstance(path[0], (pytree.MappingKey, pytree.GetAttrKey)):
            parts.insert(0, "output")
        named.append(("_".join(parts), leaf))
    return _unique(named)


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
            f"{type(e).__name__}: {_first_line(e)}. Fix: pass inputs the model accepts (shape, dtype, device)"
        ) from e


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then give each its own flag back.

    Flags are set directly rather than through `.eval()`: a `torch.export` GraphModule refuses
    `.eval()`, and a model may mix modes on purpose (frozen batch norms).
    """
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


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


def _positional_names(model: nn.Module) -> list[str]:
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _key_str(key) -> str:
    if isinstance(key, pytree.SequenceKey):
        return str(key.idx)
    if isinstance(key, pytree.MappingKey):
        return re.sub(r"\W", "_", str(key.key))
    if isinstance(key, pytree.GetAttrKey):
        return key.name
    return re.sub(r"\W", "_", str(key))


def _unique(named: list) -> list:
    # two leaves can flatten to one name (`x_0` the argument, `x` a list); number the later one
    seen: set[str] = set()
    result = []
    for name, value in named:
        new, k = name, 0
        while new in seen:
            k += 1
            new = f"{name}_{k}"
        seen.add(new)
        result.append((new, value))
    return result


def _output_names(outputs: list, input_names: list[str]) -> list[str]:
    # ONNX value names are global: an output may not reuse an input's name.
    taken = set(input_names)
    names = []
    for name, _ in outputs:
        while name in taken:
            name += "_out"
        taken.add(name)
        names.append(name)
    return names


def _wanted_dims(inputs, dynamic_batch: bool, seq_inputs) -> list[tuple[int, int, str]]:
    """(input index, axis, axis name) for every dim the caller asked to be dynamic."""
    wanted = []
    for i, (name, t) in enumerate(inputs):
        if dynamic_batch and t.dim() >= 1:
            wanted.append((i, 0, "batch"))
        if name in seq_inputs and t.dim() >= 2:
            wanted.append((i, 1, "seq"))
    return wanted


def _refuse_static_capture(model, inputs, wanted) -> None:
    """Raise when a torch.export GraphModule was captured with a dim static that should be dynamic.

    Its placeholders carry the capture's fake tensors: an int where we want a symbol means the
    module guards on that size (it refuses other sizes, in PyTorch too), and re-exporting it
    gives an ONNX signature that only looks dynamic.
    """
    if not isinstance(model, torch.fx.GraphModule):
        return
    fakes = [n.meta.get("val") for n in model.graph.nodes if n.op == "placeholder"]
    fakes = [v for v in fakes if isinstance(v, torch.Tensor)]
    if len(fakes) != len(inputs):  # symbolic_trace placeholders carry no "val"
        return
    static = [f"{inputs[i][0]} dim {axis} ({axis_name}) is {fakes[i].shape[axis]}"
              for i, axis, axis_name in wanted if isinstance(fakes[i].shape[axis], int)]
    if static:
        raise ExportError(
            f"{type(model).__name__} was captured by torch.export with static shapes: {'; '.join(static)}. "
            "Fix: capture it with dynamic_shapes (torch.export.Dim.AUTO on the batch and seq dims), or "
            "export static shapes on purpose (dynamic_batch=False, --static-shapes)"
        )


def _dynamic_shapes(model, args, kwargs, dynamic_batch: bool, seq_inputs) -> dict:
    """dynamic_shapes keyed by forward parameter name, mirroring each input's structure.

    Dim.AUTO, neither named Dims nor Dim.DYNAMIC: when the model pins a size (a branch on
    x.shape, a literal reshape), a named Dim makes the ONNX exporter quietly retry with that
    dim static, and DYNAMIC fails with torch.export's long message; AUTO keeps the symbol and
    records the pin as a range [2, 2], which `_check_and_name_axes` turns into a clear error.
    Named Dims shared by inputs also force their sizes equal, an error when they are not.
    """
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as e:
        raise UsageError(f"example inputs do not fit {type(model).__name__}.forward: {e}") from None
    params = inspect.signature(model.forward).parameters
    positional = _positional_names(model)
    auto = torch.export.Dim.AUTO

    def spec(head: str, value):
        def leaf(path, t):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                return None
            dims = {0: auto} if dynamic_batch else {}
            if "_".join([head, *(_key_str(k) for k in path)]) in seq_inputs and t.dim() >= 2:
                dims[1] = auto
            return dims or None
        return pytree.tree_map_with_path(leaf, value)

    shapes = {}
    for pname, value in bound.arguments.items():
        kind = params[pname].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            shapes[pname] = tuple(spec(f"input_{len(positional) + i}", v) for i, v in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            shapes[pname] = {k: spec(k, v) for k, v in value.items()}
        else:
            shapes[pname] = spec(pname, value)
    return shapes


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
            )
    except Exception as e:
        raise ExportError(
            f"could not export {type(model).__name__} to ONNX: {_first_line(e)}. Fix: capture the model "
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


def _first_line(exc: BaseException) -> str:
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


def _name_values(model, input_names: list[str], output_names: list[str], model_name: str) -> None:
    """Give graph inputs and outputs our stable names, moving aside any value holding one."""
    graph = model.graph
    if len(graph.inputs) != len(input_names) or len(graph.outputs) != len(output_names):
        log.warning(
            "ONNX graph of %s has %d inputs and %d outputs, PyTorch %d and %d: keeping the exporter's names",
            model_name, len(graph.inputs), len(graph.outputs), len(input_names), len(output_names),
        )
        return
    import onnx_ir as ir

    by_name = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for v in node.outputs:
            by_name[v.name] = v
    for v in [*graph.inputs, *graph.initializers.values()]:
        by_name[v.name] = v
    renamed = set()
    for value, new in [*zip(graph.inputs, input_names), *zip(graph.outputs, output_names)]:
        if value.name == new or id(value) in renamed:
            continue  # an output that is an input unchanged keeps the input's name
        holder = by_name.get(new)
        if holder is not None and holder is not value:
            k = 0
            while f"{new}__{k}" in by_name:
                k += 1
            by_name.pop(new)
            holder.name = f"{new}__{k}"
            by_name[holder.name] = holder
        by_name.pop(value.name, None)
        value.name = new
        by_name[new] = value
        renamed.add(id(value))


def _check_and_name_axes(program, wanted: list[tuple[int, int, str]], model_name: str) -> None:
    """Raise if a requested dynamic dim came out static; rename the symbols to batch/seq.

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
    """(input index, axis) -> (lowest, highest or None) allowed by torch.export's constraints."""
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
