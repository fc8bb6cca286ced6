"""The whole pipeline on a GPU, for every registered method (skipped where CUDA is absent).

CPU runs cover the invariants in depth; this file checks that nothing silently falls back to
the CPU or breaks on a device: transform, fine-tune through the transition, vanish, export.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import vcon_fx

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Each method's GPU config is declared in its own file (`examples().cuda`).
CONFIGS = {name: ex.cuda for name, cls in vcon_fx.registered_methods().items() if (ex := cls.examples()) is not None}


def test_every_registered_method_has_a_cuda_case():
    assert set(vcon_fx.registered_methods()) <= set(CONFIGS), "declare examples() on every method's config"


def _conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 128),
                         nn.GELU(), nn.Linear(128, 10))


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_pipeline_on_cuda(method, arch, tmp_path):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = (_mlp() if arch == "mlp" else _conv_net()).to(device).eval()
    shape = (8, 32) if arch == "mlp" else (8, 3, 16, 16)
    x = torch.randn(shape, device=device)
    vm = vcon_fx.transform(model, CONFIGS[method], example_inputs=(x,))
    assert all(p.device.type == "cuda" for p in vm.parameters())
    with torch.no_grad():
        assert torch.allclose(vm(x), model(x), rtol=1e-5, atol=1e-5)

    data = TensorDataset(torch.randn(64, *shape[1:]), torch.randint(0, 10, (64,)))
    result = vcon_fx.finetune(vm, data, steps=10, transition=5, batch_size=16, lr=1e-3, device="cuda")
    assert set(result.betas.values()) == {0.0}
    assert all(p.device.type == "cuda" for p in vm.parameters())

    vm.eval()
    with torch.no_grad():
        blended = vm(x)
        small = vcon_fx.vanish(vm)
        torch.testing.assert_close(small(x), blended, rtol=1e-5, atol=1e-5)

    cpu_small = small.cpu()
    onnx_path = vcon_fx.export_onnx(cpu_small, tmp_path / "m.onnx", (x.cpu(),))
    report = vcon_fx.check_onnx(cpu_small, onnx_path, (x.cpu(),), rtol=1e-3 if method != "lowrank" else 1e-4)
    report.assert_ok()
