"""check_onnx: onnxruntime against PyTorch on the session's exported tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from vcon_fx.errors import LoadError, ParityError, UsageError
from vcon_fx.export.check import check_onnx
from vcon_fx.export.onnx import export_onnx


@pytest.mark.parametrize("name", ["mlp", "conv", "dict", "text"])
def test_parity_at_another_batch_size(exported, name):
    """Inputs of another batch (and seq) size than the export's: the dynamic axes work."""
    case = exported[name]
    report = check_onnx(case.model, case.path, case.other_args, example_kwargs=case.other_kwargs, runs=3)
    assert report.ok, report.to_dict()
    assert report.assert_ok() is report
    assert all(o.max_abs_diff <= o.allowed and o.cosine > 0.9999 for o in report.outputs)
    assert report.size_bytes == case.path.stat().st_size and report.latency_ms > 0
    assert report.reference_path is None and report.size_ratio is None
    assert all(m.training for m in case.model.modules())  # flags given back
    json.dumps(report.to_dict())


def test_every_output_is_checked_by_name(exported):
    case = exported["dict"]
    report = check_onnx(case.model, case.path, case.other_args, runs=1)
    assert [o.name for o in report.outputs] == ["scores", "aux_0", "aux_1"]
    assert [o.shape for o in report.outputs] == [(4, 3), (4, 2), (4,)]


def test_every_mismatch_is_listed_in_one_error(exported):
    case = exported["dict"]
    drifted = copy.deepcopy(case.model)
    with torch.no_grad():
        drifted.a.bias += 0.5
        drifted.b.bias += 0.5
    report = check_onnx(drifted, case.path, case.other_args, runs=1)
    assert not report.ok
    assert [o.name for o in report.outputs if not o.ok] == ["scores", "aux_0"]
    assert report.to_dict()["ok"] is False
    with pytest.raises(ParityError) as info:
        report.assert_ok()
    message = str(info.value)
    assert "scores: max|Δ| 0.5" in message and "aux_0: max|Δ| 0.5" in message and "aux_1" not in message
    assert str(case.path) in message


def test_tolerance_is_relative_to_the_largest_output(exported):
    case = exported["mlp"]
    scaled = copy.deepcopy(case.model)
    with torch.no_grad():  # outputs ~1e4 away from ONNX's ~1: fails at rtol 1e-4, not at 10
        scaled.fc2.bias += 1e4
    assert not check_onnx(scaled, case.path, case.other_args, runs=1).ok
    assert check_onnx(scaled, case.path, case.other_args, runs=1, rtol=10.0).ok
    assert check_onnx(scaled, case.path, case.other_args, runs=1, atol=2e4).ok


def test_reference_gives_size_and_latency_ratios(exported, tiny, tmp_path):
    torch.manual_seed(0)
    dense, small = tiny.MLP(width=256), tiny.LowRankMLP()
    x = (torch.randn(2, 8),)
    dense_path = export_onnx(dense, tmp_path / "dense.onnx", x)
    small_path = export_onnx(small, tmp_path / "small.onnx", x)
    report = check_onnx(small, small_path, (torch.randn(6, 8),), reference_onnx=dense_path, runs=3, threads=1)
    assert report.ok
    assert report.reference_size_bytes == dense_path.stat().st_size
    assert report.size_ratio == pytest.approx(report.size_bytes / report.reference_size_bytes)
    assert report.size_ratio < 0.9  # fc1 through rank 2: 528 weights instead of 2048
    assert report.latency_ratio == pytest.approx(report.latency_ms / report.reference_latency_ms)
    assert report.to_dict()["threads"] == 1


def test_static_export_fails_parity_at_another_batch(tiny, tmp_path):
    model = tiny.MLP()
    path = export_onnx(model, tmp_path / "static.onnx", (torch.randn(2, 8),), dynamic_batch=False)
    assert check_onnx(model, path, (torch.randn(2, 8),), runs=1).ok
    with pytest.raises(ParityError, match=r"could not run .*static.onnx on inputs \{'x': \[5, 8\]\}.*dynamic axes"):
        check_onnx(model, path, (torch.randn(5, 8),), runs=1)


def test_bad_files_and_inputs(exported, tmp_path):
    case = exported["mlp"]
    with pytest.raises(LoadError, match="does not exist"):
        check_onnx(case.model, tmp_path / "missing.onnx", case.args)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(case.path.read_bytes()[:200])
    with pytest.raises(LoadError, match="corrupt.onnx"):
        check_onnx(case.model, corrupt, case.args)
    with pytest.raises(LoadError, match="reference"):
        check_onnx(case.model, case.path, case.args, reference_onnx=tmp_path / "reference.onnx")
    with pytest.raises(UsageError, match=r"takes inputs \['input_ids', 'attention_mask'\]"):
        check_onnx(case.model, exported["text"].path, case.args)
    with pytest.raises(UsageError, match="rtol"):
        check_onnx(case.model, case.path, case.args, rtol=-1)
