"""Calibration and the data-aware starts on a GPU (skipped where CUDA is absent).

The CPU tests cover them in depth; this file checks that the statistics pass and every
data-aware start run on the model's device, nothing falling back to the CPU, and that the
invariants hold there: β = 1 is the original, vanish gives the blended model at β = 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.graph.blend import set_beta

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CONFIGS = {
    "whitened-lowrank": vcon_fx.LowRankConfig(rank=8), "activation-aware": vcon_fx.LowRankConfig(rank=8, activation_aware=True),
    "wanda": vcon_fx.PruneConfig(sparsity=0.5), "sparsegpt-2:4": vcon_fx.PruneConfig(pattern="2:4", sparsegpt=True),
    "gptq-4bit": vcon_fx.QuantConfig(bits=4), "clip-search": vcon_fx.QuantConfig(bits=4, clip_search=True),
    "whitened-lowrank+gptq": vcon_fx.ComposeConfig((vcon_fx.LowRankConfig(rank=8), vcon_fx.QuantConfig(bits=4))),
}


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 10))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_data_aware_starts_run_on_the_gpu(name):
    device = torch.device("cuda")
    net = _net().to(device).eval()
    x = torch.randn(4, 3, 8, 8, device=device)
    vm = vcon_fx.transform(net, CONFIGS[name], example_inputs=(x,), calibration=torch.randn(64, 3, 8, 8, device=device))
    assert all(t.device.type == "cuda" for t in (*vm.parameters(), *vm.buffers()))
    with torch.no_grad():
        set_beta(vm, 1.0)
        assert torch.allclose(vm(x), net(x), atol=1e-5)
        set_beta(vm, 0.0)
        blended = vm(x)
        assert torch.allclose(vcon_fx.vanish(vm)(x), blended, atol=1e-5)
    assert (blended - net(x)).norm() < net(x).norm()  # a start, not noise
