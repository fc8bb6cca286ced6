"""INT8.md's four torchvision CNNs: their static int8 export really runs integer convolutions in onnxruntime.

Each model (random weights, 64 px to stay quick) is quantized to 8 bits with the default
selection, vanished at β = 0 and exported with the static kernel, calibrated on a few random
batches; onnxruntime's optimized graph must then run every quantized convolution as a
QLinearConv (the fused integer kernel); only the convolutions left dense (the stem) run in float.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

import vcon_fx
from vcon_fx.export import integer_export
from vcon_fx.export.islands import kernel_counts, optimized_graph
from vcon_fx.methods import QuantConfig

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_static_export_of_a_torchvision_cnn_runs_qlinearconv(name, tmp_path):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    vm = vcon_fx.transform(model, QuantConfig(bits=8), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    convs = sum(1 for p in vm.meta["vcon"].plans.values() if not p.skipped and p.kind.startswith("Conv"))
    calibration = [((torch.randn(4, 3, 64, 64),), {}) for _ in range(2)]
    report = integer_export(small, tmp_path / "static.onnx", (x,), kernel="static", calibration=calibration)
    counts = kernel_counts(optimized_graph(tmp_path / "static.onnx"))
    assert counts.get("QLinearConv", 0) >= convs > 0, (counts, report.notes)
    dense_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) - convs  # the stem stays float
    assert counts.get("Conv", 0) + counts.get("FusedConv", 0) <= dense_convs, counts
