"""Capture a model as a torch.fx GraphModule: symbolic tracing first, torch.export second.

`torch.fx` keeps torch.nn layers as leaves and keeps train/eval behaviour (dropout, batch-norm
updates). When it fails (Hugging Face transformers ≥ 5 have no FX tracer, data-dependent Python
control flow), or when its graph does not reproduce the model on the example inputs, we fall
back to `torch.export.export(strict=False)` with dynamic batch (and sequence) axes; exported
graphs are eval-mode graphs (no dropout, batch-norm statistics frozen).

When both fail and torch.fx failed inside a submodule, that submodule is kept whole (a leaf
of the graph) and tracing is tried again: the rest of the model is captured and can be
compressed, and the notes say what was kept whole. Keyword inputs are traced by fixing every
other argument of `forward` at its default (`concrete_args`). A KV cache is switched off
(`config.use_cache = False`) while capturing, and the notes say so.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import traceback
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import CaptureError, UsageError
from .select import input_signature, matches, recording_layer_shapes

__all__ = ["Captured", "capture", "CAPTURE_MODES", "describe_failure"]

log = logging.getLogger(__name__)

CAPTURE_MODES = ("auto", "fx", "export")
_MAX_LEAVES = 8  # submodules kept whole before a partial capture gives up


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    gm: fx.GraphModule
    path: str  # "fx" or "export"
    notes: list[str] = field(default_factory=list)  # why a fallback happened, what was assumed
    leaves: list[str] = field(default_factory=list)  # submodules kept whole because they did not trace


class _TraceFailure(Exception):
    """One tracer's failure: its own message, and where it happened (module path, source line)."""

    def __init__(self, tracer: str, exc: BaseException, module: str | None = None, module_type: str | None = None):
        super().__init__(tracer)
        self.tracer, self.exc, self.module, self.module_type = tracer, exc, module, module_type

    def __str__(self) -> str:
        return describe_failure(self.exc, self.module, self.module_type).rstrip(".")


def capture(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict | None = None,
    *,
    mode: str = "auto",
    seq_inputs: tuple[str, ...] = (),
    leaf_modules: tuple[str, ...] = (),
) -> Captured:
    """Trace `model` into a GraphModule (pure: `model` is not changed).

    Args:
        model: the module to capture (an existing GraphModule is taken as is).
        example_args / example_kwargs: inputs the graph is checked against (and export traces).
        mode: "auto" (fx, then export, then fx with failing submodules kept whole), "fx"
            (fx, then fx with failing submodules kept whole) or "export".
        seq_inputs: input names whose dim 1 is a sequence axis (kept dynamic by export).
        leaf_modules: type names, globs or `re:` regexes of submodules torch.fx keeps whole
            (their layers are not compressed); `--ignore` patterns fit here.

    Raises:
        CaptureError: no path worked; the message names the module and source line that failed
            in each tracer, with each tracer's own reason, and the fixes.
        UsageError: unknown mode.

    Example:
        >>> captured = capture(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(2, 4),))
        >>> captured.path
        'fx'
    """
    if mode not in CAPTURE_MODES:
        raise UsageError(f"--capture must be one of {CAPTURE_MODES}, got {mode!r}")
    example_args, example_kwargs = tuple(example_args), dict(example_kwargs or {})
    if isinstance(model, fx.GraphModule):
        path = "export" if _looks_exported(model) else "fx"
        return Captured(model, path, [f"model is already a GraphModule ({path} graph); used as is"])
    notes: list[str] = []
    with _kv_cache_off(model, notes):
        return _capture(model, example_args, example_kwargs, mode, tuple(seq_inputs), tuple(leaf_modules), notes)


