"""The benchmark scripts run end to end in --tiny mode, so they cannot rot.

Each script runs in its own process on a tiny model (1-2 timing rounds) and writes only its
--out file and temporary files under the test's tmp folder (TMPDIR points there); the
committed results tables in benchmarks/ are left untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# script → strings its tiny report must contain
EXPECTED = {
    "deploy.py": ["# Deployment benchmark", "| dense |", "low-rank rank 16", "int8 (quant bits=8)",
                  "DynamicQuantizeMatMul", "quantize_dynamic", "Targets:"],
    "transition.py": ["# Training cost over the transition", "blended, β = 0.5", "compressed only (vanished)",
                      "freeze_dense: dense params requires_grad=False, .grad is None: True", "peak MB"],
    "toolspeed.py": ["# Tool speed", "transform", "forward+backward", "truncated SVD", "vcon_fx.plan"],
    "llm.py": ["# A language model as people deploy it", "| vcon int4 (GPTQ, group 32, asymmetric) |", "| vcon low-rank 0.5 + int4 |",
               "| ort RTN asymmetric |", "| ort HQQ |", "peak RSS", "**Goal**"],
    "layers.py": ["# Layer types", "| r3d_18 |", "| gpt2_embedding_tied |", "4-bit (quant bits=4)", "### lstm_lm"],
}


REPORTS = ("DEPLOY.md", "TRANSITION.md", "TOOLSPEED.md", "LAYERS.md", "LLM.md")


def _snapshot(folder: Path) -> dict[str, float]:
    # only the scripts' own reports: other tools (the zoo sweep) may write into benchmarks/ meanwhile
    return {name: (folder / name).stat().st_mtime for name in REPORTS if (folder / name).exists()}


# The longest (~25 s each; llm.py ~2 min) run with the slow set, so `make test` stays well under 15 minutes.
SLOW_SCRIPTS = ("deploy.py", "layers.py", "llm.py")


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW_SCRIPTS else s
                                    for s in sorted(EXPECTED)])
def test_benchmark_script_runs_tiny(script: str, tmp_path: Path):
    out = tmp_path / "report.md"
    temp = tmp_path / "tmp"
    temp.mkdir()
    before = _snapshot(BENCH)
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONWARNINGS": "ignore", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / script), "--tiny", "--out", str(out)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{script} --tiny failed:\n{proc.stderr[-3000:]}"
    text = out.read_text()
    missing = [s for s in EXPECTED[script] if s not in text]
    assert not missing, f"{script} report lacks {missing}:\n{text[:3000]}"
    assert "FAILED:" not in text, text
    assert _snapshot(BENCH) == before, "a --tiny run rewrote a results table in benchmarks/"
    leftovers = [p.name for p in temp.rglob("*") if p.suffix in (".onnx", ".data", ".json")]
    assert not leftovers, f"{script} left files behind: {leftovers}"
