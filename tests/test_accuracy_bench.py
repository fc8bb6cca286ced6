"""benchmarks/accuracy.py: the grid, the GMP schedule, honest verdicts, and a --tiny run end to end."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "accuracy.py"


def _load_script():
    """benchmarks/accuracy.py as a module (registered, as dataclasses need)."""
    name = "vcon_fx_accuracy_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="module")
def bench():
    return _load_script()


def test_cubic_sparsity_follows_zhu_and_gupta(bench):
    s = [bench.cubic_sparsity(t, 0.9, 100) for t in range(0, 131)]
    assert s[0] == 0.0 and s[100] == pytest.approx(0.9) and s[130] == 0.9
    assert all(a <= b for a, b in zip(s, s[1:]))                    # never un-prunes
    assert s[50] == pytest.approx(0.9 * (1 - 0.5 ** 3))              # s_f·(1 − (1 − t/T)³)
    assert bench.cubic_sparsity(0, 0.9, 0) == 0.9                    # T = 0: one-shot


def test_full_grid_covers_the_issue(bench):
    grid = bench.build_grid(bench.FULL)
    assert len({r.id for r in grid}) == len(grid)
    assert len(bench.FULL.seeds) >= 3
    methods = {r.method for r in grid}
    assert {"lowrank", "prune", "quant"} <= methods
    assert {r.schedule for r in grid if r.kind == "vcon"} >= {"linear", "cosine", "exp", "staggered"}
    assert {r.q for r in grid if r.kind == "vcon"} >= {0.1, 0.2, 0.5}
    assert {r.method for r in grid if r.kind == "gmp"} == {"prune"}
    # every VCON and GMP run has its abrupt baseline with the same seed and strength
    abrupt = {(r.seed, r.method, r.strength) for r in grid if r.kind == "abrupt"}
    assert all((r.seed, r.method, r.strength) in abrupt for r in grid)


def test_verdict_says_when_vcon_does_not_win(bench):
    assert "VCON wins" in bench.verdict([1.0, 0.5, 2.0])
    assert "does not win" in bench.verdict([-1.0, -0.5, 0.3])
    assert "not a clear win" in bench.verdict([3.0, -0.5, 0.3])
    assert "does not win" in bench.verdict([-0.3])


def test_tiny_run_writes_the_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (tmp_path / "ACCURACY.md").read_text()
    assert "benchmarks/accuracy.py --tiny --out" in md                # the exact command
    assert "Machine:" in md and "cores" in md
    for section in ("## 1. Compression strength", "## 2. Schedules", "## 3. Transition length"):
        assert section in md
    assert "GMP" in md and "verdict" in md
    data = json.loads((tmp_path / "accuracy_results.json").read_text())
    module = _load_script()
    assert set(data["runs"]) == {r.id for r in module.build_grid(module.TINY)}
    for run in data["runs"].values():
        assert 0.0 <= run["accuracy"] <= 1.0
    gmp = [r for r in data["runs"].values() if r["kind"] == "gmp"]
    assert gmp and all(r["method"] == "prune" for r in gmp)
