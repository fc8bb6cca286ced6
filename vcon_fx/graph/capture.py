"""Capture a model as a torch.fx GraphModule: the strategy that picks a tracer.

torch.fx first (`capture_fx`): it keeps torch.nn layers as leaves and train/eval behaviour.
When it fails (Hugging Face transformers ≥ 5 have no FX tracer, data-dependent Python control
flow), or when its graph does not reproduce the model on the example inputs, torch.export
second (`capture_export`), with dynamic batch (and sequence) axes.

When both fail and torch.fx failed inside a submodule, that submodule is kept whole (a leaf
of the graph) and tracing is tried again: the rest of the model is captured and can be
compressed, and the notes say what was kept whole. A KV cache is switched off
(`config.use_cache = False`) while capturing, and the notes say so. Failure text lives in
`capture_failure`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from torch import fx, nn

from ..errors import CaptureError, UsageError
from . import capture_export, capture_fx, contracts
from .capture_failure import TraceFailure, describe_failure, failure_message

__all__ = ["Captured", "capture", "CAPTURE_MODES", "describe_failure"]

log = logging.getLogger(__name__)

CAPTURE_MODES = ("auto", "fx", "export")


@dataclass
class Captured:
    """A captured graph and how it was obtained."""

    gm: fx.GraphModule
    path: str  # "fx" or "export"
    notes: list[str] = field(default_factory=list)  # why a fallback happened, what was assumed
    leaves: list[str] = field(default_factory=list)  # submodules kept whole because they did not trace


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
        path = "export" if capture_export.looks_exported(model) else "fx"
        # A loaded .pt2's ep.module() forbids train()/eval() on the instance (a copy drops that;
        # the CLI captures without one): the Blend modules we add must follow train()/eval().
        for name in ("train", "eval"):
            model.__dict__.pop(name, None)
        return Captured(model, path, [f"model is already a GraphModule ({path} graph); used as is"])
    notes: list[str] = []
    with _kv_cache_off(model, notes):
        captured = _capture(model, example_args, example_kwargs, mode, tuple(seq_inputs), tuple(leaf_modules), notes)
    if contracts.active():
        contracts.ensure_lint(captured.gm)
    return captured


def _capture(model, args, kwargs, mode, seq_inputs, leaf_modules, notes) -> Captured:
    # The routes are called through their modules (capture_fx.trace_with_fx, …) so that
    # benchmarks/toolspeed.py can time them by patching one name.
    name = type(model).__name__
    fx_failure = export_failure = None
    if mode in ("auto", "fx"):
        try:
            gm = capture_fx.trace_with_fx(model, args, kwargs, leaf_modules, ())
        except TraceFailure as failure:
            fx_failure = failure
        else:
            hidden = capture_fx.hidden_layers(gm, leaf_modules) if mode == "auto" else {}
            if not hidden:
                return Captured(gm, "fx", notes)
            return _open_hidden_layers(model, args, kwargs, seq_inputs, gm, hidden, notes)
        log.info("torch.fx could not trace %s: %s", name, fx_failure)
        if mode == "auto":
            notes.append(f"torch.fx failed ({fx_failure}); used torch.export")
    if mode in ("auto", "export"):
        try:
            return Captured(capture_export.trace_with_export(model, args, kwargs, seq_inputs, notes), "export", notes)
        except TraceFailure as failure:  # any exporter failure: report it with the other tracer's
            export_failure = failure
            log.info("torch.export could not capture %s: %s", name, export_failure)
    if fx_failure is not None and fx_failure.module:
        with contextlib.suppress(TraceFailure):
            return _with_failing_modules_whole(model, args, kwargs, mode, leaf_modules, notes, fx_failure,
                                               export_failure)
    last = export_failure or fx_failure
    raise CaptureError(failure_message(name, mode, fx_failure, export_failure)) from last.exc


def _with_failing_modules_whole(model, args, kwargs, mode, leaf_modules, notes, fx_failure, export_failure) -> Captured:
    """The fx graph with every submodule torch.fx fails in kept whole; `notes` say which (in place)."""
    gm, leaves = capture_fx.trace_with_leaves(model, args, kwargs, leaf_modules, fx_failure)
    if mode == "auto":
        notes[:] = [n for n in notes if not n.startswith("torch.fx failed")]
        notes.append(f"torch.export failed too ({export_failure})")
    notes.append(
        f"torch.fx failed ({fx_failure}); captured with {', '.join(leaves)} kept whole "
        "(leaf modules: their layers stay dense)"
    )
    return Captured(gm, "fx", notes, leaves)


def _open_hidden_layers(model, args, kwargs, seq_inputs, fx_gm, hidden: dict[str, int], notes) -> Captured:
    """Prefer torch.export when the fx graph keeps weight-holding torch.nn blocks whole."""
    kinds = sorted({type(fx_gm.get_submodule(p)).__name__ for p in hidden})
    what = f"{len(hidden)} {'/'.join(kinds)} module(s) with {sum(hidden.values()):,} weights"
    try:
        gm = capture_export.trace_with_export(model, args, kwargs, seq_inputs, notes)
    except TraceFailure as failure:
        notes.append(f"torch.fx keeps {what} whole (their layers stay dense); torch.export, which would open "
                     f"them, failed ({failure})")
        return Captured(fx_gm, "fx", notes)
    notes.append(f"torch.fx keeps {what} whole; used torch.export, which opens them to compression "
                 "(--capture fx keeps them whole)")
    return Captured(gm, "export", notes)


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
