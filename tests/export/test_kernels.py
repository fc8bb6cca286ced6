"""The export-kernel registry: every registered kernel exported, run and checked for real.

`CASES` holds what each kernel's file must show. A kernel registered without a case fails
`test_every_registered_kernel_has_a_case`, so adding a kernel means adding its test here.
"""

from __future__ import annotations

import argparse

import onnx
import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.errors import UsageError
from vcon_fx.export import KERNELS, check_onnx, check_tolerance, integer_export, kernel_choice, kernel_for_flags
from vcon_fx.export.check import FLOAT_RTOL
from vcon_fx.export.kernels import ExportKernel, get_kernel, register_kernel
from vcon_fx.methods import QuantConfig

FOLD_CONV_DEQUANTIZE = {"session.disable_quant_qdq": "1"}  # weight-only int8 Conv weights need it
# kernel name → (op types its file must hold, op types it must not, whether matmuls still read a
# DequantizeLinear, the integer widths it must store, the session config a deployment needs)
CASES = {
    "weight-only": ({"DequantizeLinear", "Conv"}, {"DynamicQuantizeMatMul", "MatMulIntegerToFloat"}, True,
                    {onnx.TensorProto.INT4}, FOLD_CONV_DEQUANTIZE),
    "dynamic": ({"DynamicQuantizeMatMul", "DequantizeLinear", "Conv"}, set(), False, {onnx.TensorProto.INT8},
                FOLD_CONV_DEQUANTIZE),
    "static": ({"MatMulIntegerToFloat", "QuantizeLinear", "DequantizeLinear", "Conv"}, {"DynamicQuantizeMatMul"},
               False, {onnx.TensorProto.INT8}, {}),
    "matmul-nbits": ({"MatMulNBits", "DequantizeLinear", "Conv"}, {"DynamicQuantizeMatMul"}, False,
                     {onnx.TensorProto.INT4}, FOLD_CONV_DEQUANTIZE),
}


class ConvThenMLP(nn.Module):
    """Convolutions (which every kernel keeps weight-only) and matmuls (which kernels may rewrite)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(16, 64), nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x):
        h = torch.relu(self.conv(torch.relu(self.stem(x)))).mean(dim=(2, 3))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


@pytest.fixture(scope="module")
def vanished():
    torch.manual_seed(0)
    model, x = ConvThenMLP().eval(), torch.randn(2, 3, 8, 8)
    vm = vcon_fx.transform(model, QuantConfig(bits=4, act_bits=8), example_inputs=(x,))
    vcon_fx.set_beta(vm, 0.0)
    vm.train()
    with torch.no_grad():  # observe activation ranges, as fine-tuning does
        vm(torch.randn(8, 3, 8, 8))
    vm.eval()
    return vcon_fx.vanish(vm), x


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _matmuls_read_dequantize(path) -> bool:
    graph = onnx.load(str(path)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return any(n.op_type in ("MatMul", "Gemm") and set(n.input) & dequantized for n in graph.node)


def _int_widths(path) -> set[int]:
    ints = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    return {i.data_type for i in onnx.load(str(path)).graph.initializer if i.data_type in ints and len(i.dims) >= 2}


def test_every_registered_kernel_has_a_case():
    assert list(KERNELS) == list(CASES), "a registered kernel needs its case in CASES (and CASES no stale entry)"


@pytest.mark.parametrize("name", list(KERNELS))
def test_each_kernel_exports_runs_and_checks_within_its_declared_tolerance(vanished, tmp_path, name):
    must, must_not, dequantized_matmuls, widths, session = CASES[name]
    kernel = KERNELS[name]
    small, x = vanished
    steps = []

    def progress(text):
        steps.append(text)
        return torch.no_grad()  # any context manager spans the step

    path = tmp_path / f"{name}.onnx"
    report = integer_export(small, path, (x,), kernel=name, progress=progress)
    assert steps[0] == "exporting to ONNX…" and steps[-1] == "storing integer weights…"
    assert report.path == path and sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no float copy left
    ops = _ops(path)
    assert must <= ops and not (must_not & ops), ops
    assert _matmuls_read_dequantize(path) == dequantized_matmuls
    assert _int_widths(path) >= widths
    assert kernel.flag_bits in kernel.bits
    assert kernel.session_options(path) == session

    rtol, note = check_tolerance(kernel)
    assert (rtol, note) == (kernel.rtol, kernel.check_note) and note
    checked = check_onnx(small, path, (torch.randn(5, 3, 8, 8),), rtol=rtol, runs=1).assert_ok()
    assert all(o.cosine > 0.999 for o in checked.outputs), checked.outputs  # the rounding, not a wrong graph


def test_a_float_export_is_checked_at_float_tolerance():
    assert check_tolerance(None) == (FLOAT_RTOL, None) and FLOAT_RTOL < min(k.rtol for k in KERNELS.values())


def test_the_cli_flags_come_from_the_registry():
    from vcon_fx.cli.export import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    flagged = [k for k in KERNELS.values() if k.flag]
    for kernel in KERNELS.values():
        by_name = parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx", "--kernel", kernel.name])
        assert kernel_choice(vars(by_name)) == kernel.name and kernel_for_flags(vars(by_name)) is None
        if kernel.flag:
            args = parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx", kernel.flag])
            assert kernel_for_flags(vars(args)) is kernel and kernel_choice(vars(args)) == kernel.name
    default = vars(parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx"]))
    assert kernel_for_flags(default) is None and kernel_choice(default) is None
    assert kernel_choice(vars(parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx", "--kernel", "auto"]))) == "auto"
    both = parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx", "--int4", "--dynamic-int8"])
    with pytest.raises(UsageError, match="^--int4 and --dynamic-int8 exclude each other: the integer GEMMs take INT8"):
        kernel_for_flags(vars(both))
    mixed = parser.parse_args(["export", "m.vcon", "--onnx", "o.onnx", "--int4", "--kernel", "static"])
    with pytest.raises(UsageError, match="--int4 chooses kernel 'weight-only', --kernel static another"):
        kernel_choice(vars(mixed))


def test_the_registry_refuses_bad_declarations():
    declared = dict(bits=(8,), why_bits="", rtol=0.05, check_note="", flag="--x", flag_bits=8, flag_help="",
                    conflict="", session_options=lambda path: {})
    before = dict(KERNELS)
    with pytest.raises(ValueError, match="registered twice"):
        register_kernel(name="dynamic", **declared)(lambda model, report: None)
    with pytest.raises(ValueError, match="stores a width"):
        register_kernel(name="new", **{**declared, "flag_bits": 4})(lambda model, report: None)
    with pytest.raises(ValueError, match="rtol"):
        ExportKernel(name="new", lower=lambda model, report: None, **{**declared, "rtol": 0.0})
    assert KERNELS == before
    with pytest.raises(UsageError, match=f"kernel must be {' or '.join(KERNELS)}, got 'fast'"):
        get_kernel("fast")
