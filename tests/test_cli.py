"""The CLI's happy path: each command as a subprocess on files in a temporary folder.

inspect → transform → finetune → vanish → export --check → bench, on a small `.pt2` model;
exit codes, the files each step writes, and what the output says are checked.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from vcon_fx.errors import CaptureError, OutputExistsError, StageError, UsageError
from vcon_fx.io.artifact import read_recipe


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 64)
        self.mid1 = nn.Linear(64, 64)
        self.mid2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        return self.head(torch.relu(self.mid2(torch.relu(self.mid1(torch.relu(self.stem(x)))))))


def vcon(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vcon_fx", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    x = torch.randn(2, 16)
    ep = torch.export.export(Net().eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, folder / "net.pt2")
    rng = np.random.default_rng(0)
    np.savez(folder / "train.npz", inputs=rng.standard_normal((64, 16)).astype("float32"),
             labels=rng.integers(0, 4, 64))
    return folder


def test_the_whole_pipeline_from_the_command_line(workdir):
    r = vcon("inspect", "net.pt2", "--method", "lowrank", "--rank", "8", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "mid1" in r.stdout and "stem" in r.stdout  # the stem is listed as left dense

    r = vcon("inspect", "net.pt2", "--method", "lowrank", "--rank", "8", "--json", cwd=workdir)
    plan = json.loads(r.stdout)
    assert set(plan["layers"]) == {"mid1", "mid2"} and plan["params_after"] < plan["params_before"]

    r = vcon("transform", "net.pt2", "--method", "lowrank", "--rank", "8", "-o", "net.vcon", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "capture path" in r.stdout and (workdir / "net.vcon" / "model.safetensors").is_file()
    assert read_recipe(workdir / "net.vcon").stage == "blended"

    r = vcon("vanish", "net.vcon", "-o", "early.small", cwd=workdir)
    assert r.returncode == StageError.exit_code and not (workdir / "early.small").exists()  # β is still 1

    r = vcon("finetune", "net.vcon", "--data", "train.npz", "--steps", "10", "--transition", "5",
             "--batch-size", "16", "-o", "net.tuned", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert (workdir / "net.tuned").is_dir()

    r = vcon("vanish", "net.tuned", "-o", "net.small", cwd=workdir)
    assert r.returncode == 0, r.stderr
    size = lambda p: sum(f.stat().st_size for f in (workdir / p).iterdir())
    assert size("net.small") < size("net.tuned")

    r = vcon("export", "net.tuned", "--onnx", "blended.onnx", cwd=workdir)
    assert r.returncode == StageError.exit_code and not (workdir / "blended.onnx").exists()  # still has its dense branch

    r = vcon("export", "net.small", "--onnx", "net.onnx", "--check", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "onnxruntime vs PyTorch" in r.stdout and "dense" in r.stdout

    r = vcon("export", "net.pt2", "--onnx", "dense.onnx", cwd=workdir)
    assert r.returncode == 0, r.stderr

    r = vcon("bench", "net.onnx", "--against", "dense.onnx", "--runs", "5", "--json", cwd=workdir)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert len(report["rows"]) == 2 and report["ratios"]["size"] < 1

    r = vcon("transform", "net.pt2", "--method", "lowrank", "--rank", "8", "-o", "net.vcon", cwd=workdir)
    assert r.returncode == OutputExistsError.exit_code  # no --force


def test_quantized_export_with_integer_kernels(workdir):
    r = vcon("transform", "net.pt2", "--method", "quant", "--bits", "4", "-o", "q.vcon", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = vcon("finetune", "q.vcon", "--data", "train.npz", "--steps", "6", "--transition", "3",
             "--batch-size", "16", "-o", "q.tuned", cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = vcon("vanish", "q.tuned", "-o", "q.small", cwd=workdir)
    assert r.returncode == 0, r.stderr

    r = vcon("export", "q.small", "--onnx", "q4.onnx", "--int4", "--check", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "INT4" in r.stdout or "int4" in r.stdout.lower()
    r = vcon("export", "q.small", "--onnx", "qdyn.onnx", "--dynamic-int8", "--check", cwd=workdir)
    assert r.returncode == 0, r.stderr
    assert "DynamicQuantizeMatMul" in r.stdout and "cosine" in r.stdout
    import onnx

    ops = {n.op_type for n in onnx.load(str(workdir / "qdyn.onnx")).graph.node}
    assert "DynamicQuantizeMatMul" in ops

    r = vcon("export", "q.small", "--onnx", "both.onnx", "--int4", "--dynamic-int8", cwd=workdir)
    assert r.returncode == UsageError.exit_code and "exclude each other" in r.stderr and not (workdir / "both.onnx").exists()


def test_activation_aware_transform_says_where_its_statistics_came_from(workdir):
    r = vcon("transform", "net.pt2", "--method", "lowrank", "--rank", "8", "--activation-aware", "-o", "aa.vcon",
             cwd=workdir)
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stdout.split())  # rich wraps long lines
    assert "activation_aware=True" in said and "synthetic example inputs" in said
    assert read_recipe(workdir / "aa.vcon").config.activation_aware


_UNTRACEABLE = """
import torch
from torch import nn


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = self.fc1(x)
        if h.sum().item() > 0:  # data-dependent control flow: neither tracer follows it
            return self.fc2(h.relu())
        return self.fc2(h)
"""


def test_inspect_reports_the_layers_of_a_model_no_tracer_captures(workdir):
    import importlib.util

    (workdir / "untraceable_net.py").write_text(_UNTRACEABLE)
    spec = importlib.util.spec_from_file_location("untraceable_net", workdir / "untraceable_net.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["untraceable_net"] = module
    try:
        spec.loader.exec_module(module)
        torch.save(module.Untraceable(), workdir / "untraceable.pt")
    finally:
        del sys.modules["untraceable_net"]
    r = vcon("inspect", "untraceable.pt", "--trust-pickle", "--input-shape", "2x8", cwd=workdir)
    assert r.returncode == CaptureError.exit_code, (r.returncode, r.stderr)
    assert "fc1" in r.stdout and "fc2" in r.stdout and "not captured" in r.stdout
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "if h.sum().item() > 0" in error[0]  # one line, naming the construct
    r = vcon("inspect", "untraceable.pt", "--trust-pickle", "--input-shape", "2x8", "--json", cwd=workdir)
    assert r.returncode == CaptureError.exit_code and json.loads(r.stdout)["layers_found"]["fc1"]["shape"] == [16, 8]


def test_python_dash_m_and_console_script_agree(workdir):
    r = vcon("--version", cwd=workdir)
    assert r.returncode == 0 and r.stdout.startswith("vcon-fx ")
