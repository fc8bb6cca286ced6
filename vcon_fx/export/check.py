"""Check an exported ONNX model against PyTorch: parity of every output, size and latency.

An output passes when max|onnx − torch| ≤ rtol·max(max|torch|, 1) + atol. Every output is
compared and every mismatch is reported together (as Hugging Face optimum's validation does).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..bench.compare import validate_onnx
from ..bench.worker import make_session, model_size_bytes, time_runs
from ..errors import LoadError, ParityError, UsageError, message_line
from .decoder_run import layout_of_session
from .seq2seq_run import seq2seq_layout_of_session
from .naming import flatten_inputs, flatten_outputs
from ..graph.modes import eval_mode
from .onnx import _as_args, run_model

__all__ = ["check_onnx", "CheckReport", "OutputParity", "FLOAT_RTOL"]

log = logging.getLogger(__name__)

_WARMUP = 3
# A float export differs from PyTorch by float rounding only; integer kernels declare their own.
FLOAT_RTOL = 1e-4


@dataclass(frozen=True)
class OutputParity:
    """How one ONNX output compares with PyTorch's.

    `allowed` is the bound max_abs_diff must not exceed; `problem` says why the output fails
    when the numbers alone don't (a shape mismatch, NaN).
    """

    name: str
    shape: tuple[int, ...]
    onnx_shape: tuple[int, ...]
    max_abs_diff: float
    rel_max_diff: float
    cosine: float
    allowed: float
    ok: bool
    problem: str | None = None

    def describe(self) -> str:
        """One line for error messages and logs."""
        if self.problem:
            return f"{self.name}: {self.problem}"
        return (f"{self.name}: max|Δ| {self.max_abs_diff:.3g} > allowed {self.allowed:.3g} "
                f"(relative {self.rel_max_diff:.3g}, cosine {self.cosine:.6f})")


@dataclass(frozen=True)
class CheckReport:
    """Parity of every output, plus size and median latency (and the reference's, with ratios).

    Ratios are model / reference: below 1 means smaller or faster.
    """

    onnx_path: str
    outputs: tuple[OutputParity, ...]
    rtol: float
    atol: float
    size_bytes: int
    latency_ms: float
    runs: int
    threads: int | None
    input_shapes: dict
    problems: tuple[str, ...] = ()
    reference_path: str | None = None
    reference_size_bytes: int | None = None
    reference_latency_ms: float | None = None
    size_ratio: float | None = None
    latency_ratio: float | None = None

    @property
    def ok(self) -> bool:
        """True when every output is within tolerance and nothing else is wrong."""
        return not self.problems and all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        """JSON-able dict (with `ok`), for `--json`."""
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def assert_ok(self) -> "CheckReport":
        """Return self when ok; otherwise raise one ParityError listing every mismatch.

        Raises:
            ParityError: an output differs beyond tolerance, has another shape or NaN, or the
                output counts differ.
        """
        if self.ok:
            return self
        bad = [*self.problems, *(o.describe() for o in self.outputs if not o.ok)]
        raise ParityError(
            f"onnxruntime disagrees with PyTorch on {self.onnx_path} (rtol {self.rtol:g}, atol {self.atol:g}; "
            f"inputs {self.input_shapes}): " + "; ".join(bad) + ". Fix: for a quantized model allow about two "
            "quantization steps (atol); otherwise re-export with another opset and compare again"
        )


def check_onnx(
    model: nn.Module,
    onnx_path: str | os.PathLike,
    example_inputs: tuple,
    *,
    rtol: float = FLOAT_RTOL,
    atol: float | None = None,
    example_kwargs: dict | None = None,
    reference_onnx: str | os.PathLike | None = None,
    runs: int = 20,
    threads: int | None = None,
) -> CheckReport:
    """Run the ONNX model in onnxruntime (CPU) and PyTorch on the same inputs; compare (pure).

    Any batch (and sequence) size works when the model was exported with dynamic axes, so
    passing inputs of another batch size than the export's also checks the dynamic axis. A
    KV-cache decoder file is checked by generation instead (`decoder_check.py`): the example
    `input_ids` are the prompt, 32 greedy tokens and the first step's logits are compared.

    Args:
        model: the PyTorch model the file was exported from (run in eval mode, flags restored).
        onnx_path: the exported .onnx file.
        example_inputs: positional inputs.
        rtol: tolerance relative to the output's largest magnitude (at least 1).
        atol: absolute tolerance added to it (quantized models: about two steps).
        example_kwargs: keyword inputs.
        reference_onnx: the dense model exported the same way, to compare size and latency.
        runs: timed runs for the median latency, after a few untimed ones.
        threads: onnxruntime intra-op threads; None uses every core.

    Returns:
        A CheckReport; call `.assert_ok()` to raise on a mismatch.

    Raises:
        LoadError: a file is missing or onnxruntime cannot load it.
        UsageError: the ONNX inputs do not match the example inputs, or bad tolerances.
        ParityError: onnxruntime cannot run the model on these inputs (e.g. a static batch).

    Example:
        >>> check_onnx(model, "m.onnx", (torch.randn(3, 4),)).assert_ok().latency_ms  # doctest: +SKIP
        0.02
    """
    if rtol < 0 or (atol is not None and atol < 0) or runs < 1:
        raise UsageError(f"check needs rtol ≥ 0, atol ≥ 0 and runs ≥ 1, got rtol={rtol}, atol={atol}, runs={runs}")
    atol = float(atol or 0.0)
    args, kwargs = _as_args(example_inputs, example_kwargs)
    session = _session(onnx_path, threads)
    if seq2seq_layout_of_session(session) is not None:  # an encoder-decoder pair: generation parity too
        from .seq2seq_check import check_seq2seq

        return check_seq2seq(model, session, onnx_path, args, kwargs, rtol=rtol, atol=atol,
                             reference_onnx=reference_onnx, runs=runs, threads=threads)
    if layout_of_session(session) is not None:  # a KV-cache decoder: generation parity (decoder_check.py)
        from .decoder_check import check_decoder

        return check_decoder(model, session, onnx_path, args, kwargs, rtol=rtol, atol=atol,
                             reference_onnx=reference_onnx, runs=runs, threads=threads)
    with eval_mode(model):
        expected = flatten_outputs(run_model(model, args, kwargs))
    inputs = [(n, t.detach().cpu().numpy()) for n, t in flatten_inputs(model, args, kwargs)]
    shapes = {n: list(a.shape) for n, a in inputs}

    feeds = _feeds(session, inputs, onnx_path)
    outputs, problems = _parity(session, feeds, expected, onnx_path, shapes, rtol, atol)
    latency = float(np.median(time_runs(session, feeds, warmup=_WARMUP, runs=runs)))
    size = model_size_bytes(onnx_path)

    ref = _against_reference(reference_onnx, inputs, threads, runs, size, latency) if reference_onnx is not None else {}
    report = CheckReport(onnx_path=str(onnx_path), outputs=outputs, rtol=rtol, atol=atol, size_bytes=size,
                         latency_ms=latency, runs=runs, threads=threads, input_shapes=shapes, problems=problems, **ref)
    log.info("checked %s: %s, worst max|Δ| %.3g, median %.3f ms", onnx_path, "ok" if report.ok else "MISMATCH",
             max((o.max_abs_diff for o in outputs), default=0.0), latency)
    return report


def _parity(session, feeds: dict, expected: list, onnx_path, shapes: dict, rtol: float, atol: float):
    """Run the session once; (each output's OutputParity, problems beyond the numbers)."""
    try:
        got = session.run(None, feeds)
    except Exception as e:
        raise ParityError(f"onnxruntime could not run {onnx_path} on inputs {shapes}: {message_line(e)}. Fix: "
                          "export with dynamic axes (the default) when these sizes differ from the export's") from None
    names = [o.name for o in session.get_outputs()]
    problems = ()
    if len(got) != len(expected):
        problems = (f"ONNX has {len(got)} outputs {names}, PyTorch {len(expected)} "
                    f"{[n for n, _ in expected]}",)
    return tuple(_compare(name, g, t, rtol, atol) for name, g, (_, t) in zip(names, got, expected)), problems


def _against_reference(reference_onnx, inputs, threads, runs: int, size: int, latency: float) -> dict:
    """The reference's size and median latency, and the model's ratios to them (CheckReport fields)."""
    ref_session = _session(reference_onnx, threads)
    ref_feeds = _feeds(ref_session, inputs, reference_onnx)
    ref_latency = float(np.median(time_runs(ref_session, ref_feeds, warmup=_WARMUP, runs=runs)))
    ref_size = model_size_bytes(reference_onnx)
    return dict(reference_path=str(reference_onnx), reference_size_bytes=ref_size, reference_latency_ms=ref_latency,
                size_ratio=size / ref_size, latency_ratio=latency / ref_latency if ref_latency > 0 else None)


def _session(path, threads):
    validate_onnx(path)
    try:
        return make_session(path, threads)
    except Exception as e:  # onnxruntime's errors are untyped
        raise LoadError(f"onnxruntime cannot load {path}: {message_line(e)}: re-export it, or check that "
                        "onnxruntime supports its opset and ops") from None


def _feeds(session, inputs: list[tuple[str, np.ndarray]], path) -> dict:
    """Match the example tensors to the session's inputs: by name, else by position."""
    wanted = [i.name for i in session.get_inputs()]
    ours = dict(inputs)
    if all(n in ours for n in wanted):
        return {n: ours[n] for n in wanted}
    if len(wanted) == len(inputs):  # exported elsewhere, with other names: the order still holds
        return {n: a for n, (_, a) in zip(wanted, inputs)}
    raise UsageError(f"{path} takes inputs {wanted}, the example inputs give {list(ours)}: "
                     "pass the inputs the model was exported with")


def _compare(name: str, got: np.ndarray, ref: torch.Tensor, rtol: float, atol: float) -> OutputParity:
    # float64 so the comparison adds no rounding of its own
    b = ref.detach().cpu().to(torch.float64).numpy() if ref.dtype != torch.bool else ref.cpu().numpy().astype(np.float64)
    a = np.asarray(got).astype(np.float64)
    scale = float(np.abs(b).max()) if b.size else 0.0
    allowed = rtol * max(scale, 1.0) + atol
    if a.shape != b.shape:
        return OutputParity(name, b.shape, a.shape, float("inf"), float("inf"), 0.0, allowed, False,
                            f"shape {a.shape} in ONNX, {b.shape} in PyTorch")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    problem = "NaN in the ONNX or PyTorch output" if np.isnan(diff) else None
    ok = problem is None and diff <= allowed
    return OutputParity(name, tuple(b.shape), tuple(a.shape), diff, rel, cosine, allowed, ok, problem)