def _capture(model, args, kwargs, mode, seq_inputs, leaf_modules, notes) -> Captured:
    name = type(model).__name__
    fx_failure = export_failure = None
    if mode in ("auto", "fx"):
        try:
            gm = _fx_trace(model, args, kwargs, leaf_modules, ())
        except _TraceFailure as failure:
            fx_failure = failure
        else:
            hidden = _hidden_layers(gm, leaf_modules) if mode == "auto" else {}
            if not hidden:
                return Captured(gm, "fx", notes)
            return _open_hidden_layers(model, args, kwargs, seq_inputs, gm, hidden, notes)
        log.info("torch.fx could not trace %s: %s", name, fx_failure)
        if mode == "auto":
            notes.append(f"torch.fx failed ({fx_failure}); used torch.export")
    if mode in ("auto", "export"):
        try:
            return Captured(_export(model, args, kwargs, seq_inputs, notes), "export", notes)
        except _TraceFailure as failure:  # any exporter failure: report it with the other tracer's
            export_failure = failure
            log.info("torch.export could not capture %s: %s", name, export_failure)
    if fx_failure is not None and fx_failure.module:
        with contextlib.suppress(_TraceFailure):
            gm, leaves = _fx_with_leaves(model, args, kwargs, leaf_modules, fx_failure)
            if mode == "auto":
                notes[:] = [n for n in notes if not n.startswith("torch.fx failed")]
                notes.append(f"torch.export failed too ({export_failure})")
            notes.append(
                f"torch.fx failed ({fx_failure}); captured with {', '.join(leaves)} kept whole "
                "(leaf modules: their layers stay dense)"
            )
            return Captured(gm, "fx", notes, leaves)
    last = export_failure or fx_failure
    raise CaptureError(_failure_message(name, mode, fx_failure, export_failure)) from last.exc


# torch.nn modules that torch.fx keeps whole (it never traces into torch.nn) yet hold Linear
# projections: their layers are only reachable through torch.export, which lowers them to aten ops.
_OPAQUE_TO_FX = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                 nn.TransformerEncoder, nn.TransformerDecoder, nn.Transformer)


def _hidden_layers(gm: fx.GraphModule, leaf_modules: tuple[str, ...]) -> dict[str, int]:
    """Modules the fx graph calls whole that hide weight matrices from compression: path → parameters."""
    hidden = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or node.target in hidden:
            continue
        module = gm.get_submodule(node.target)
        if isinstance(module, _OPAQUE_TO_FX) and not any(matches(p, node.target, module) for p in leaf_modules):
            hidden[node.target] = sum(p.numel() for p in module.parameters() if p.dim() >= 2)
    return hidden


def _open_hidden_layers(model, args, kwargs, seq_inputs, fx_gm, hidden: dict[str, int], notes) -> Captured:
    """Prefer torch.export when the fx graph keeps weight-holding torch.nn blocks whole."""
    kinds = sorted({type(fx_gm.get_submodule(p)).__name__ for p in hidden})
    what = f"{len(hidden)} {'/'.join(kinds)} module(s) with {sum(hidden.values()):,} weights"
    try:
        gm = _export(model, args, kwargs, seq_inputs, notes)
    except _TraceFailure as failure:
        notes.append(f"torch.fx keeps {what} whole (their layers stay dense); torch.export, which would open "
                     f"them, failed ({failure})")
        return Captured(fx_gm, "fx", notes)
    notes.append(f"torch.fx keeps {what} whole; used torch.export, which opens them to compression "
                 "(--capture fx keeps them whole)")
    return Captured(gm, "export", notes)


def _failure_message(name: str, mode: str, fx_failure, export_failure) -> str:
    parts = []
    if fx_failure is not None:
        parts.append(f"torch.fx failed {fx_failure}")
    if export_failure is not None:
        parts.append(f"torch.export failed {export_failure}")
    where = fx_failure.module if fx_failure is not None and fx_failure.module else None
    fixes = []
    if mode == "fx":
        fixes.append("try --capture export")
    elif mode == "export":
        fixes.append("try --capture fx")
    if where:
        fixes.append(f"keep {where} whole as a leaf module (leaf_modules=[{where!r}], or --ignore {where})")
    else:
        fixes.append("move the failing line into a submodule and keep that whole as a leaf module "
                     "(leaf_modules=[...], or --ignore it)")
    fixes.append("rewrite the data-dependent Python control flow it names, or give example inputs "
                 "(--input-shape/--seq-len) it accepts")
    return f"could not capture {name}: " + "; ".join(parts) + ". Fix: " + "; ".join(fixes)


# ── torch.fx ────────────────────────────────────────────────────────────────────────────────


class _Tracer(fx.Tracer):
    """The default tracer, plus: extra leaf modules, and the module being traced when it fails."""

    def __init__(self, patterns: tuple[str, ...], paths: tuple[str, ...]):
        super().__init__()
        self.patterns, self.paths = patterns, set(paths)
        self.stack: list[tuple[str, str]] = []  # (path, type) of the modules being traced, innermost last

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.paths or any(matches(p, module_qualified_name, m) for p in self.patterns):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()  # left in place on an exception: the innermost module is the culprit
        return out


