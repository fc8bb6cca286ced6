"""Capture a model as a torch.fx GraphModule: symbolic tracing first, torch.export second.

`torch.fx.symbolic_trace` keeps torch.nn layers as leaves and keeps train/eval behaviour.
When it fails (Hugging Face transformers ≥ 5 have no FX tracer, data-dependent Python control
flow), or when its graph does not reproduce the model on the example inputs, we fall back to
`torch.export.export(strict=False)` with dynamic batch (and sequence) axes.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import CaptureError, UsageError

__all__ = ["Captured", "capture", "CAPTURE_MODES"]

log = logging.getLogger(__name__)

CAPTURE_MODES = ("auto", "fx", "export")


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    gm: fx.GraphModule
    path: str  # "fx" or "export"
    notes: list[str] = field(default_factory=list)  # why a fallback happened, what was assumed


def capture(
    model: nn.Module,
    example_args: tuple = (),
    example_kwargs: dict | None = None,
    *,
    mode: str = "auto",
    seq_inputs: tuple[str, ...] = (),
) -> Captured:
    """Trace `model` into a GraphModule (pure: `model` is not changed).

    Args:
        model: the module to capture (an existing GraphModule is taken as is).
        example_args / example_kwargs: inputs the graph is checked against (and export traces).
        mode: "auto" (fx, then export), "fx" or "export".
        seq_inputs: input names whose dim 1 is a sequence axis (kept dynamic by export).

    Raises:
        CaptureError: neither path worked; the message carries each tracer's own reason.
    """
    if mode not in CAPTURE_MODES:
        raise UsageError(f"--capture must be one of {CAPTURE_MODES}, got {mode!r}")
    example_kwargs = dict(example_kwargs or {})
    if isinstance(model, fx.GraphModule):
        path = "export" if _looks_exported(model) else "fx"
        return Captured(model, path, [f"model is already a GraphModule ({path} graph); used as is"])
    notes: list[str] = []
    if mode in ("auto", "fx"):
        try:
            gm = _fx_trace(model, example_args, example_kwargs)
            return Captured(gm, "fx", notes)
        except Exception as exc:  # any tracer failure means: try the other path
            reason = _first_line(exc)
            if mode == "fx":
                raise CaptureError(
                    f"torch.fx could not trace {type(model).__name__}: {reason}. "
                    "Try --capture export, or --ignore the module named in the message"
                ) from exc
            notes.append(f"torch.fx failed ({reason}); used torch.export")
            log.info("symbolic_trace failed on %s: %s; falling back to torch.export", type(model).__name__, reason)
    try:
        gm = _export(model, example_args, example_kwargs, seq_inputs, notes)
    except Exception as exc:
        raise CaptureError(
            f"could not capture {type(model).__name__}: torch.export failed ({_first_line(exc)})"
            + (f"; {notes[0]}" if notes else "")
            + ". Give --ignore for the module that fails, fix the input shape (--input-shape/--seq-len), "
            "or make the failing construct a leaf module"
        ) from exc
    return Captured(gm, "export", notes)


def _fx_trace(model: nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    if kwargs:
        raise TypeError("symbolic tracing takes positional tensors only (model has keyword inputs)")
    was_training = model.training
    gm = fx.symbolic_trace(model)
    # A trace can succeed yet bake in one branch of Python control flow: check it reproduces
    # the model on the example inputs before trusting it.
    model.eval()
    gm.eval()
    try:
        with torch.no_grad():
            ref = model(*args)
            got = gm(*args)
    finally:
        model.train(was_training)
        gm.train(was_training)
    if not _same_outputs(ref, got):
        raise RuntimeError("the traced graph does not reproduce the model's outputs on the example inputs")
    return gm


def _export(model: nn.Module, args: tuple, kwargs: dict, seq_inputs: tuple[str, ...], notes: list[str]) -> fx.GraphModule:
    was_training = model.training
    # Exported graphs are captured in eval mode: dropout is left out and batch-norm statistics
    # stay frozen while fine-tuning them (said in the README).
    model.eval()
    try:
        try:
            ep = torch.export.export(model, args, kwargs, strict=False,
                                     dynamic_shapes=_dynamic_shapes(model, args, kwargs, seq_inputs))
        except Exception as exc:
            notes.append(f"dynamic batch/sequence export failed ({_first_line(exc)}); exported with static shapes")
            ep = torch.export.export(model, args, kwargs, strict=False)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__
