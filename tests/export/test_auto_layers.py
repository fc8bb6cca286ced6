"""Auto's per-layer fallback: a matmul whose input carries an outlier feature stays weight-only, the rest go dynamic.

Quantizing a whole activation tensor to uint8 at run time (DynamicQuantizeLinear) wipes out the
small features next to a huge one. A model with one such input is exported with default flags
(`kernel="auto"`): dynamic everywhere leaves the check's tolerance, so auto must keep exactly the
matmul that reads the outlier weight-only and run the others as integer GEMMs.
"""

from __future__ import annotations

import torch
from torch import nn

import vcon_fx
from vcon_fx.export import integer_export
from vcon_fx.export.auto_layers import fewest_kept
from vcon_fx.methods import QuantConfig


class OutlierMLP(nn.Module):
    """Four Linears; the input of `b` has one feature 500× the others (as in a transformer's FFN output)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = nn.Linear(32, 64), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 16)
        self.register_buffer("spike", torch.ones(64))
        self.spike[0] = 500.0
        with torch.no_grad():  # the spike sets the rounding step of b's input, not b's output
            self.b.weight[:, 0] /= 500.0

    def forward(self, x):
        h = torch.relu(self.a(x)) * self.spike
        return self.d(torch.relu(self.c(torch.relu(self.b(h)))))


def test_auto_keeps_only_the_outlier_layer_weight_only(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 32)
    vm = vcon_fx.transform(OutlierMLP().eval(), QuantConfig(bits=8), example_inputs=(x,), include_stem=True,
                           include_head=True)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    report = integer_export(small, tmp_path / "auto.onnx", (x,), kernel="auto")
    assert report.layers == {"a": "dynamic", "b": "weight-only", "c": "dynamic", "d": "dynamic"}, report.notes
    assert any("kept with 1 matmul(s) weight-only" in note for note in report.notes), report.notes
    forced = integer_export(small, tmp_path / "dynamic.onnx", (x,), kernel="dynamic")
    assert set(forced.layers.values()) == {"dynamic"}


def test_fewest_kept_finds_the_shortest_passing_prefix_with_few_probes():
    ranked = [f"m{i}" for i in range(36)]
    for need in (1, 3, 9, 17, 18):
        probes = []
        kept = fewest_kept(ranked, lambda keep: probes.append(len(keep)) or len(keep) >= need)
        assert kept == frozenset(ranked[:need]) and len(probes) <= 8, (need, probes)
    assert fewest_kept(ranked, lambda keep: False) is None  # never more than half of them
