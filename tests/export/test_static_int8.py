"""Static int8 end to end: quant --bits 8 --act-bits 8, fine-tune, vanish, export; what onnxruntime runs.

A small CNN with batch norm, a residual add, max and average pooling is fine-tuned for a few
steps on real data, vanished and exported: onnxruntime's optimized graph must hold integer
convolutions and matmuls (QLinearConv, MatMulIntegerToFloat) and nothing float between them,
and its outputs must stay within the kernel's tolerance of PyTorch's fake-quant model.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import vcon_fx
from vcon_fx.bench.worker import session_config
from vcon_fx.errors import UsageError
from vcon_fx.export import check_onnx, check_tolerance, integer_export
from vcon_fx.export.islands import find_islands, kernel_counts, optimized_graph
from vcon_fx.graph.select import SelectionConfig
from vcon_fx.methods import QuantConfig
from vcon_fx.methods.quant import QuantizedLayer


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, max pool, a residual block (Conv-BN-ReLU-Conv-BN + identity), average pool, Linear."""

    def __init__(self, act=nn.ReLU):
        super().__init__()
        self.stem, self.bn0, self.act = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), act()
        self.c1, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.c2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(self.act(self.bn0(self.stem(x))), 2)
        h = self.bn2(self.c2(self.act(self.bn1(self.c1(x)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(F.relu(x + h), 1), 1))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    return TensorDataset(x, (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0].mean(dim=(1, 2)) > 0).long())


def _vanished(act_bits=8, act=nn.ReLU, steps=12):
    torch.manual_seed(0)
    model = ResidualCNN(act).eval()
    x = torch.randn(2, 3, 12, 12)
    vm = vcon_fx.transform(model, QuantConfig(bits=8, act_bits=act_bits), example_inputs=(x,),
                           selection=SelectionConfig(include_stem=True, include_head=True))
    vcon_fx.finetune(vm, _data(), vcon_fx.FinetuneConfig(steps=steps, transition=steps // 2, batch_size=16))
    return vcon_fx.vanish(vm), x


@pytest.fixture(scope="module")
def vanished():
    return _vanished()


@pytest.fixture(scope="module")
def static_file(vanished, tmp_path_factory):
    small, x = vanished
    path = tmp_path_factory.mktemp("static") / "static.onnx"
    return integer_export(small, path, (x,), kernel="static"), path


def test_fine_tuning_records_the_output_range_of_every_quantized_layer(vanished):
    small, _ = vanished
    layers = [m for m in small.modules() if isinstance(m, QuantizedLayer)]
    assert len(layers) == 4
    for layer in layers:
        assert bool(layer.out_observed) and layer.out_range.shape == (2, layer.qweight.shape[0])
        assert (layer.out_range[0] <= layer.out_range[1]).all()


def test_onnxruntime_runs_integer_convolutions_and_matmuls_with_no_float_island(static_file):
    report, path = static_file
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Relu" not in ops  # folded, absorbed
    counts = kernel_counts(optimized_graph(path))
    assert counts.get("QLinearConv") == 3 and counts.get("MatMulIntegerToFloat") == 1, counts
    assert counts.get("QLinearAdd") == 1 and counts.get("QLinearGlobalAveragePool") == 1, counts
    assert not {"Conv", "FusedConv", "Add", "Gemm", "MatMul"} & set(counts), counts
    assert report.islands == [] and "no float island" in " ".join(report.notes)
    assert report.layers == {"stem": "static", "c1": "static", "c2": "static", "head": "static"}
    assert session_config(path) == {}  # QDQ fusion must stay on


def test_onnxruntime_stays_within_the_kernel_tolerance_of_the_fake_quant_model(vanished, static_file):
    small, _ = vanished
    report, path = static_file
    rtol, note = check_tolerance(report.kernels)
    assert rtol == 0.05 and note
    checked = check_onnx(small, path, (_data(5, seed=1).tensors[0],), rtol=rtol, runs=1).assert_ok()
    assert checked.outputs[0].cosine > 0.99, checked.outputs


def test_a_float_op_between_integer_kernels_is_counted_as_an_island(tmp_path):
    small, x = _vanished(act=nn.Hardswish, steps=6)
    report = integer_export(small, tmp_path / "hs.onnx", (x,), kernel="static")
    # onnxruntime inlines HardSwish as HardSigmoid → Mul: its node names keep the op's name
    assert len(report.islands) == 2 and all("HardSwish" in " ".join(i.ops + i.nodes) for i in report.islands)
    assert "2 float island(s)" in " ".join(report.notes)
    assert len(find_islands(optimized_graph(tmp_path / "hs.onnx"))) == 2


def test_auto_picks_static_and_forcing_a_kernel_is_honoured(vanished, tmp_path):
    small, x = vanished
    auto = integer_export(small, tmp_path / "auto.onnx", (x,), kernel="auto")
    assert auto.kernels == ("static", "dynamic") and set(auto.layers.values()) == {"static"}
    assert any(n.startswith("auto: static + dynamic kept") for n in auto.notes), auto.notes
    weight_only = integer_export(small, tmp_path / "wo.onnx", (x,), kernel="weight-only")
    assert weight_only.kernels == ("weight-only",) and set(weight_only.layers.values()) == {"weight-only"}
    assert "QLinearConv" not in kernel_counts(optimized_graph(tmp_path / "wo.onnx"))
    dynamic = integer_export(small, tmp_path / "dyn.onnx", (x,), kernel="dynamic")
    assert dynamic.layers["head"] == "dynamic" and dynamic.layers["c1"] == "weight-only"


def test_auto_drops_static_when_its_outputs_leave_the_tolerance(vanished, tmp_path):
    small, x = vanished
    broken = copy.deepcopy(small)
    with torch.no_grad():  # c2's recorded range collapses to one point after its batch norm: static clips c2
        broken.c2.out_range.copy_(broken.bn2.running_mean.expand(2, -1))
    report = integer_export(broken, tmp_path / "auto.onnx", (x,), kernel="auto")
    assert report.kernels == ("dynamic",) and report.layers["head"] == "dynamic", report.notes
    assert any(n.startswith("auto: static + dynamic moved the outputs by") for n in report.notes), report.notes
    assert any(n.startswith("auto: dynamic kept") for n in report.notes), report.notes


def test_without_activation_scales_static_needs_calibration_data_and_says_it_used_it(tmp_path):
    small, x = _vanished(act_bits=None, steps=4)
    with pytest.raises(UsageError, match="needs activation scales.*--calibration-data"):
        integer_export(small, tmp_path / "no.onnx", (x,), kernel="static")
    assert not (tmp_path / "no.onnx").exists()
    batches = [((b,), {}) for b in _data(16).tensors[0].split(4)]
    report = integer_export(small, tmp_path / "calibrated.onnx", (x,), kernel="static", calibration=batches)
    said = " ".join(report.notes)
    assert "learned no activation scales" in said and "calibrated on the first 16 example(s)" in said
    assert kernel_counts(optimized_graph(tmp_path / "calibrated.onnx")).get("QLinearConv") == 3
    auto = integer_export(small, tmp_path / "auto.onnx", (x,), kernel="auto")
    assert "static int8 not possible" in " ".join(auto.notes) and "static" not in auto.kernels


def test_batch_norm_folding_keeps_the_integers_and_flips_negative_channels():
    from onnx import TensorProto, helper, numpy_helper

    from vcon_fx.export.bn_fold import fold_batch_norms

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    gamma = np.array([1.5, -0.5, 0.0, 2.0], np.float32)
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(np.full(4, 0.01, np.float32), "s"),
             *(numpy_helper.from_array(v.astype(np.float32), n) for n, v in
               (("g", gamma), ("b", rng.standard_normal(4)), ("m", rng.standard_normal(4)), ("v", rng.random(4) + 0.5)))]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["y", "g", "b", "m", "v"], ["z"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    import onnxruntime as ort

    x = rng.standard_normal((1, 3, 5, 5)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    before = run(model)
    folds = fold_batch_norms(model)
    assert len(folds) == 1 and [n.op_type for n in model.graph.node] == ["DequantizeLinear", "Conv"]
    folded = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert np.array_equal(np.abs(folded["q"][[0, 1, 3]]), np.abs(q[[0, 1, 3]])) and not folded["q"][2].any()
    assert np.array_equal(folded["q"][1], -q[1]) and (folded["s"] > 0).all()
    np.testing.assert_allclose(run(model), before, rtol=1e-4, atol=1e-4)
