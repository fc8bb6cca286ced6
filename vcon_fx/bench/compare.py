"""Benchmark ONNX models with onnxruntime: latency, throughput, size and peak memory.

Each model is measured in its own fresh process (`bench/worker.py`), one after the other, so
peak memory is that model's alone and two models never compete for cores.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LoadError, UsageError, message_line

__all__ = ["bench_onnx", "BenchReport", "BenchRow", "validate_onnx"]

log = logging.getLogger(__name__)

_WORKER = Path(__file__).with_name("worker.py")


@dataclass(frozen=True)
class BenchRow:
    """One model's measurements (latencies in ms, memory in MiB)."""

    path: str
    size_bytes: int
    latency_ms_median: float
    latency_ms_p90: float
    throughput_per_s: float
    peak_mem_mb: float | None
    batch: int
    input_shapes: dict
    threads: int | None
    runs: int
    session_config: dict = field(default_factory=dict)  # onnxruntime config entries the session used

    def to_dict(self) -> dict:
        """JSON-able dict of the row."""
        return asdict(self)


@dataclass(frozen=True)
class BenchReport:
    """Rows (the model first, then `against`), and the model's ratios to `against`.

    `ratios` holds model / against for `size`, `latency` (median), `peak_mem`, and
    `speedup` = against latency / model latency (> 1: the model is faster). Empty without
    `against`.
    """

    rows: tuple[BenchRow, ...]
    against: str | None = None
    ratios: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-able dict, for `--json`."""
        return {"rows": [r.to_dict() for r in self.rows], "against": self.against, "ratios": dict(self.ratios)}


def bench_onnx(
    model_path: str | os.PathLike,
    *,
    against: str | os.PathLike | None = None,
    threads: int | None = None,
    batch: int = 1,
    seq: int | None = None,
    warmup: int = 5,
    runs: int = 50,
) -> BenchReport:
    """Measure `model_path` (and `against`, the dense model) with onnxruntime on CPU (pure).

    Inputs are synthetic, built from each model's input signature (see
    `worker.synthetic_feeds`): dynamic batch dims take `batch`, other dynamic dims `seq`.

    Args:
        model_path: the ONNX model to measure.
        against: a second ONNX model (usually the dense export) to compare with.
        threads: onnxruntime intra-op threads; None uses every core.
        batch: batch size of the synthetic inputs.
        seq: sequence length for dynamic non-batch dims (128 when None).
        warmup: untimed runs before timing.
        runs: timed runs.

    Returns:
        A BenchReport.

    Raises:
        LoadError: a file is missing, not ONNX, invalid, or onnxruntime cannot load or run it.
        UsageError: batch, seq, runs or threads out of range.

    Example:
        >>> bench_onnx("lowrank.onnx", against="dense.onnx").ratios["speedup"]  # doctest: +SKIP
        1.8
    """
    for name, value, low in (("batch", batch, 1), ("seq", seq, 1), ("runs", runs, 1), ("warmup", warmup, 0),
                              ("threads", threads, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise UsageError(f"bench {name} must be an integer ≥ {low}, got {value!r}")
    paths = [Path(model_path)] + ([Path(against)] if against is not None else [])
    for p in paths:
        validate_onnx(p)
    request = {"threads": threads, "batch": batch, "seq": seq, "warmup": warmup, "runs": runs}
    rows = tuple(_measure_in_subprocess(p, request) for p in paths)
    ratios = _ratios(rows[0], rows[1]) if len(rows) == 2 else {}
    return BenchReport(rows=rows, against=str(paths[1]) if len(rows) == 2 else None, ratios=ratios)


def validate_onnx(path: str | os.PathLike) -> Path:
    """Check that `path` is a readable, valid ONNX model, without loading its weights.

    Returns:
        The path.

    Raises:
        LoadError: missing, not a file, not ONNX, or rejected by `onnx.checker`.
    """
    import onnx

    p = Path(path)
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise LoadError(f"ONNX model {p} {what}: give the path of a .onnx file")
    try:
        onnx.load(str(p), load_external_data=False)
    except Exception as e:
        raise LoadError(f"{p} is not an ONNX model ({type(e).__name__}: {message_line(e)}): export one with `vcon-fx export`") from None
    try:
        # the path form also checks external data and models over 2 GB
        onnx.checker.check_model(str(p))
    except Exception as e:
        raise LoadError(f"{p} is not a valid ONNX model ({message_line(e)}): re-export it with `vcon-fx export`") from None
    return p


def _measure_in_subprocess(path: Path, request: dict) -> BenchRow:
    # Run the file by path, not `-m vcon_fx.bench.worker`: importing the package would load
    # torch into the worker and its memory into the peak. runpy, not `python FILE`, so the
    # package folder is not put first on sys.path, where its modules could shadow others.
    cmd = [sys.executable, "-c", "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__')",
           str(_WORKER), json.dumps({"path": str(path), **request})]
    log.debug("benchmarking %s: %s", path, cmd)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    reply = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode != 0 or not reply:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise LoadError(f"onnxruntime could not run {path}: the benchmark process failed ({tail[0]}): "
                        "check the file with `vcon-fx bench` on a smaller batch, or re-export it")
    result = json.loads(reply[0])
    if "error" in result:
        raise LoadError(f"onnxruntime could not load or run {path}: {result['error']}: re-export it, "
                        "or check that onnxruntime supports its opset and ops")
    log.info("%s: median %.3f ms, p90 %.3f ms", path, result["latency_ms_median"], result["latency_ms_p90"])
    return BenchRow(**result)


def _ratios(model: BenchRow, ref: BenchRow) -> dict:
    def ratio(a, b):
        return a / b if a is not None and b else None

    return {
        "size": ratio(model.size_bytes, ref.size_bytes),
        "latency": ratio(model.latency_ms_median, ref.latency_ms_median),
        "speedup": ratio(ref.latency_ms_median, model.latency_ms_median),
        "peak_mem": ratio(model.peak_mem_mb, ref.peak_mem_mb),
    }
