"""Helpers shared by the benchmark scripts (deploy, transition, toolspeed).

The machine these numbers come from is shared and noisy, so every speed claim is a *ratio*
against a baseline measured in the same process, interleaved round by round: a slow spell in
the background then slows the baseline and the candidate alike. Each ratio is the median over
rounds of (candidate median / baseline median) within the round, with the spread (min..max).
"""

from __future__ import annotations

import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

__all__ = [
    "machine",
    "machine_line",
    "interleave",
    "ratio_of",
    "fmt_ratio",
    "markdown_table",
    "write_text_atomic",
    "ort_session",
    "ort_op_profiles",
    "GEMM_OPS",
    "peak_rss_mb",
    "cosine",
    "command_line",
]

# Ops whose time is matrix multiplication (the part FLOP counts describe).
GEMM_OPS = frozenset({
    "MatMul", "Gemm", "FusedGemm", "FusedMatMul", "Conv", "FusedConv", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "QLinearMatMul", "QLinearConv", "ConvInteger", "MatMulNBits", "QGemm",
    "NchwcConv", "Attention", "MatMulFpQ4",
})


def machine() -> dict:
    """CPU, cores, load and library versions: printed beside every result."""
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 1)
    except OSError:
        pass
    try:
        info["mem_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    for mod in ("torch", "onnxruntime", "onnx", "transformers", "torchvision"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library is reported, not fatal
            info[mod] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def machine_line(info: dict | None = None) -> str:
    info = info or machine()
    parts = [f"{info['cpu']}, {info['cores']} cores"]
    if "mem_gib" in info:
        parts.append(f"{info['mem_gib']} GiB")
    if "gpu" in info:
        parts.append(f"GPU {info['gpu']}")
    if "load_avg_1m" in info:
        parts.append(f"load average {info['load_avg_1m']} at start (shared machine)")
    parts.append(", ".join(f"{k} {info[k]}" for k in ("torch", "onnxruntime", "onnx", "transformers") if info.get(k)))
    return "; ".join(parts)


def command_line() -> str:
    argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(Path.cwd()))
    except ValueError:
        pass
    return "python " + " ".join(argv)


def interleave(fns: dict[str, Callable[[], object]], *, rounds: int = 5, iters: int = 3, warmup: int = 1,
               budget_s: float | None = None) -> dict[str, list[float]]:
    """Time every callable round by round (A B C, A B C, ...): name → per-round median seconds.

    Within a round each callable runs `iters` times; the round's value is their median. The
    order is rotated every round so no callable always runs right after another. `budget_s`
    stops early (after at least 2 rounds) when the time is spent.
    """
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    out: dict[str, list[float]] = {n: [] for n in names}
    start = time.perf_counter()
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times = []
            for _ in range(iters):
                t = time.perf_counter()
                fns[name]()
                times.append(time.perf_counter() - t)
            out[name].append(statistics.median(times))
        if budget_s is not None and r >= 1 and time.perf_counter() - start > budget_s:
            break
    return out


def ratio_of(times: dict[str, list[float]], name: str, base: str) -> dict:
    """Per-round ratios name/base: median, min, max, and both medians in ms."""
    ratios = [a / b for a, b in zip(times[name], times[base])]
    return {"ratio": statistics.median(ratios), "lo": min(ratios), "hi": max(ratios), "rounds": len(ratios),
            "ms": 1e3 * statistics.median(times[name]), "base_ms": 1e3 * statistics.median(times[base])}


def fmt_ratio(r: dict | None, digits: int = 2) -> str:
    if not r:
        return "—"
    return f"{r['ratio']:.{digits}f} ({r['lo']:.{digits}f}–{r['hi']:.{digits}f})"


def markdown_table(headers: list[str], rows: Iterable[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join("" if c is None else str(c) for c in row) + " |")
    return "\n".join(lines)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; a results table is for everyone
    os.replace(tmp, path)
    return path


def ort_session(path: str | os.PathLike, threads: int = 1, *, profile_prefix: str | None = None,
                optimized_path: str | None = None, options: dict | None = None):
    """An onnxruntime CPU session with `threads` intra-op threads (ORT_ENABLE_ALL, the default)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
    for key, value in (options or {}).items():
        so.add_session_config_entry(key, str(value))
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def ort_op_profiles(models: dict[str, tuple], feeds: dict, *, threads: int = 1, runs: int = 3,
                    workdir: str) -> dict[str, dict]:
    """Time per op type from onnxruntime's own profiler for several models, runs interleaved.

    Args:
        models: label → (path, session config entries or None).
        runs: profiled runs per model, taken round by round (A B C, A B C, …) so a slow spell
            on a shared machine hits every model alike; each node's time is its median over the
            runs (a first, allocating run is left out), summed per op type.

    Returns:
        label → {"by_op": {op: ms per run}, "total_ms", "gemm_ms", "ops": {op: count after
        onnxruntime's graph optimizations}}.
    """
    import onnx

    sessions, opts = {}, {}
    for i, (label, (path, options)) in enumerate(models.items()):
        prefix = os.path.join(workdir, f"prof{i}_")
        opts[label] = os.path.join(workdir, f"prof{i}.opt.onnx")
        sessions[label] = ort_session(path, threads, profile_prefix=prefix, optimized_path=opts[label],
                                      options=options)
        sessions[label].run(None, feeds)  # the allocating run
    for _ in range(runs):
        for sess in sessions.values():
            sess.run(None, feeds)
    out = {}
    for label, sess in sessions.items():
        prof_file = sess.end_profiling()
        events = json.loads(Path(prof_file).read_text())
        os.remove(prof_file)
        windows = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                         if e.get("cat") == "Session" and e.get("name") == "model_run")[1:]
        # per node, the median over runs: on a shared machine a preemption (several ms) lands on
        # some node in most runs, and a per-node median drops it where a per-run sum cannot
        per_node: dict[str, list[float]] = collections.defaultdict(list)
        op_of: dict[str, str] = {}
        for e in events:
            if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
                continue
            if any(lo <= e["ts"] <= hi for lo, hi in windows):
                per_node[e["name"]].append(e["dur"] / 1e3)
                op_of[e["name"]] = e.get("args", {}).get("op_name", "?")
        by_op: dict[str, float] = collections.defaultdict(float)
        for node, durs in per_node.items():
            by_op[op_of[node]] += statistics.median(durs)
        ops = collections.Counter(n.op_type for n in onnx.load(opts[label], load_external_data=False).graph.node)
        for p in (Path(opts[label]), Path(opts[label] + ".data")):
            if p.exists():
                p.unlink()
        out[label] = {"by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])), "total_ms": sum(by_op.values()),
                      "gemm_ms": sum(v for k, v in by_op.items() if k in GEMM_OPS), "ops": dict(ops)}
    return out


def peak_rss_mb() -> float | None:
    """This process's resident-memory high-water mark (VmHWM), MiB (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened per sample then averaged over the batch."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a.reshape(a.shape[0], -1) if a.ndim > 1 else a[None]
    b = b.reshape(b.shape[0], -1) if b.ndim > 1 else b[None]
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-30)))
