"""bench_onnx: real onnxruntime runs, each in its own process, on small hand-built ONNX models."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vcon_fx.bench.compare import bench_onnx, validate_onnx
from vcon_fx.bench.worker import model_size_bytes
from vcon_fx.errors import LoadError, UsageError

RUNS = dict(warmup=1, runs=5)


def save(model: onnx.ModelProto, path, **kwargs):
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), **kwargs)
    return path


def matmul_model(width: int = 16) -> onnx.ModelProto:
    """y = x @ W with x: [batch, 8] (dynamic batch), W: [8, width]."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, width)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def text_model() -> onnx.ModelProto:
    """Embedding lookup (vocab 100: out-of-range ids would fail) times the mask, summed over seq."""
    table = numpy_helper.from_array(np.ones((100, 4), dtype=np.float32), "table")
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
         helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
         helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
         helper.make_node("Mul", ["emb", "mask3"], ["h"]),
         helper.make_node("ReduceSum", ["h"], ["y"], keepdims=0)], "text",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], [table, axes])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_row_measures_a_model(tmp_path):
    path = save(matmul_model(), tmp_path / "m.onnx")
    report = bench_onnx(path, batch=3, threads=1, **RUNS)
    (row,) = report.rows
    assert row.input_shapes == {"x": [3, 8]} and row.batch == 3 and row.threads == 1 and row.runs == 5
    assert 0 < row.latency_ms_median <= row.latency_ms_p90
    assert row.throughput_per_s == pytest.approx(3 * 1e3 / row.latency_ms_median)
    assert row.size_bytes == path.stat().st_size
    assert row.peak_mem_mb is not None and row.peak_mem_mb >= 0
    assert report.against is None and report.ratios == {}
    json.dumps(report.to_dict())


def test_text_inputs_fill_batch_and_seq(tmp_path):
    path = save(text_model(), tmp_path / "text.onnx")
    (row,) = bench_onnx(path, batch=2, seq=7, **RUNS).rows
    assert row.input_shapes == {"input_ids": [2, 7], "attention_mask": [2, 7]}


def test_against_gives_ratios(tmp_path):
    small = save(matmul_model(16), tmp_path / "small.onnx")
    dense = save(matmul_model(512), tmp_path / "dense.onnx")
    report = bench_onnx(small, against=dense, threads=1, **RUNS)
    model, ref = report.rows
    assert report.against == str(dense) and ref.path == str(dense)
    assert report.ratios["size"] == pytest.approx(model.size_bytes / ref.size_bytes) and report.ratios["size"] < 0.1
    assert report.ratios["speedup"] == pytest.approx(1 / report.ratios["latency"])
    assert set(report.ratios) == {"size", "latency", "speedup", "peak_mem"}
    assert json.loads(json.dumps(report.to_dict()))["ratios"] == report.ratios


def test_size_counts_external_data(tmp_path):
    path = save(matmul_model(256), tmp_path / "ext.onnx", save_as_external_data=True,
                location="ext.onnx.data", size_threshold=0)
    data = tmp_path / "ext.onnx.data"
    assert data.stat().st_size >= 8 * 256 * 4
    assert model_size_bytes(path) == path.stat().st_size + data.stat().st_size
    validate_onnx(path)


def test_missing_corrupt_and_non_onnx_files_are_load_errors(tmp_path):
    good = save(matmul_model(), tmp_path / "good.onnx")
    with pytest.raises(LoadError, match="missing.onnx does not exist"):
        bench_onnx(tmp_path / "missing.onnx")
    with pytest.raises(LoadError, match="is a folder"):
        bench_onnx(tmp_path)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[:-40])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    for bad in (text, truncated, empty):
        with pytest.raises(LoadError, match=bad.name) as info:
            bench_onnx(good, against=bad)
        assert "\n" not in str(info.value)


def test_a_model_onnxruntime_cannot_run_is_a_load_error(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["y"])], "strings",
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["batch"])],
        [helper.make_tensor_value_info("y", TensorProto.STRING, ["batch"])])
    path = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "s.onnx")
    with pytest.raises(LoadError, match=r"onnxruntime could not load or run .*s.onnx: TypeError: input 's'"):
        bench_onnx(path, **RUNS)


def test_bad_arguments_are_usage_errors(tmp_path):
    path = save(matmul_model(), tmp_path / "m.onnx")
    for kwargs in ({"batch": 0}, {"runs": 0}, {"seq": -1}, {"threads": 0}, {"batch": 1.5}):
        with pytest.raises(UsageError):
            bench_onnx(path, **kwargs)


def test_the_worker_measures_without_torch_or_the_package(tmp_path):
    """The worker runs by path in a bare process: its numbers must be onnxruntime's alone."""
    import subprocess
    import sys

    from vcon_fx.bench import compare

    path = save(matmul_model(), tmp_path / "m.onnx")
    probe = ("import json, runpy, sys; worker = runpy.run_path(sys.argv[1]); "
             "row = worker['measure'](sys.argv[2], runs=1, warmup=0); "
             "print(json.dumps([row, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'vcon_fx'))]))")
    proc = subprocess.run([sys.executable, "-c", probe, str(compare._WORKER), str(path)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    row, loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded == [] and row["session_config"] == {} and row["input_shapes"] == {"x": [1, 8]}
