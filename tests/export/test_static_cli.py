"""`vcon-fx export` on a quantized CNN with default flags: the fastest faithful kernels, said per group.

A small CNN (batch norm, residual add, pooling) is taken through transform → finetune → vanish
on the command line, as a user would: with `--act-bits 8` the default export runs static int8
(QLinearConv in onnxruntime's graph); `--kernel weight-only` forces the float-speed kernel;
without activation scales the export calibrates on the data it is given, else on the data the
model was fine-tuned on, and says which; with neither `--kernel static` is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vcon_fx.cli.main import main
from vcon_fx.errors import UsageError
from vcon_fx.export.islands import kernel_counts, optimized_graph


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn0(self.stem(x))), 2)
        x = F.relu(x + self.bn1(self.c1(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def vcon(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in argv])
    return code, " ".join(out.getvalue().split())  # rich wraps long lines


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("static_cli")
    torch.manual_seed(0)
    ep = torch.export.export(SmallCNN().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, root / "cnn.pt2")
    rng = np.random.default_rng(0)
    np.savez(root / "train.npz", inputs=rng.standard_normal((80, 3, 8, 8)).astype("float32"),
             labels=rng.integers(0, 3, 80))
    for name, act in (("act", ["--act-bits", "8"]), ("plain", [])):
        for argv in (["transform", root / "cnn.pt2", "--method", "quant", "--bits", "8", *act, "--include-stem",
                      "--include-head", "-o", root / f"{name}.vcon"],
                     ["finetune", root / f"{name}.vcon", "--data", root / "train.npz", "--steps", "6", "--transition",
                      "3", "--batch-size", "16", "-o", root / f"{name}.tuned"],
                     ["vanish", root / f"{name}.tuned", "-o", root / f"{name}.small"]):
            code, said = vcon(*argv)
            assert code == 0, said
    return root


def test_default_export_runs_static_int8_and_says_which_kernel_each_group_got(folder):
    code, said = vcon("export", folder / "act.small", "--onnx", folder / "auto.onnx", "--check")
    assert code == 0, said
    assert "kernels: static: stem static: c1 static: head" in said, said
    assert "deploy: onnxruntime's default session options" in said and "no float island" in said
    counts = kernel_counts(optimized_graph(folder / "auto.onnx"))
    assert counts.get("QLinearConv") == 2 and counts.get("MatMulIntegerToFloat") == 1, counts

    code, said = vcon("export", folder / "act.small", "--onnx", folder / "wo.onnx", "--kernel", "weight-only")
    assert code == 0, said
    assert "weight-only: stem" in said and "session.disable_quant_qdq=1" in said
    assert "QLinearConv" not in kernel_counts(optimized_graph(folder / "wo.onnx"))


def test_static_without_learned_scales_calibrates_on_the_data_given_and_says_so(folder):
    code, said = vcon("export", folder / "plain.small", "--onnx", folder / "cal.onnx", "--kernel", "static",
                      "--calibration-data", folder / "train.npz")
    assert code == 0, said
    assert "learned no activation scales" in said and "calibrated on the first 64 example(s) of the calibration data" \
        in said
    assert kernel_counts(optimized_graph(folder / "cal.onnx")).get("QLinearConv") == 2


def test_without_calibration_data_the_training_data_calibrates_and_the_export_says_so(folder):
    recipe = json.loads((folder / "plain.small" / "recipe.json").read_text())
    assert recipe["training"]["data"] == str((folder / "train.npz").resolve())

    code, said = vcon("export", folder / "plain.small", "--onnx", folder / "fallback.onnx")
    assert code == 0, said
    assert "calibrated on the first 64 example(s) of the training data" in said and "no --calibration-data" in said
    assert "kernels: static: stem static: c1" in said, said
    assert kernel_counts(optimized_graph(folder / "fallback.onnx")).get("QLinearConv") == 2


def test_static_without_scales_or_any_data_is_refused_and_auto_says_why(folder):
    orphan = folder / "orphan.small"  # the same model, its training data no longer recorded
    shutil.copytree(folder / "plain.small", orphan)
    recipe = json.loads((orphan / "recipe.json").read_text())
    recipe["training"] = None
    (orphan / "recipe.json").write_text(json.dumps(recipe))

    code, said = vcon("export", orphan, "--onnx", folder / "no.onnx", "--kernel", "static")
    assert code == UsageError.exit_code and "--calibration-data" in said and not (folder / "no.onnx").exists()

    code, said = vcon("export", orphan, "--onnx", folder / "plain.onnx")
    assert code == 0, said
    assert "static int8 not possible" in said and "dynamic: head" in said


def test_bench_says_which_session_options_a_static_file_needs(folder):
    code, said = vcon("bench", folder / "auto.onnx", "--runs", "2")
    assert code == 0, said
    assert "deploy:" in said and "default session options" in said and "static int8" in said
