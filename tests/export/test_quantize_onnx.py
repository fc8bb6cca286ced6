"""compress_onnx_weights: grid detection, INT8/INT4 storage, parity in onnxruntime, file size."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import OutputExistsError, UsageError
from vcon_fx.export.grid import find_grid
from vcon_fx.export.quantize import compress_onnx_weights
from vcon_fx.methods import QuantConfig
from vcon_fx.methods.quant import _dequantize, quantize_weight

from zoo import ConvBNReLU, _randomize_bn

try:
    from vcon_fx.export.onnx import export_onnx
except ImportError:  # written in parallel: fall back to the exporter itself
    def export_onnx(model, path, args, **_):
        torch.onnx.export(model, args, str(path), dynamo=True,
                          dynamic_shapes=({0: torch.export.Dim("batch")},) * len(args))
        return path


def snapped(model: nn.Module, bits) -> nn.Module:
    """A copy whose Linear/Conv weights lie on the per-channel grid the quant method uses."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.copy_(_dequantize(*quantize_weight(m.weight, bits)))
    return model


def ort_run(path, x: torch.Tensor, *, float_matmulnbits: bool = True) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if float_matmulnbits:
        # onnxruntime fuses DequantizeLinear → MatMul into MatMulNBits, which by default
        # (accuracy level 4) quantizes the activations to int8; level 1 accumulates in float.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def int_types(path) -> dict[str, int]:
    model = onnx.load(str(path))
    readers = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {i.name: i.data_type for i in model.graph.initializer if i.name in readers}


@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    model = ConvBNReLU(width=64)
    _randomize_bn(model)
    return model.eval(), torch.randn(2, 3, 12, 12)


# ── grid detection ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("bits,qmax", [(8, 127), (4, 7), (2, 1), (1, 1), ("ternary", 1)])
def test_find_grid_recovers_the_integers(bits, qmax):
    w = torch.randn(16, 8, 3, 3)
    q, scale = quantize_weight(w, bits)
    found = find_grid(_dequantize(q, scale).numpy(), 0)
    assert found is not None
    q_found, scale_found, qmax_found = found
    assert qmax_found == qmax
    wq = _dequantize(q, scale).numpy()
    assert np.abs(q_found * scale_found.reshape(-1, 1, 1, 1) - wq).max() <= 1e-6 * np.abs(wq).max()


def test_find_grid_refuses_plain_floats_and_finds_other_axes():
    w = torch.randn(16, 32)
    assert find_grid(w.numpy(), 0) is None
    wq = _dequantize(*quantize_weight(w, 8)).T.contiguous().numpy()  # (in, out): a MatMul weight
    assert find_grid(wq, 0) is None
    assert find_grid(wq, 1)[2] == 127


# ── the pass ──────────────────────────────────────────────────────────────────────────────


def test_int8_file_is_4x_smaller_and_runs_the_same(conv_net, tmp_path):
    model, x = conv_net
    grid = snapped(model, 8)
    export_onnx(grid, tmp_path / "float.onnx", (x,))
    report = compress_onnx_weights(tmp_path / "float.onnx", tmp_path / "int8.onnx")
    assert set(report.rewritten.values()) == {"int8"} and len(report.rewritten) == 4
    assert set(int_types(tmp_path / "int8.onnx").values()) == {onnx.TensorProto.INT8}
    assert report.ratio >= 3.5
    ref = grid(x).detach().numpy()
    got = ort_run(tmp_path / "int8.onnx", x)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.array_equal(ort_run(tmp_path / "float.onnx", x).shape, got.shape)


def test_int4_file_is_8x_smaller_on_the_weights(conv_net, tmp_path):
    model, x = conv_net
    grid = snapped(model, 4)
    export_onnx(grid, tmp_path / "float.onnx", (x,))
    report = compress_onnx_weights(tmp_path / "float.onnx", tmp_path / "int4.onnx", bits=4)
    assert report.int4 and set(report.rewritten.values()) == {"int4"}
    assert set(int_types(tmp_path / "int4.onnx").values()) == {onnx.TensorProto.INT4}
    assert report.ratio >= 6
    ref = grid(x).detach().numpy()
    assert np.abs(ort_run(tmp_path / "int4.onnx", x) - ref).max() <= 1e-4 * np.abs(ref).max()


