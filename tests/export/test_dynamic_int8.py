"""compress_onnx_weights(kernel="dynamic"): int8 matmuls become onnxruntime's integer GEMMs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import UsageError
from vcon_fx.export.onnx import export_onnx
from vcon_fx.export.quantize import compress_onnx_weights
from vcon_fx.methods import QuantConfig


class Attention(nn.Module):
    """q/k/v read one input (a shared DynamicQuantizeLinear); out and the MLP read their own."""

    def __init__(self, d: int = 64):
        super().__init__()
        self.stem = nn.Linear(16, d)
        self.q, self.k, self.v, self.out = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d, bias=False)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / 8.0, dim=-1) @ self.v(h)
        h = h + self.out(att)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h)


def _ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _run(path, x: torch.Tensor) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.fixture(scope="module")
def vanished_int8(tmp_path_factory):
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 7, 16)
    vm = vcon_fx.transform(model, QuantConfig(bits=8), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    path = tmp_path_factory.mktemp("dyn") / "small.onnx"
    export_onnx(small, path, (x,), seq_inputs=(), force=True)
    return small, x, path


def test_int8_matmuls_become_integer_gemms(vanished_int8, tmp_path):
    small, x, path = vanished_int8
    report = compress_onnx_weights(path, tmp_path / "dyn.onnx", kernel="dynamic")
    ops = _ops(tmp_path / "dyn.onnx")
    # q, k, v share one DynamicQuantizeLinear; out, fc1, fc2 quantize their own input
    assert ops.get("MatMulIntegerToFloat") == 3 and ops.get("DynamicQuantizeLinear") == 1
    assert ops.get("DynamicQuantizeMatMul") == 3
    assert report.dynamic_matmuls == 6 and any("DynamicQuantizeMatMul" in n for n in report.notes)
    assert "DequantizeLinear" not in ops  # every int8 weight went into a fused op
    ref = small(x).detach().numpy()
    got = _run(tmp_path / "dyn.onnx", x)
    cosine = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cosine > 0.999, cosine  # activation rounding only
    assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()


def test_dynamic_kernel_keeps_the_weights_int8_and_the_file_small(vanished_int8, tmp_path):
    _, _, path = vanished_int8
    weight_only = compress_onnx_weights(path, tmp_path / "wo.onnx")
    dynamic = compress_onnx_weights(path, tmp_path / "dyn.onnx", kernel="dynamic")
    assert dynamic.bytes_after <= 1.05 * weight_only.bytes_after
    int8 = [i for i in onnx.load(str(tmp_path / "dyn.onnx")).graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    # q, k, v, out, fc1, fc2 (stem and head are left dense by default), stored as W[K, N]
    assert len(int8) == 6 and {tuple(i.dims) for i in int8} == {(64, 64), (64, 256), (256, 64)}


def test_bad_kernel_options_are_usage_errors(vanished_int8, tmp_path):
    _, _, path = vanished_int8
    with pytest.raises(UsageError, match="weight-only or dynamic"):
        compress_onnx_weights(path, tmp_path / "a.onnx", kernel="fast")
    with pytest.raises(UsageError, match="bits=8"):
        compress_onnx_weights(path, tmp_path / "b.onnx", bits=4, kernel="dynamic")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_a_float_model_is_left_as_it_is(tmp_path):
    torch.manual_seed(0)
    model, x = Attention().eval(), torch.randn(2, 7, 16)
    export_onnx(model, tmp_path / "dense.onnx", (x,), seq_inputs=())
    report = compress_onnx_weights(tmp_path / "dense.onnx", tmp_path / "out.onnx", kernel="dynamic")
    assert report.dynamic_matmuls == 0
    ref = model(x).detach().numpy()
    assert np.abs(_run(tmp_path / "out.onnx", x) - ref).max() <= 1e-4 * np.abs(ref).max()


def test_weight_only_int8_convolutions_get_the_constant_folding_session_option(tmp_path):
    from vcon_fx.bench.compare import bench_onnx
    from vcon_fx.bench.worker import make_session, session_config

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    vm = vcon_fx.transform(model, QuantConfig(bits=8), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    export_onnx(small, tmp_path / "conv.onnx", (x,), seq_inputs=())
    assert session_config(tmp_path / "conv.onnx") == {"session.disable_quant_qdq": "1"}
    session = make_session(tmp_path / "conv.onnx", threads=1)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ref = small(x).detach().numpy()
    assert np.abs(got - ref).max() <= 1e-4 * max(np.abs(ref).max(), 1.0)  # folded exactly, float kernels
    row = bench_onnx(tmp_path / "conv.onnx", runs=2, warmup=1).rows[0]
    assert row.session_config == {"session.disable_quant_qdq": "1"}


def test_float_and_matmul_only_models_get_no_session_options(vanished_int8, tmp_path):
    from vcon_fx.bench.worker import session_config

    _, _, path = vanished_int8
    assert session_config(path) == {}
