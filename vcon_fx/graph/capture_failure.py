"""Capture failure text: what a tracer could not follow, where, and how to fix it.

A failure names the submodule the tracer was in, the innermost source line outside torch and
vcon-fx (the model's own line), and the tracer's own reason cut to its first sentence.
"""

from __future__ import annotations

import contextlib
import os
import traceback

import torch
from torch import fx

from ..errors import message_line

__all__ = ["TraceFailure", "describe_failure", "failure_message", "first_sentence"]


class TraceFailure(Exception):
    """One tracer's failure: its own message, and where it happened (module path, source line)."""

    def __init__(self, tracer: str, exc: BaseException, module: str | None = None, module_type: str | None = None):
        super().__init__(tracer)
        self.tracer, self.exc, self.module, self.module_type = tracer, exc, module, module_type

    def __str__(self) -> str:
        return describe_failure(self.exc, self.module, self.module_type).rstrip(".")


def failure_message(name: str, mode: str, fx_failure: TraceFailure | None, export_failure: TraceFailure | None) -> str:
    """The CaptureError text (pure): each tracer's failure, then the fixes that fit `mode`."""
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


_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, contextlib, fx) if m.__file__)


def describe_failure(exc: BaseException, module: str | None = None, module_type: str | None = None) -> str:
    """`in encoder.0 (Gate) at model.py:12 (`if x.sum() > 0:`): TraceError: <the tracer's message>` (pure).

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
    return " ".join(parts + [first_sentence(exc)]) if parts else first_sentence(exc)


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


def first_sentence(exc: BaseException) -> str:
    """`TypeName: first sentence of the message` (tracer messages go on with generic advice)."""
    text = message_line(exc) if str(exc).strip() else ""
    cut = text.find(". ", 20)
    text = text[: cut + 1] if cut > 0 else text
    text = text if len(text) <= 240 else text[:239] + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
