"""The torch.export route of capture: `torch.export.export(strict=False)` with dynamic batch (and sequence) axes.

It follows data-dependent code that torch.fx cannot, and opens torch.nn blocks (multi-head
attention) that torch.fx keeps whole. Exported graphs are eval-mode graphs: dropout is left
out and batch-norm statistics are frozen.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch
from torch import fx, nn

from .capture_failure import TraceFailure, first_sentence
from .dims import dynamic_shapes

__all__ = ["trace_with_export", "looks_exported", "quiet_export"]

log = logging.getLogger(__name__)

# torch.export prints graph dumps when it fails and warns through these loggers; the library
# does not print, so both go to the debug log.
_CHATTY_LOGGERS = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export", "torch._dynamo",
                   "torch._subclasses.fake_tensor")


def trace_with_export(model: nn.Module, args: tuple, kwargs: dict, seq_inputs: tuple[str, ...],
                      notes: list[str]) -> fx.GraphModule:
    """Export `model` in eval mode (pure: its train/eval mode is restored; `notes` in place).

    Dim 0 of every tensor input is dynamic, and dim 1 of the `seq_inputs`; when that fails the
    shapes are static and `notes` says so.

    Raises:
        TraceFailure: the exporter failed, naming the innermost module whose forward was running.
    """
    was_training = model.training
    # Exported graphs are captured in eval mode: dropout is left out and batch-norm statistics
    # stay frozen while fine-tuning them (said in the README).
    model.eval()
    stack: list[tuple[str, str]] = []
    try:
        with quiet_export(), _module_stack(model, stack):
            try:
                ep = torch.export.export(model, args, kwargs, strict=False,
                                         dynamic_shapes=dynamic_shapes(model, args, kwargs, seq_inputs=seq_inputs))
            except Exception as exc:
                ep = torch.export.export(model, args, kwargs, strict=False)
                notes.append(f"dynamic batch/sequence export failed ({first_sentence(exc)}); exported with the example's "
                             "fixed shapes: fine-tuning uses its batch, and the ONNX takes exactly its shapes")
    except Exception as exc:
        path, kind = stack[-1] if stack else (None, None)
        raise TraceFailure("torch.export", exc, path, kind) from exc
    finally:
        model.train(was_training)
    gm = ep.module(check_guards=False)
    # ep.module() forbids train()/eval() on the instance; our graph is eval-semantics anyway,
    # and the Blend modules we add must follow train()/eval().
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    gm.meta["vcon_exported"] = True
    return gm


def looks_exported(gm: fx.GraphModule) -> bool:
    """True when `gm` came from torch.export (marked so, or calling aten operators)."""
    return bool(getattr(gm, "meta", {}).get("vcon_exported")) or any(
        n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes
    )


@contextlib.contextmanager
def _module_stack(model: nn.Module, stack: list[tuple[str, str]]):
    """Keep `stack` = the submodules whose forward is running (innermost last); left as is on an exception."""
    def leave(*_):  # returns None: a forward hook's return value would replace the output
        if stack:
            stack.pop()

    with contextlib.ExitStack() as hooks:
        for path, module in model.named_modules():
            if path:
                enter = module.register_forward_pre_hook(
                    lambda _m, _a, path=path, kind=type(module).__name__: stack.append((path, kind)) and None)
                hooks.callback(enter.remove)
                hooks.callback(module.register_forward_hook(leave).remove)
        yield


@contextlib.contextmanager
def quiet_export():
    """torch.export's printed graph dumps and warnings go to the debug log (the library never prints)."""
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
