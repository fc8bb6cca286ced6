"""Asymmetric integer weights (w = (q − z)·s, a zero point per group or per row) through `compress_onnx_weights`.

The modules hold the buffers a vanished `QuantConfig(asymmetric=True)` layer holds (`qweight` int8,
`scale` float32, `zero_point` int8, signed: 4-bit values in −8…7) and dequantize them as it does,
so the ONNX files come from the exporter as a user's would. Tolerances: with onnxruntime's graph
optimizations off, and with MatMulNBits at float compute (accuracy_level 0), a file gives the
PyTorch outputs to float rounding (1e-5 of the output range); files as written run int8
activations where a kernel quantizes them, judged at ACTIVATION_ROUNDING_RTOL with a cosine above 0.999.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper
from torch import nn

from vcon_fx.export import KERNELS, check_onnx, compress_onnx_weights, export_onnx
from vcon_fx.export.static_rewrites import is_int8_weight

from tests.helpers import FourLinears, matmul_nbits_at_float_compute, unoptimized_error


class AsymLinear(nn.Module):
    """A Linear stored as integers with one scale and zero point per `group` inputs of a row (None: per row)."""

    def __init__(self, inputs: int, outputs: int, group: int | None, bits: int = 4, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        lo, hi = -2 ** (bits - 1), 2 ** (bits - 1) - 1
        per_row = (outputs,) if group is None else (outputs, inputs // group)
        self.group = group
        # int8 − int8 wraps in PyTorch's dequantize_per_channel when |q − z| > 127 (8 bits): int32 there
        self.zero_dtype = torch.int8 if bits <= 4 else torch.int32
        self.register_buffer("qweight", torch.randint(lo, hi + 1, (outputs, inputs), generator=gen, dtype=torch.int8))
        self.register_buffer("scale", torch.rand(per_row, generator=gen) * 0.05 + 0.01)
        self.register_buffer("zero_point", torch.randint(lo, hi + 1, per_row, generator=gen, dtype=torch.int8))
        self.bias = nn.Parameter(torch.randn(outputs, generator=gen))

    def forward(self, x):
        out, inputs = self.qweight.shape
        if self.group is None:
            w = torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight, self.scale, self.zero_point.to(self.zero_dtype), 0, -128, 127, torch.int8)
        else:
            w = torch.ops.quantized_decomposed.dequantize_per_channel(
                self.qweight.reshape(-1, self.group), self.scale.reshape(-1), self.zero_point.reshape(-1).to(self.zero_dtype), 0, -128, 127,
                torch.int8).reshape(out, inputs)
        return F.linear(x, w, self.bias)


class AsymMLP(nn.Module):
    """96 inputs in groups of 32: 3 blocks, an odd count (a half-filled zero-point byte per row)."""

    def __init__(self, group: int | None = 32, bits: int = 4, first: int = 64):
        super().__init__()
        self.up = AsymLinear(first, 96, group, bits, seed=0)
        self.down = AsymLinear(96, 24, group, bits, seed=1)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _export(tmp_path, model, x, **compress):
    path = export_onnx(model.eval(), tmp_path / "float.onnx", (x,))
    report = compress_onnx_weights(path, tmp_path / "int.onnx", **compress)
    return report, onnx.load(str(report.path))


def test_int4_stores_a_blocked_dequantize_linear_with_int4_zero_points(tmp_path):
    model, x = AsymMLP(), torch.randn(3, 5, 64)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, 64), bits=4)
    nodes = onnx_model.graph.node
    dq = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and not {"Reshape", "Transpose"} & {n.op_type for n in nodes}
    inits = {i.name: i for i in onnx_model.graph.initializer}
    for node in dq:
        attrs = {a.name: a.i for a in node.attribute}
        assert attrs == {"axis": 0, "block_size": 32}  # transposed for MatMul: the blocks run along K = axis 0
        q, scale, zero = (inits[name] for name in node.input)
        assert q.data_type == zero.data_type == TensorProto.INT4 and list(zero.dims) == list(scale.dims)
    up = next(n for n in dq if list(inits[n.input[0]].dims) == [64, 96])
    np.testing.assert_array_equal(numpy_helper.to_array(inits[up.input[2]]).astype(np.int8),
                                  model.up.zero_point.numpy().T)
    assert set(report.rewritten.values()) == {"int4"} and len(report.rewritten) == 2
    assert unoptimized_error(report.path, x, model(x)) < 1e-5
    check_onnx(model, report.path, (x,), rtol=KERNELS["weight-only"].rtol, runs=1).assert_ok()


def test_eight_bit_zero_points_stay_int8_with_their_integers(tmp_path):
    model, x = AsymMLP(bits=8), torch.randn(3, 5, 64)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, 64), bits=4)
    inits = {i.name: i for i in onnx_model.graph.initializer}
    dq = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(inits[n.input[0]].data_type == inits[n.input[2]].data_type == TensorProto.INT8
                                for n in dq)
    assert all({a.name: a.i for a in n.attribute}.get("block_size") == 32 for n in dq)
    assert unoptimized_error(report.path, x, model(x)) < 1e-5


def test_per_row_zero_points_become_int4_and_turn_with_a_folded_transpose(tmp_path):
    model, x = AsymMLP(group=None, first=40), torch.randn(3, 5, 40)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, 40), bits=4)
    inits = {i.name: i for i in onnx_model.graph.initializer}
    dq = [n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and "Transpose" not in {n.op_type for n in onnx_model.graph.node}
    assert all(inits[n.input[2]].data_type == TensorProto.INT4 and {a.name: a.i for a in n.attribute} == {"axis": 1}
               for n in dq)
    assert unoptimized_error(report.path, x, model(x)) < 1e-5


@pytest.mark.parametrize("group, block_size, first", [(32, 32, 64), (64, 32, 128), (32, 16, 64), (None, 32, 40)])
def test_matmul_nbits_takes_the_zero_points(tmp_path, group, block_size, first):
    model, x = AsymMLP(group=group, first=first), torch.randn(3, 5, first)
    if group == 64:
        model.down = AsymLinear(96, 24, 32, seed=1)  # 96 is no multiple of 64: groups of 32 there
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, first), bits=4, kernel="matmul-nbits",
                                 kernel_options={"block_size": block_size})
    nbits = [n for n in onnx_model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and not [n for n in onnx_model.graph.node if n.op_type in ("MatMul", "DequantizeLinear")]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    up = next(n for n in nbits if {a.name: a.i for a in n.attribute}["K"] == first)
    blocks = -(-first // block_size)
    zeros = inits[up.input[3]]
    assert zeros.dtype == np.uint8 and zeros.shape == (96, -(-blocks // 2)) and up.input[5]  # bias folded in
    nibbles = np.stack([zeros & 15, zeros >> 4], axis=-1).reshape(96, -1)[:, :blocks].astype(np.int16) - 8
    want = model.up.zero_point.numpy().reshape(96, -1)
    np.testing.assert_array_equal(nibbles, np.repeat(want, blocks // want.shape[1], axis=1))
    exact = check_onnx(model, matmul_nbits_at_float_compute(report.path, tmp_path / "f.onnx"), (x,), rtol=1e-4, runs=1).assert_ok()
    assert exact.outputs[0].rel_max_diff < 1e-5
    fast = check_onnx(model, report.path, (x,), rtol=KERNELS["matmul-nbits"].rtol, runs=1).assert_ok()
    assert fast.outputs[0].cosine > 0.999


def test_matmul_nbits_packs_a_gemm_with_zero_points(tmp_path):
    model, x = AsymMLP(), torch.randn(4, 64)  # 2-D input: the exporter writes Gemm(x, W, b, transB=1)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 64), bits=4, kernel="matmul-nbits")
    nbits = [n for n in onnx_model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) == 6 and n.input[3] for n in nbits)
    exact = check_onnx(model, matmul_nbits_at_float_compute(report.path, tmp_path / "f.onnx"), (x,), rtol=1e-4, runs=1).assert_ok()
    assert exact.outputs[0].rel_max_diff < 1e-5


def test_dynamic_int8_leaves_grouped_zero_points_weight_only(tmp_path):
    model, x = AsymMLP(bits=8), torch.randn(3, 5, 64)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, 64), bits=8, kernel="dynamic")
    notes = " ".join(report.notes)
    assert report.dynamic_matmuls == 0 and "2 weight(s) with zero points stay weight-only (zero points per group" in notes
    assert not [n for n in onnx_model.graph.node if n.domain == "com.microsoft"]
    assert len([n for n in onnx_model.graph.node if n.op_type == "DequantizeLinear" and len(n.input) == 3]) == 2
    check_onnx(model, report.path, (x,), rtol=KERNELS["dynamic"].rtol, runs=1).assert_ok()
    assert unoptimized_error(report.path, x, model(x)) < 1e-5


def test_dynamic_int8_passes_per_row_zero_points_to_the_integer_kernels(tmp_path):
    model, x = AsymMLP(group=None, bits=8, first=40), torch.randn(3, 5, 40)
    report, onnx_model = _export(tmp_path, model, torch.randn(2, 5, 40), bits=8, kernel="dynamic")
    fused = [n for n in onnx_model.graph.node if n.op_type == "DynamicQuantizeMatMul"]
    inits = {i.name: numpy_helper.to_array(i) for i in onnx_model.graph.initializer}
    assert report.dynamic_matmuls == 2 and len(fused) == 2 and "stay weight-only" not in " ".join(report.notes)
    assert sorted(inits[n.input[3]].tolist() for n in fused) == sorted(
        m.zero_point.tolist() for m in (model.up, model.down))
    fast = check_onnx(model, report.path, (x,), rtol=KERNELS["dynamic"].rtol, runs=1).assert_ok()
    assert fast.outputs[0].cosine > 0.999


def test_static_int8_does_not_take_asymmetric_weights(tmp_path):
    _, onnx_model = _export(tmp_path, AsymMLP(group=None, bits=8, first=40), torch.randn(2, 5, 40), bits=8)
    graph = onnx_model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    weights = [n.input[1] for n in graph.node if n.op_type == "MatMul"]
    assert len(weights) == 2 and not any(is_int8_weight(w, producers, inits) for w in weights)
    for zero in (n.input[2] for n in graph.node if n.op_type == "DequantizeLinear"):
        inits[zero].CopyFrom(numpy_helper.from_array(np.zeros(inits[zero].dims, np.int8), zero))
    assert all(is_int8_weight(w, producers, inits) for w in weights)  # the same weights at zero point 0 are taken


def test_the_cli_transforms_vanishes_and_exports_an_asymmetric_model(tmp_path):
    """A `.pt2` saved the usual way (static shapes, batch 1), the README's commands with `--asymmetric`."""
    from tests.helpers import cli_output

    torch.manual_seed(0)
    torch.export.save(torch.export.export(FourLinears().eval(), (torch.randn(1, 16),)), tmp_path / "net.pt2")
    quant = ["--method", "quant", "--bits", "4", "--group-size", "32", "--asymmetric"]
    code, text = cli_output("inspect", tmp_path / "net.pt2", *quant)
    assert code == 0 and "asymmetric" in text, text
    for args in (["transform", tmp_path / "net.pt2", *quant, "-o", tmp_path / "q.vcon"],
                 ["vanish", tmp_path / "q.vcon", "--force", "-o", tmp_path / "q.small"],
                 ["export", tmp_path / "q.small", "--onnx", tmp_path / "q8.onnx", "--check"],  # the default kernels
                 ["export", tmp_path / "q.small", "--onnx", tmp_path / "q.onnx", "--matmul-nbits", "--check"]):
        code, text = cli_output(*args)
        assert code == 0, text
    nodes = onnx.load(str(tmp_path / "q.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all(len(n.input) >= 4 and n.input[3] for n in nbits)  # zero_points given


def test_asymmetric_without_group_size_is_refused_before_any_work(tmp_path, capsys):
    from vcon_fx.cli.main import main
    from vcon_fx.errors import ConfigError

    torch.export.save(torch.export.export(FourLinears().eval(), (torch.randn(1, 16),)), tmp_path / "net.pt2")
    code = main(["transform", str(tmp_path / "net.pt2"), "--method", "quant", "--bits", "4", "--asymmetric",
                 "-o", str(tmp_path / "bad.vcon")])
    assert code == ConfigError.exit_code and not (tmp_path / "bad.vcon").exists()
    assert "--asymmetric puts a zero point beside each group's scale: it needs --group-size" in \
        " ".join(capsys.readouterr().err.split())


def test_a_wide_vanished_layer_becomes_matmul_nbits_too(tmp_path):
    """Past the exporter's constant-folding size (a language model's head), the zero points reach DequantizeLinear
    through Reshape → Cast(int32) → Cast(int8) nodes (the layer's int32 arithmetic): still one MatMulNBits."""
    import vcon_fx
    from vcon_fx.export import integer_export
    from vcon_fx.methods import QuantConfig

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16384)).eval(), torch.randn(1, 16)
    vm = vcon_fx.transform(model, QuantConfig(bits=4, group_size=32, asymmetric=True), example_inputs=(x,),
                           include_head=True)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    integer_export(small, tmp_path / "wide.onnx", (x,), kernel="matmul-nbits")
    ops = [n.op_type for n in onnx.load(str(tmp_path / "wide.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 1 and "DequantizeLinear" not in ops and "Cast" not in ops, ops
    check_onnx(small, tmp_path / "wide.onnx", (x,), rtol=KERNELS["matmul-nbits"].rtol, runs=1).assert_ok()
