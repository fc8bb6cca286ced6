"""Auto kernel choice: the fastest kernels whose onnxruntime outputs stay within the check's tolerance.

Each choice (`integer.AUTO_CHOICES`, fastest first) is stored in a temporary file and run in
onnxruntime against PyTorch on one batch (the first calibration batch when given, else the
example inputs); the first within tolerance is kept. A choice that makes no layer faster than
weight-only is skipped unchecked. A dynamic choice that fails is retried with its worst layers
left weight-only (`auto_layers.py`) before the next choice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Sequence

from torch import nn

from .auto_layers import fewest_kept, rank_by_activation_rounding
from .check import check_onnx
from .kernels import get_kernel
from .quantize import compress_onnx_weights
from .static_inputs import calibration_feeds

__all__ = ["first_faithful", "storage_bits"]


def storage_bits(choice: tuple[str, ...], bits: int | None) -> int:
    """The width to store a choice's weights in (pure): INT8 wherever an integer kernel runs."""
    if bits is not None:
        return bits
    first = get_kernel(choice[0])  # weight-only: its flag's width; a kernel that stores no INT8 (MatMulNBits): its own
    return first.flag_bits if choice == ("weight-only",) or 8 not in first.bits else 8


def first_faithful(model: nn.Module, exported: Path, folder: Path, choices: Sequence[tuple[str, ...]],
                   bits: int | None, check_batch: tuple[tuple, dict], step: Callable[[str], ContextManager],
                   described_as: str) -> tuple[tuple[str, ...], list[str], dict]:
    """(the first choice whose file passes the check, notes on the ones dropped, its kernel options) (pure: writes only in `folder`).

    Args:
        model: the PyTorch model, the reference.
        exported: its float ONNX export (ranges attached for the static kernel).
        folder: where the candidate files go.
        choices: kernel chains, fastest first; the last is kept unchecked.
        bits: the storage width, or None (`storage_bits`).
        check_batch: (args, kwargs) to compare onnxruntime with PyTorch on.
        step: the progress callback of `integer_export`.
        described_as: how errors name the model.
    """
    notes = []
    for index, choice in enumerate(choices):
        if index == len(choices) - 1:
            return choice, notes, {}
        names = " + ".join(choice)
        rtol = max(get_kernel(name).rtol for name in choice)

        def worst_of(options: dict, tag: str) -> float | None:
            """The file's worst output difference, or None when the choice made no layer faster."""
            candidate = folder / f"candidate{index}{tag}.onnx"
            report = compress_onnx_weights(exported, candidate, bits=storage_bits(choice, bits), kernel=choice,
                                           require_integers=True, force=True, described_as=described_as,
                                           kernel_options=options)
            if not report.layer_kernels:
                return None
            parity = check_onnx(model, candidate, check_batch[0], example_kwargs=check_batch[1], rtol=rtol, runs=1)
            return max((o.rel_max_diff for o in parity.outputs), default=0.0)

        with step(f"checking {names} in onnxruntime…"):
            worst = worst_of({}, "")
        if worst is None:
            continue
        if worst <= rtol:
            notes.append(f"auto: {names} kept: onnxruntime within {worst:.2%} of PyTorch's output range "
                         f"(tolerance {rtol:.0%})")
            return choice, notes, {}
        notes.append(f"auto: {names} moved the outputs by {worst:.2%} of their range (> {rtol:.0%})")
        if choice[-1] == "dynamic":
            with step("finding the layers the dynamic kernel moves most…"):
                kept = _narrowed(model, exported, folder, bits, check_batch, described_as,
                                 lambda keep: (worst_of({"keep_weight_only": keep}, f"_{len(keep)}") or 0.0) <= rtol)
            if kept:
                notes.append(f"auto: {names} kept with {len(kept)} matmul(s) weight-only, those whose inputs one "
                             f"uint8 rounding moves most: {', '.join(sorted(kept)[:4])}{', …' if len(kept) > 4 else ''}")
                return choice, notes, {"keep_weight_only": kept}
        notes.append(f"auto: trying {' + '.join(choices[index + 1])}")
    return choices[-1], notes, {}


def _narrowed(model, exported: Path, folder: Path, bits, check_batch, described_as: str, passes) -> frozenset | None:
    """The fewest worst-ranked matmuls to leave weight-only for the dynamic file to pass, or None."""
    weight_only = folder / "ranking.onnx"
    compress_onnx_weights(exported, weight_only, bits=storage_bits(("weight-only",), bits) if bits else 8,
                          kernel=("weight-only",), require_integers=True, force=True, described_as=described_as)
    ranked = rank_by_activation_rounding(weight_only, calibration_feeds(model, [check_batch])[0])
    return fewest_kept(ranked, passes)