def _fx_trace(model: nn.Module, args: tuple, kwargs: dict, patterns: tuple[str, ...], leaves) -> fx.GraphModule:
    tracer = _Tracer(patterns, tuple(leaves))
    try:
        graph = tracer.trace(model, concrete_args=_concrete_args(model, args, kwargs))
        gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # any tracer failure means: try the other path
        path, kind = tracer.stack[-1] if tracer.stack else (None, None)
        raise _TraceFailure("torch.fx", exc, path, kind) from exc
    # A trace can succeed yet bake in one branch of Python control flow: check it reproduces
    # the model on the example inputs before trusting it.
    was_training = model.training
    model.eval()
    gm.eval()
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        with torch.no_grad():
            ref = model(*args, **kwargs)
            with recording_layer_shapes(gm, shapes):
                got = gm(*args, **kwargs)
    except Exception as exc:
        raise _TraceFailure("torch.fx", exc) from exc
    finally:
        model.train(was_training)
        gm.train(was_training)
    if not _same_outputs(ref, got):
        raise _TraceFailure("torch.fx", RuntimeError(
            "the traced graph does not reproduce the model's outputs on the example inputs "
            "(Python control flow was fixed at trace time)"))
    # The check run already saw every layer's output shape: find_sites reuses them instead of
    # running the model a third time (a third of `inspect`'s time on a CNN).
    gm.meta["vcon_shapes"] = {"inputs": input_signature(args, kwargs), "layers": shapes}
    return gm


def _fx_with_leaves(model, args, kwargs, patterns, failure: _TraceFailure) -> tuple[fx.GraphModule, list[str]]:
    """Trace again, keeping each submodule torch.fx fails in whole, until it succeeds."""
    leaves: list[str] = []
    while failure.module and failure.module not in leaves and len(leaves) < _MAX_LEAVES:
        leaves.append(failure.module)
        try:
            return _fx_trace(model, args, kwargs, patterns, leaves), leaves
        except _TraceFailure as again:
            failure = again
    raise failure


def _concrete_args(model: nn.Module, args: tuple, kwargs: dict) -> dict | None:
    """Every `forward` argument the example inputs leave out, fixed at its default.

    Keyword inputs (`input_ids=...`) then trace as placeholders, and optional arguments
    (`mask=None`) do not reach `if mask is not None` as proxies.
    """
    try:
        sig = inspect.signature(model.forward)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    concrete = {}
    for name, p in sig.parameters.items():
        if name in bound.arguments or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None  # a required input is missing: let the tracer say so
        concrete[name] = p.default
    return concrete or None


# ── torch.export ────────────────────────────────────────────────────────────────────────────


