"""benchmarks/int8.py runs end to end in --tiny mode, so the INT8.md it makes cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.slow
def test_int8_benchmark_runs_tiny(tmp_path: Path):
    out, temp = tmp_path / "INT8.md", tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(BENCH / "int8.py"), "--tiny", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for expected in ("# Static int8", "vcon static / quantize_static", "QLinearConv", "onnxruntime quantize_static",
                     "vcon-fx static int8, VCON", "## Goals"):
        assert expected in text, f"INT8.md lacks {expected!r}:\n{text[:2000]}"
    assert not [p for p in temp.rglob("*") if p.suffix in (".onnx", ".data")], "the benchmark left ONNX files behind"
