"""The MatMulNBits kernel: vcon-fx's INT4 grid packed for onnxruntime's int4 matmul, exactly.

Per-output-channel symmetric scales map onto every block of a row, so with onnxruntime's float
compute (accuracy_level 0) the file gives the fake-quantized PyTorch outputs to float rounding;
the exported files ask for int8 compute (accuracy_level 4), checked at the kernel's tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import vcon_fx
from vcon_fx.errors import UsageError
from vcon_fx.export import KERNELS, check_onnx, integer_export
from vcon_fx.export.kernels.matmul_nbits import ACCURACY_LEVEL, pack_int4_blocks
from vcon_fx.methods import ComposeConfig, LowRankConfig, QuantConfig

from tests.helpers import matmul_nbits_at_float_compute


class TokenMLP(nn.Module):
    """Linear layers on [batch, seq, features] (MatMul in ONNX), one of them with K not a multiple of 32."""

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.down = nn.Linear(40, 96), nn.Linear(96, 96), nn.Linear(96, 24)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _vanished(config):
    torch.manual_seed(0)
    model, x = TokenMLP().eval(), torch.randn(2, 5, 40)
    vm = vcon_fx.transform(model, config, example_inputs=(x,), include_stem=True, include_head=True)
    vcon_fx.set_beta(vm, 0.0)
    return vcon_fx.vanish(vm)


CONFIGS = {
    "quant": (QuantConfig(bits=4), 3),  # every Linear
    "lowrank+quant": (ComposeConfig((LowRankConfig(rank=16), QuantConfig(bits=4))), 6),  # both factors of each
}




@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("block_size", [16, 64])
def test_int4_matmuls_become_matmul_nbits_with_the_pytorch_weights(tmp_path, name, block_size):
    config, matmuls = CONFIGS[name]
    small = _vanished(config)
    path = tmp_path / "m.onnx"
    report = integer_export(small, path, (torch.randn(2, 5, 40),), kernel="matmul-nbits",
                            kernel_options={"block_size": block_size})
    nodes = onnx.load(str(path)).graph.node
    nbits = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert len(nbits) == matmuls and not [n for n in nodes if n.op_type in ("MatMul", "Gemm", "DequantizeLinear")]
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["block_size"] == block_size and attrs["accuracy_level"] == ACCURACY_LEVEL and attrs["bits"] == 4
    assert f"{matmuls} INT4 matmul(s) run as MatMulNBits (block {block_size}" in " ".join(report.notes)

    x = torch.randn(3, 5, 40)  # another batch than the export's
    exact = check_onnx(small, matmul_nbits_at_float_compute(path, tmp_path / "f.onnx"), (x,), rtol=1e-4, runs=1)
    assert exact.assert_ok().outputs[0].rel_max_diff < 1e-5
    fast = check_onnx(small, path, (x,), rtol=KERNELS["matmul-nbits"].rtol, runs=1).assert_ok()
    assert fast.outputs[0].cosine > 0.999


def test_packing_is_exact_for_every_value_and_a_ragged_last_block():
    rng = np.random.default_rng(0)
    n, k, block = 5, 50, 16  # 50 = 3 blocks + 2
    q = rng.integers(-8, 8, size=(n, k)).astype(np.int8)
    q[0, :16] = np.arange(-8, 8)  # every nibble value
    scale = rng.random(n).astype(np.float32) + 0.5
    packed, scales = pack_int4_blocks(q, scale, block)
    assert packed.shape == (n, 4, block // 2) and packed.dtype == np.uint8 and scales.shape == (n * 4,)
    node = helper.make_node("MatMulNBits", ["x", "B", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ (q * scale[:, None]).T, rtol=1e-5, atol=1e-5)


def test_a_bad_block_size_is_refused(tmp_path):
    small = _vanished(CONFIGS["quant"][0])
    with pytest.raises(UsageError, match="power of 2 of at least 16.*got 48"):
        integer_export(small, tmp_path / "m.onnx", (torch.randn(2, 5, 40),), kernel="matmul-nbits",
                       kernel_options={"block_size": 48})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, message", [
    (["--matmul-nbits", "--block-size", "48"], "--block-size must be a power of 2"),
    (["--int4", "--block-size", "32"], "--block-size sets the blocks of --matmul-nbits"),
])
def test_the_cli_refuses_a_block_size_before_any_work(tmp_path, capsys, flags, message):
    from vcon_fx.cli.main import main

    assert main(["export", str(tmp_path / "no-such.vcon"), "--onnx", str(tmp_path / "m.onnx"), *flags]) == 2
    assert message in " ".join(capsys.readouterr().err.split())


@pytest.mark.slow
def test_the_int4_benchmark_runs_tiny(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "int4.py"
    out, temp = tmp_path / "int4.md", tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, str(script), "--tiny", "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("| dense fp32 |", "| vcon int4 MatMulNBits |", "| ort RTN symmetric |", "| ort HQQ |", "β = 0"):
        assert row in text, text
    assert not [p for p in temp.rglob("*") if p.suffix in (".onnx", ".data")]