def _export(model: nn.Module, args: tuple, kwargs: dict, seq_inputs: tuple[str, ...], notes: list[str]) -> fx.GraphModule:
    was_training = model.training
    # Exported graphs are captured in eval mode: dropout is left out and batch-norm statistics
    # stay frozen while fine-tuning them (said in the README).
    model.eval()
    stack: list[tuple[str, str]] = []
    try:
        with _quiet(), _module_stack(model, stack):
            try:
                ep = torch.export.export(model, args, kwargs, strict=False,
                                         dynamic_shapes=_dynamic_shapes(model, args, kwargs, seq_inputs))
            except Exception as exc:
                ep = torch.export.export(model, args, kwargs, strict=False)
                notes.append(f"dynamic batch/sequence export failed ({_first_line(exc)}); exported with static shapes")
    except Exception as exc:
        path, kind = stack[-1] if stack else (None, None)
        raise _TraceFailure("torch.export", exc, path, kind) from exc
    finally:
        model.train(was_training)
    gm = ep.module(check_guards=False)
    # ep.module() forbids train()/eval() on the instance; our graph is eval-semantics anyway,
    # and the Blend modules we add must follow train()/eval().
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    gm.meta["vcon_exported"] = True
    return gm


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, seq_inputs: tuple[str, ...]):
    """Dim 0 of every tensor input dynamic (batch), dim 1 too for sequence inputs."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    shapes = {}
    for name, value in bound.arguments.items():
        shapes[name] = _dims_for(name, value, seq_inputs)
    return shapes


def _dims_for(name: str, value, seq_inputs):
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return None
        dims = {0: torch.export.Dim.AUTO}
        if name in seq_inputs and value.dim() > 1:
            dims[1] = torch.export.Dim.AUTO
        return dims
    if isinstance(value, (tuple, list)):
        return type(value)(_dims_for(name, v, seq_inputs) for v in value)
    if isinstance(value, dict):
        return {k: _dims_for(k, v, seq_inputs) for k, v in value.items()}
    return None


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[tuple[str, str]]):
    """Keep `stack` = the submodules whose forward is running (innermost last); left as is on an exception."""
    def leave(*_):  # returns None: a forward hook's return value would replace the output
        if stack:
            stack.pop()

    handles = []
    for path, module in model.named_modules():
        if not path:
            continue
        handles.append(module.register_forward_pre_hook(
            lambda _m, _a, path=path, kind=type(module).__name__: stack.append((path, kind)) and None))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# torch.export prints graph dumps when it fails and warns through these loggers; the library
# does not print, so both go to the debug log.
_CHATTY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo")


@contextlib.contextmanager
def _quiet():
    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(n) for n in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    if not log.isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for stream, text in (("stdout", out.getvalue()), ("stderr", err.getvalue())):
            if text.strip():
                log.debug("torch.export %s:\n%s", stream, text)


# ── shared ──────────────────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def _kv_cache_off(model: nn.Module, notes: list[str]):
    """Hugging Face models: `config.use_cache = False` while capturing (restored after).

    A KV cache adds `past_key_values` outputs (cache objects) that neither tracer handles, and
    a compressed model is exported for whole-sequence inference.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    was = config.use_cache
    generates = bool(getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False))
    with contextlib.suppress(Exception):
        generates = generates or bool(model.can_generate())
    if generates:  # an encoder ignores the flag: nothing to say
        notes.append("captured with use_cache=False: no KV cache, past_key_values are neither inputs nor "
                     "outputs (each call runs the whole sequence)")
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = was


def _same_outputs(ref, got) -> bool:
    ref_leaves = [t for t in torch.utils._pytree.tree_leaves(ref) if isinstance(t, torch.Tensor)]
    got_leaves = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    if len(ref_leaves) != len(got_leaves):
        return False
    return all(r.shape == g.shape and torch.allclose(r, g, rtol=1e-5, atol=1e-6, equal_nan=True)
               for r, g in zip(ref_leaves, got_leaves))


def _looks_exported(gm: fx.GraphModule) -> bool:
    return bool(getattr(gm, "meta", {}).get("vcon_exported")) or any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes
    )


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, contextlib, fx) if m.__file__)


def describe_failure(exc: BaseException, module: str | None = None, module_type: str | None = None) -> str:
    """`in encoder.0 (Gate) at model.py:12 (`if x.sum() > 0:`): TraceError: <the tracer's message>`.

    The source line is the innermost frame outside torch and vcon-fx, over the exception and
    its causes: the line of the model (or of its library) that the tracer could not follow.
    """
    parts = []
    if module:
        parts.append(f"in {module} ({module_type})")
    frame = _user_frame(exc)
    if frame is not None:
        line = f" (`{frame.line.strip()[:120]}`)" if frame.line else ""
        parts.append(f"at {_short(frame.filename)}:{frame.lineno}{line}")
    return " ".join(parts + [_first_line(exc)]) if parts else _first_line(exc)


def _user_frame(exc: BaseException):
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    seen, best = set(), None
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for frame in traceback.extract_tb(exc.__traceback__):
            path = os.path.abspath(frame.filename)
            if path.startswith(_LIBRARY_DIRS) or path.startswith(here) or frame.filename.startswith("<"):
                continue
            best = frame
        exc = exc.__cause__ or exc.__context__
    return best


def _short(filename: str) -> str:
    parts = os.path.abspath(filename).split(os.sep)
    if "site-packages" in parts:
        return "/".join(parts[parts.index("site-packages") + 1:])
    return "/".join(parts[-2:])


def _first_line(exc: BaseException) -> str:
    """`TypeName: first sentence of the message` (tracer messages go on with generic advice)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    cut = text.find(". ", 20)
    text = text[: cut + 1] if cut > 0 else text
    text = text if len(text) <= 240 else text[:239] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
