"""The demo in fast mode: table and JSON fields, the plot, the ONNX files in onnxruntime.

Accuracies are checked for range and for a working dense model, never for VCON beating abrupt
compression: the demo reports whichever won.
"""

from __future__ import annotations

import json

import pytest
import torch

import vcon_fx
from vcon_fx.cli.demo import add_demo_parser, cmd_demo
from vcon_fx.demo.run import DEMO_FORMAT, FAST, FAST_METHODS, DemoRow, demo_configs, plot_histories, run_demo
from vcon_fx.errors import OutputExistsError, UsageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS = {"method", "setting", "config", "params", "onnx", "onnx_bytes", "latency_ms", "onnx_ok",
              "onnx_max_abs_diff", "transition", "acc_compressed", "acc_abrupt", "acc_vcon", "acc_vcon_onnx",
              "gain", "history_abrupt", "history_vcon", "beta_vcon"}


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    """One fast demo through the command-line entry, shared by the tests below: (exit code, stdout, out dir)."""
    import argparse
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo") / "demo_out"
    parser = argparse.ArgumentParser(prog="vcon-fx")
    add_demo_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", "--fast", "--out", str(out), "--seed", "0"])  # fast: FAST_METHODS
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(buffer):
        code = cmd_demo(args)
    assert torch.get_num_threads() == threads  # the demo restores torch's thread count
    return code, buffer.getvalue(), out


def test_fast_methods_cover_both_onnx_routes():
    bits = [getattr(demo_configs()[m][0], "bits", None) for m in FAST_METHODS]
    assert None in bits and any(isinstance(b, int) for b in bits)  # float factors and integer weights


def test_every_registered_method_has_a_demo_setting():
    missing = sorted(set(vcon_fx.registered_methods()) - set(demo_configs()))
    assert not missing, f"registered methods without a demo setting (add one to demo_configs): {missing}"


def test_fast_demo_exits_zero_and_prints_the_table(fast_run):
    code, stdout, _ = fast_run
    assert code == 0, stdout
    for header in ("method", "params", "ONNX", "latency", "dense", "abrupt", "VCON"):
        assert header in stdout
    for method in FAST_METHODS:
        assert method in stdout


def test_results_json_fields_and_ranges(fast_run):
    _, _, out = fast_run
    data = json.loads((out / "results.json").read_text())
    assert data["format"] == DEMO_FORMAT
    assert data["fast"] is True and data["seed"] == 0
    assert data["settings"]["steps"] == FAST.steps
    assert 0.8 < data["dense_accuracy"] <= 1.0
    assert [r["method"] for r in data["rows"]] == list(FAST_METHODS)
    assert data["skipped"].keys() == set(vcon_fx.registered_methods()) - set(FAST_METHODS)
    for row in data["rows"]:
        assert ROW_FIELDS <= row.keys()
        for key in ("acc_compressed", "acc_abrupt", "acc_vcon", "acc_vcon_onnx"):
            assert 0.0 <= row[key] <= 1.0, (row["method"], key, row[key])
        assert row["gain"] == pytest.approx(row["acc_vcon"] - row["acc_abrupt"])
        assert row["transition"] == round(FAST.steps * FAST.transition)
        assert 0 < row["params"] <= data["dense_params"]
        assert row["onnx_bytes"] > 0 and row["latency_ms"] > 0
        # the curves: every evaluated step, VCON's β falling from 1 to 0, abrupt at 0 throughout
        assert row["history_vcon"][0][:2] == [0, 1.0] and row["history_vcon"][-1][1] == 0.0
        assert all(beta == 0.0 for _, beta, _ in row["history_abrupt"])
        assert row["history_vcon"][-1][0] == FAST.steps
        betas, q = row["beta_vcon"], row["transition"]
        assert len(betas) == FAST.steps + 1 and betas[0] == 1.0 and betas[q] == 0.0 and betas[-1] == 0.0
        assert betas[q // 2] == pytest.approx(1 - (q // 2) / q)   # the paper's linear β = 1 − t/Q
    lowrank = data["rows"][0]
    assert lowrank["params"] < data["dense_params"]
    quant = data["rows"][1]
    assert quant["onnx_bytes"] < data["dense_onnx_bytes"] / 3  # binary weights stored as INT4


def test_plot_is_a_png(fast_run):
    _, _, out = fast_run
    png = out / "accuracy.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    assert png.stat().st_size > 10_000


def test_onnx_files_pass_the_onnxruntime_check(fast_run):
    import onnx
    import onnxruntime as ort

    from vcon_fx.demo.model import load_digits_data

    _, _, out = fast_run
    data = json.loads((out / "results.json").read_text())
    test = load_digits_data().test
    images, labels = (t.numpy() for t in test.tensors)
    assert (out / "dense.onnx").is_file()
    for row in data["rows"]:
        path = out / row["onnx"]
        onnx.checker.check_model(str(path))
        assert row["onnx_ok"], row
        assert row["onnx_max_abs_diff"] < 1e-3
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: images})[0]
        assert logits.shape == (len(labels), 10)  # dynamic batch: exported with 2, run with 360
        acc = float((logits.argmax(-1) == labels).mean())
        assert acc == pytest.approx(row["acc_vcon_onnx"])
        assert abs(acc - row["acc_vcon"]) <= 2 / len(labels)  # the file classifies as the PyTorch model


def test_rerun_replaces_an_earlier_demo_but_not_foreign_folders(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        run_demo(foreign, fast=True, methods=["lowrank"])
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unknown_method_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown method 'nope'"):
        run_demo(tmp_path / "out", fast=True, methods=["nope"])
    assert not (tmp_path / "out").exists()


def test_plot_histories_writes_a_png(tmp_path):
    row = DemoRow(method="lowrank", setting="rank 4", config={}, params=1, onnx="x.onnx", onnx_bytes=1,
                  latency_ms=1.0, onnx_ok=True, onnx_max_abs_diff=0.0, transition=2, acc_compressed=0.1,
                  acc_abrupt=0.5, acc_vcon=0.6, acc_vcon_onnx=0.6, seconds=0.0,
                  history_abrupt=[[0, 0.0, 0.1], [4, 0.0, 0.5]],
                  history_vcon=[[0, 1.0, 0.9], [2, 0.0, 0.4], [4, 0.0, 0.6]])
    path = plot_histories([row], tmp_path / "p.png", dense_accuracy=0.9)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
