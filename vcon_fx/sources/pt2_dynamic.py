"""Give a `.pt2` exported with fixed shapes a dynamic batch (and sequence), when its graph allows.

`torch.export.export(model, (x,))` without `dynamic_shapes` fixes every size: the program then
refuses any other batch, so fine-tuning at batch 32 and an ONNX for any batch would fail. Its
module is re-exported with `Dim.AUTO` on batch (and sequence) and kept only when the new program
reproduces the original on the original inputs and also runs at another size. A graph that
computes with the fixed sizes (a view or reshape with literal sizes) cannot be freed this way;
it stays fixed, and the note says what follows and how to re-export it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..graph.capture_export import quiet_export
from ..graph.dims import MIN_DYNAMIC_SIZE, dynamic_shapes, dynamic_shapes_call, fixed_dims
from .example_sizes import resize_dim

__all__ = ["make_dynamic", "Dynamized"]

log = logging.getLogger(__name__)


class Dynamized:
    """The outcome: the program to use, its example inputs, and the one-line note (None: nothing to say)."""

    def __init__(self, ep, args: tuple, kwargs: dict, note: str | None):
        self.ep, self.args, self.kwargs, self.note = ep, args, kwargs, note


def make_dynamic(ep, args: tuple, kwargs: dict, names: list[str], seq_inputs: tuple[str, ...],
                 path: Path) -> Dynamized:
    """Re-export `ep` with dynamic batch (and sequence) dims when it fixed them (pure).

    Args:
        ep: the loaded ExportedProgram.
        args / kwargs: its example inputs.
        names: its tensor inputs' names, in placeholder order.
        seq_inputs: the names whose dim 1 is a sequence axis.
        path: the archive, for the note.
    """
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    inputs = list(zip(names, tensors))
    fixed = fixed_dims(ep.graph_module, inputs, seq_inputs, set(ep.graph_signature.user_inputs))
    if not fixed:
        return Dynamized(ep, *_widened(args, kwargs, names, seq_inputs), None)
    shapes = ", ".join(f"{n} {'×'.join(map(str, t.shape))}" for n, t in inputs)
    attempts = [("batch and sequence", seq_inputs), ("batch", ())] if "sequence" in fixed else [("batch", ())]
    for what, seqs in attempts:
        try:
            with quiet_export():
                freed = _reexport(ep, args, kwargs, names, seqs)
        except Exception as exc:  # any failure means: this graph keeps its sizes
            log.info("%s: re-export with a dynamic %s failed: %s", path, what, str(exc).splitlines()[0][:200])
            continue
        left = fixed_dims(freed.graph_module, inputs, seqs, set(freed.graph_signature.user_inputs))
        if "batch" in left or (seqs and "sequence" in left):
            continue
        if not _same_outputs(ep, freed, args, kwargs, names, seqs):
            continue
        note = (f"{path.name} was exported with fixed shapes ({shapes}); vcon-fx re-exported it with a dynamic {what} "
                "(same outputs), so fine-tuning and the ONNX take other sizes")
        if seqs != seq_inputs and "sequence" in fixed:
            note += f"; the sequence length stays {fixed['sequence']}"
        return Dynamized(freed, *_widened(args, kwargs, names, seqs), note)
    sizes = " and ".join(f"{k} {v}" for k, v in fixed.items())
    return Dynamized(ep, args, kwargs, (
        f"{path.name} was exported with fixed shapes ({shapes}) and its graph computes with them (a view or reshape "
        f"with literal sizes), so they stay fixed: fine-tuning uses {sizes}, and the ONNX takes exactly these shapes. "
        f"For other sizes, re-export it with torch.export.export(model, inputs, {dynamic_shapes_call(names, seq_inputs)}) "
        "(Dim = torch.export.Dim; inputs of batch 2 or more, since export fixes sizes of 1)"))


def _reexport(ep, args: tuple, kwargs: dict, names: list[str], seq_inputs: tuple[str, ...]):
    module = ep.module(check_guards=False)
    module._forward_pre_hooks.clear()  # the shape guards of the original program
    wide_args, wide_kwargs = _widened(args, kwargs, names, seq_inputs)
    shapes = dynamic_shapes(module, wide_args, wide_kwargs, seq_inputs=seq_inputs)
    return torch.export.export(module, wide_args, wide_kwargs, dynamic_shapes=shapes, strict=False)


def _same_outputs(ep, freed, args: tuple, kwargs: dict, names: list[str], seq_inputs: tuple[str, ...]) -> bool:
    """The freed program matches the original on its inputs and runs at another batch (pure)."""
    odd_args, odd_kwargs = _widened(args, kwargs, names, seq_inputs, grow=1)
    try:
        with torch.no_grad():
            want = pytree.tree_leaves(ep.module()(*args, **kwargs))
            got = pytree.tree_leaves(freed.module()(*args, **kwargs))
            freed.module()(*odd_args, **odd_kwargs)
    except Exception as exc:  # a runtime shape assertion: the graph still computes with a fixed size
        log.info("the re-exported program fails at another size: %s", str(exc).splitlines()[0][:200])
        return False
    return len(want) == len(got) and all(
        not isinstance(w, torch.Tensor) or (w.shape == g.shape and torch.allclose(w, g, rtol=1e-4, atol=1e-5))
        for w, g in zip(want, got))


def _widened(args: tuple, kwargs: dict, names: list[str], seq_inputs: tuple[str, ...], grow: int = 0):
    """Inputs with batch (and the sequence of `seq_inputs`) at least MIN_DYNAMIC_SIZE, plus `grow` (pure).

    `names` name the tensor leaves of (args, kwargs) in order, as the program's placeholders do.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))
    named = iter(names)
    out = []
    for t in leaves:
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            name = next(named, "")
            t = resize_dim(t, 0, max(t.shape[0], MIN_DYNAMIC_SIZE) + grow)
            if name in seq_inputs and t.dim() >= 2:
                t = resize_dim(t, 1, max(t.shape[1], MIN_DYNAMIC_SIZE) + grow)
        elif isinstance(t, torch.Tensor):
            next(named, "")
        out.append(t)
    wide_args, wide_kwargs = pytree.tree_unflatten(out, spec)
    return tuple(wide_args), dict(wide_kwargs)
