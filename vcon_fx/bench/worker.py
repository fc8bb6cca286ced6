"""Measure one ONNX model with onnxruntime, alone in a fresh process; also the shared helpers.

Peak memory is a per-process high-water mark, so each model is measured in its own process:
`bench.py` runs this file by path with a JSON request as the last argument; it answers with
one JSON line on stdout (the only printing in the library: it is the reply).
It imports only numpy, onnx and onnxruntime (never torch, never the vcon_fx package), so the
numbers are onnxruntime's own. `check.py` and `bench.py` import the helpers below.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["model_size_bytes", "make_session", "session_config", "is_static_int8", "synthetic_feeds", "time_runs", "measure", "main"]

# onnxruntime type strings -> numpy dtypes, for the input kinds models take
_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}
DEFAULT_SEQ = 128


def model_size_bytes(path: str | os.PathLike) -> int:
    """Size of an ONNX model on disk: the file plus every external data file it references.

    Args:
        path: the .onnx file.

    Returns:
        Bytes.
    """
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    extra = sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).exists())
    return path.stat().st_size + extra


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def session_config(path: str | os.PathLike) -> dict[str, str]:
    """onnxruntime session config entries that let this model run at the speed its weights allow.

    Weight-only integer convolutions (DequantizeLinear on an initializer → Conv): onnxruntime has
    no kernel that takes int8 weights with float activations for Conv, so by default it
    dequantizes every weight on every run and cannot fold the BatchNormalization that follows
    (measured: slower than the float model, benchmarks/DEPLOY.md). `session.disable_quant_qdq=1`
    makes it constant-fold those DequantizeLinear at load instead: float speed, the file stays
    small. Deploy such a model with the same entry. A static int8 file (a convolution whose output
    is quantized: QLinearConv) gets no entry: its integer kernels come from the very QDQ fusion
    that entry turns off. Other models get no entries.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if is_static_int8(graph):
        return {}
    if _weight_only_convs(graph):
        return {"session.disable_quant_qdq": "1"}
    return {}


def _weight_only_convs(graph) -> set[str]:
    constants = {i.name for i in graph.initializer}
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants}
    return {n.output[0] for n in graph.node if n.op_type == "Conv" and len(n.input) > 1 and n.input[1] in dequantized}


def is_static_int8(graph) -> bool:
    """True when a GraphProto holds static int8 kernels: a convolution with integer weights whose output is
    quantized (onnxruntime fuses it into QLinearConv), or a MatMulIntegerToFloat fed by a QuantizeLinear."""
    convs = _weight_only_convs(graph)
    quantized = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    return any((n.op_type == "QuantizeLinear" and n.input[0] in convs)
               or (n.op_type == "MatMulIntegerToFloat" and n.input and n.input[0] in quantized) for n in graph.node)


def make_session(path: str | os.PathLike, threads: int | None = None, config: dict[str, str] | None = None):
    """Open an onnxruntime CPU session (raises onnxruntime's own error on a bad file).

    Args:
        path: the .onnx file.
        threads: intra-op threads; None lets onnxruntime use every core.
        config: session config entries; None applies `session_config(path)`.

    Returns:
        An `onnxruntime.InferenceSession` on CPUExecutionProvider.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    for key, value in (session_config(path) if config is None else config).items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def synthetic_feeds(session, batch: int = 1, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for `session` built from its input signature.

    Float inputs are random normal; `*ids` inputs random token ids in [0, 100) (token type ids
    zeros, position ids 0..seq-1); masks and other integers ones. A dynamic dim 0 (or one
    named "batch") takes `batch`, a KV cache's "past_seq" 0 (a decoder's prompt step), any
    other dynamic dim `seq` (128 when None).

    Args:
        session: an onnxruntime session.
        batch: size for batch dims.
        seq: size for sequence (other dynamic) dims.
        seed: random seed, so runs are repeatable.

    Returns:
        Input name -> array.
    """
    rng = np.random.default_rng(seed)
    seq = DEFAULT_SEQ if seq is None else seq
    feeds = {}
    for arg in session.get_inputs():
        shape = []
        for axis, dim in enumerate(arg.shape):
            if isinstance(dim, int) and dim >= 0:
                shape.append(dim)
            else:
                shape.append(batch if axis == 0 or dim == "batch" else 0 if dim == "past_seq" else seq)
        dtype = _NP_TYPES.get(arg.type)
        if dtype is None:
            raise TypeError(f"input {arg.name!r} has type {arg.type}, which the benchmark cannot fill")
        feeds[arg.name] = _fill(arg.name.lower(), tuple(shape), dtype, rng)
    return feeds


def _fill(name: str, shape: tuple, dtype, rng) -> np.ndarray:
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if dtype is np.bool_ or "mask" in name:
        return np.ones(shape, dtype=dtype)
    if "token_type" in name:
        return np.zeros(shape, dtype=dtype)  # only 0..1 are valid token types
    if "position" in name and len(shape) >= 1:
        return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
    if "ids" in name:
        return rng.integers(0, 100, size=shape).astype(dtype)
    return np.ones(shape, dtype=dtype)


def time_runs(session, feeds: dict, warmup: int = 5, runs: int = 50) -> list[float]:
    """Run `session` `warmup` times untimed, then `runs` times timed.

    Returns:
        Each timed run's wall time in milliseconds.
    """
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(max(runs, 1)):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure(path: str, *, threads: int | None = None, batch: int = 1, seq: int | None = None,
            warmup: int = 5, runs: int = 50) -> dict:
    """Measure one model in this process: latency, throughput, size and peak memory.

    Peak memory is the rise of this process's RSS high-water mark over its level just before
    the session is built (the mark is reset first where Linux allows, so imports don't count).

    Returns:
        A JSON-able dict; on a model onnxruntime cannot load or run, `{"error": "..."}`.
    """
    import onnxruntime  # noqa: F401  loaded before the mark is reset: the library is not the model

    _reset_peak_rss()
    base = _rss_kb("VmRSS")
    try:
        config = session_config(path)
        session = make_session(path, threads, config)
        feeds = synthetic_feeds(session, batch=batch, seq=seq)
        times = time_runs(session, feeds, warmup=warmup, runs=runs)
    except Exception as e:  # onnxruntime raises its own untyped errors; report one line
        return {"error": f"{type(e).__name__}: {_one_line(e)}"}
    peak = _rss_kb("VmHWM")
    median = float(np.median(times))
    return {
        "path": str(path),
        "size_bytes": model_size_bytes(path),
        "latency_ms_median": median,
        "latency_ms_p90": float(np.percentile(times, 90)),
        "throughput_per_s": batch * 1e3 / median if median > 0 else float("inf"),
        "peak_mem_mb": (peak - base) / 1024 if peak is not None and base is not None else None,
        "batch": batch,
        "input_shapes": {k: list(v.shape) for k, v in feeds.items()},
        "threads": threads,
        "runs": runs,
        "session_config": config,
    }


def _one_line(e: BaseException) -> str:
    # errors.message_line, repeated: this file runs by path in a bare process that must not import vcon_fx (torch)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux ≥ 4.0).
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point: measure the model the JSON request names; reply with one JSON line."""
    request = json.loads((argv if argv is not None else sys.argv)[-1])
    result = measure(request.pop("path"), **request)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
