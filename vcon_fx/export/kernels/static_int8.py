"""Static int8: convolutions and matmuls run as onnxruntime's integer kernels, with fixed activation scales.

Where every activation around a layer has a scale (learned by `quant --act-bits 8` while
fine-tuning, or calibrated), the file holds the QDQ pattern onnxruntime fuses:

    Q(x, s_x) → DQ → Conv(·, DQ(W_q, s_w), DQ(b_int32)) → Q(y, s_y)     → QLinearConv
    Q(x, s_x) → DQ → MatMul(·, DQ(W_q, s_w)) [→ + b]                    → MatMulIntegerToFloat
    DQ(a) + DQ(b) → Q, GlobalAveragePool, Concat, Sigmoid, Mul …         → QLinearAdd, QLinear…

uint8 activations and int8 per-channel weights (onnxruntime's x86 guidance; VNNI runs them
without saturation). Batch norms are folded first, ReLUs absorbed (`export/static_int8.py`).
Layers without scales stay weight-only. The outputs move by the activation rounding: the
check allows 5 % of the output range and shows the cosine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ...bench.worker import session_config
from ..layer_ranges import pop_ranges
from ..static_int8 import to_static_int8
from .registry import ACTIVATION_ROUNDING_NOTE, ACTIVATION_ROUNDING_RTOL, register_kernel

if TYPE_CHECKING:
    from ..quantize import CompressReport

__all__ = ["lower_to_static_int8"]


@register_kernel(
    name="static",
    bits=(8,),
    why_bits="runs QLinearConv / MatMulIntegerToFloat on INT8 weights: use bits=8",
    rtol=ACTIVATION_ROUNDING_RTOL,
    check_note=ACTIVATION_ROUNDING_NOTE,
    flag=None,
    flag_bits=8,
    flag_help="fixed activation scales: QLinearConv and integer matmuls (needs activation ranges)",
    conflict="the integer kernels take INT8 weights",
    session_options=session_config,  # QDQ fusion must stay on: session_config adds nothing for these files
)
def lower_to_static_int8(model, report: "CompressReport") -> None:
    """Rewrite the layers whose activations have scales into fusable QDQ (in place on `model`; noted in `report`)."""
    result = to_static_int8(model, pop_ranges(model))
    for name in result.integer:
        report.layer_kernels[name] = "static"
    report.static_layers = len(result.integer)
    if not result.integer:
        report.notes.append("static int8: no layer has the activation scales it needs (quantize with --act-bits 8 "
                            "and fine-tune, or pass calibration data): every layer stays weight-only")
        return
    sources = ", ".join(f"{count} {source}" for source, count in sorted(result.sources.items()))
    report.notes.append(f"static int8: {len(result.integer)} layer(s) run integer kernels; {result.batch_norms_folded} "
                        f"batch norm(s) folded, {result.relus_absorbed} ReLU(s) absorbed; activation scales: {sources}")
    if result.not_integer:
        reasons: dict[str, int] = {}
        for why in result.not_integer.values():
            reasons[why] = reasons.get(why, 0) + 1
        report.notes.append("static int8: stay weight-only: " + "; ".join(f"{n} ({why})" for why, n in reasons.items()))
