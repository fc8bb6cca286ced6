"""A quant model with `--group-size` in ONNX: blocked DequantizeLinear, and MatMulNBits with its real block scales.

Tolerances: with onnxruntime's graph optimizations off (DequantizeLinear, then a float MatMul)
and with MatMulNBits at float compute (accuracy_level 0) the file gives PyTorch's outputs to
float rounding (1e-5 of the output range); the files as written run int8 activations and are
judged at the kernels' ACTIVATION_ROUNDING_RTOL (5 %), with a cosine above 0.999.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError, UsageError
from vcon_fx.export import KERNELS, check_onnx, integer_export
from vcon_fx.methods import QuantConfig

from tests.helpers import FourLinears, matmul_nbits_at_float_compute, unoptimized_error


class GroupMLP(nn.Module):
    """Linears on [batch, seq, features]: `up`'s 40 inputs take no group of 32 (per channel), the others do."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(40, 96), nn.Linear(96, 128), nn.Linear(128, 24)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _vanished(group_size: int):
    torch.manual_seed(0)
    model, x = GroupMLP().eval(), torch.randn(2, 5, 40)
    vm = vcon_fx.transform(model, QuantConfig(bits=4, group_size=group_size), example_inputs=(x,),
                           include_stem=True, include_head=True)
    vcon_fx.set_beta(vm, 0.0)
    return vcon_fx.vanish(vm)


def test_weight_only_int4_stores_blocked_dequantize_linear_with_the_pytorch_weights(tmp_path):
    small, x = _vanished(32), torch.randn(3, 5, 40)
    path = tmp_path / "w.onnx"
    report = integer_export(small, path, (torch.randn(2, 5, 40),), kernel="weight-only", bits=4)
    model = onnx.load(str(path))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dq if any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(dq) == 3 and len(blocked) == 2 and "Reshape" not in {n.op_type for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    assert sorted(tuple(inits[n.input[1]].dims) for n in blocked) == [(3, 128), (4, 24)]  # (in/32, out): transposed
    assert all(inits[n.input[0]].data_type == onnx.TensorProto.INT4 for n in dq)
    assert "2 grouped weight(s) dequantized per block" in " ".join(report.notes)
    assert unoptimized_error(path, x, small(x)) < 1e-5
    check_onnx(small, path, (x,), rtol=KERNELS["weight-only"].rtol, runs=1).assert_ok()


@pytest.mark.parametrize("group_size, block_size", [(32, 32), (64, 32), (32, 16)])
def test_matmul_nbits_packs_the_real_block_scales(tmp_path, group_size, block_size):
    small, x = _vanished(group_size), torch.randn(3, 5, 40)
    path = tmp_path / "m.onnx"
    report = integer_export(small, path, (torch.randn(2, 5, 40),), kernel="matmul-nbits",
                            kernel_options={"block_size": block_size})
    assert report.layers == {"up": "matmul-nbits", "mid": "matmul-nbits", "down": "matmul-nbits"}  # not "weight-only"
    model = onnx.load(str(path))
    nbits = {n.name: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert len(nbits) == 3 and not [n for n in model.graph.node if n.op_type in ("MatMul", "DequantizeLinear")]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    down = next(n for n in nbits.values() if {a.name: a.i for a in n.attribute}["K"] == 128)
    scales = inits[down.input[2]].reshape(24, 128 // block_size)
    want = small.get_submodule("down").scale.numpy()
    np.testing.assert_array_equal(scales, np.repeat(want, group_size // block_size, axis=1))
    run = check_onnx(small, matmul_nbits_at_float_compute(path, tmp_path / "f.onnx"), (x,), rtol=1e-4, runs=1).assert_ok()
    assert run.outputs[0].rel_max_diff < 1e-5
    fast = check_onnx(small, path, (x,), rtol=KERNELS["matmul-nbits"].rtol, runs=1).assert_ok()
    assert fast.outputs[0].cosine > 0.999


def test_a_block_size_that_does_not_divide_the_groups_is_refused(tmp_path):
    with pytest.raises(UsageError, match=r"one scale per 32 inputs \(--group-size 32\), which --block-size 64 does not "
                                         r"divide: export with --block-size 32"):
        integer_export(_vanished(32), tmp_path / "m.onnx", (torch.randn(2, 5, 40),), kernel="matmul-nbits",
                       kernel_options={"block_size": 64})
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grouped")
    torch.manual_seed(0)
    ep = torch.export.export(FourLinears().eval(), (torch.randn(2, 16),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, folder / "net.pt2")
    return folder


def test_the_cli_transforms_vanishes_and_exports_matmul_nbits_with_group_size(net):
    from tests.helpers import cli_output

    code, text = cli_output("inspect", net / "net.pt2", "--method", "quant", "--bits", "4", "--group-size", "32")
    assert code == 0 and "quant bits=4 group_size=32" in text
    for args in (["transform", net / "net.pt2", "--method", "quant", "--bits", "4", "--group-size", "32",
                  "-o", net / "q.vcon"],
                 ["vanish", net / "q.vcon", "--force", "-o", net / "q.small"],
                 ["export", net / "q.small", "--onnx", net / "q8.onnx", "--check"],  # the default kernels
                 ["export", net / "q.small", "--onnx", net / "q.onnx", "--matmul-nbits", "--check"]):
        code, text = cli_output(*args)
        assert code == 0, text
    assert "cosine" in text
    nodes = onnx.load(str(net / "q.onnx")).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2 and all({a.name: a.i for a in n.attribute}["block_size"] == 32 for n in nbits)


def test_the_cli_refuses_a_bad_group_size_before_any_work(net, capsys):
    from vcon_fx.cli.main import main

    code = main(["transform", str(net / "net.pt2"), "--method", "quant", "--bits", "4", "--group-size", "24",
                 "-o", str(net / "bad.vcon")])
    assert code == ConfigError.exit_code and not (net / "bad.vcon").exists()
    assert "--group-size must be a power of 2 of at least 16" in " ".join(capsys.readouterr().err.split())