def hand_made(tmp_path, weight: np.ndarray, name: str = "gemm.onnx"):
    """x → Gemm(W, transB=1) → Relu: a model built without the exporter (fast)."""
    from onnx import TensorProto, helper, numpy_helper

    out_f, in_f = weight.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_f])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_f])],
        [numpy_helper.from_array(weight.astype(np.float32), "w"), numpy_helper.from_array(np.ones(out_f, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(model, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("bits,values", [(1, {-1, 1}), ("ternary", {-1, 0, 1})])
def test_binary_and_ternary_weights_become_small_integers(bits, values, tmp_path):
    w = torch.randn(32, 48)
    wq = _dequantize(*quantize_weight(w, bits)).numpy()
    path = hand_made(tmp_path, wq)
    report = compress_onnx_weights(path, tmp_path / "int8.onnx")
    assert report.rewritten == {"w": "int8"}
    out = onnx.load(str(tmp_path / "int8.onnx"))
    q = onnx.numpy_helper.to_array(next(i for i in out.graph.initializer if i.name.startswith("w_quantized")))
    assert set(np.unique(q).tolist()) <= values
    x = torch.randn(3, 48)
    assert np.allclose(ort_run(tmp_path / "int8.onnx", x), ort_run(path, x), rtol=0, atol=1e-5)


def test_floats_off_the_grid_are_left_alone(tmp_path):
    path = hand_made(tmp_path, torch.randn(32, 48).numpy())
    report = compress_onnx_weights(path, tmp_path / "out.onnx")
    assert report.rewritten == {} and any("no float weight" in n for n in report.notes)
    assert report.skipped == {"w": "not on a per-channel symmetric grid"}


def test_never_overwrites_the_input_or_an_existing_output(tmp_path):
    path = hand_made(tmp_path, _dequantize(*quantize_weight(torch.randn(32, 48), 8)).numpy(), "float.onnx")
    with pytest.raises(UsageError):
        compress_onnx_weights(path, path, force=True)
    with pytest.raises(UsageError, match="bits"):
        compress_onnx_weights(path, bits=2)
    report = compress_onnx_weights(path)
    assert report.path == tmp_path / "float.int8.onnx"
    with pytest.raises(OutputExistsError):
        compress_onnx_weights(path)
    compress_onnx_weights(path, force=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


class TokenMlp(nn.Module):
    """Linear layers on a (batch, tokens, features) input: exported as MatMul(x, Transpose(W))."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(16, 32)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


def test_vanished_int4_model_repacks_to_int4_and_folds_transposes(tmp_path):
    torch.manual_seed(0)
    model, x = TokenMlp().eval(), torch.randn(2, 5, 16)
    vm = vcon_fx.transform(model, QuantConfig(bits=4), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    export_onnx(small, tmp_path / "small.onnx", (x,))
    assert set(int_types(tmp_path / "small.onnx").values()) == {onnx.TensorProto.INT8}  # the export itself
    report = compress_onnx_weights(tmp_path / "small.onnx", tmp_path / "int4.onnx", bits=4)
    assert set(int_types(tmp_path / "int4.onnx").values()) == {onnx.TensorProto.INT4}
    out = onnx.load(str(tmp_path / "int4.onnx"))
    made = {o for n in out.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert not [n for n in out.graph.node if n.op_type == "Transpose" and n.input[0] in made]
    assert any("Transpose" in note for note in report.notes)
    ref = small(x).detach().numpy()
    assert np.abs(ort_run(tmp_path / "int4.onnx", x) - ref).max() <= 1e-4 * np.abs(ref).max()
    # onnxruntime's default int8 activations in MatMulNBits: small, but more than float rounding
    assert np.abs(ort_run(tmp_path / "int4.onnx", x, float_matmulnbits=False) - ref).max() <= 1e-2 * np.abs(ref).max()


@pytest.mark.slow
@pytest.mark.parametrize("bits,ratio", [(8, 3.5), (4, 6.0)])
def test_resnet18_shrinks(bits, ratio, tmp_path):
    from zoo import make

    case = make("resnet18")
    grid = snapped(case.model, bits)
    x = case.args[0]
    export_onnx(grid, tmp_path / "float.onnx", (x,))
    report = compress_onnx_weights(tmp_path / "float.onnx", tmp_path / "q.onnx", bits=bits)
    assert report.ratio >= ratio, f"int{bits} resnet18 only {report.ratio:.2f}× smaller"
    ref = grid(x).detach().numpy()
    assert np.abs(ort_run(tmp_path / "q.onnx", x) - ref).max() <= 1e-4 * np.abs(ref).max()
