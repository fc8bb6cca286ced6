"""--allocate: the given ratio / sparsity / bits as one budget over the layers, spread by measured output error."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx.errors import ConfigError
from vcon_fx.io.artifact import read_recipe
from vcon_fx.methods.budget import Infeasible, spread

from helpers import (cli_output, assert_identity_at_beta_one, assert_onnx_parity, assert_params_promised, assert_vanish_parity,
                      run)

LAYERS = ("a", "b", "c")


class Planted(nn.Module):
    """stem → a → b → c → head (ReLU between); `a` is planted so that the method barely hurts it."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(16, 64), nn.Linear(64, 4)
        self.a, self.b, self.c = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        for layer in (self.stem, self.a, self.b, self.c):
            x = F.relu(layer(x))
        return self.head(x)


def planted(method: str) -> Planted:
    """`a` is rank 4 (low-rank), 90 % zeros (prune) or on a 2-bit grid (quant); b and c are random."""
    torch.manual_seed(0)
    net = Planted().eval()
    with torch.no_grad():
        if method == "lowrank":
            net.a.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8)
        elif method == "prune":
            net.a.weight.mul_(torch.rand(64, 64) < 0.1).mul_(3)
        else:
            net.a.weight.copy_(torch.randint(-1, 2, (64, 64)).float() * 0.1)
    return net


CONFIGS = {"lowrank": vcon_fx.LowRankConfig(ratio=0.3), "prune": vcon_fx.PruneConfig(sparsity=0.7),
           "quant": vcon_fx.QuantConfig(bits=4)}
SETTING = {"lowrank": "ratio", "prune": "sparsity", "quant": "bits"}


def calibration(n: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 16, generator=torch.Generator().manual_seed(seed))


def weight_budget(net: Planted, method: str) -> float:
    """What the uniform setting holds, counted as --allocate counts it (quant: weight bits)."""
    per_layer = {"lowrank": lambda w: 0.3 * w, "prune": lambda w: 0.3 * w, "quant": lambda w: 4 * w}[method]
    bias = 32 if method == "quant" else 1
    return sum(per_layer(getattr(net, n).weight.numel()) + bias * 64 for n in LAYERS)


def held(plan, method: str) -> float:
    if method != "quant":
        return plan.params_after
    return math.prod(plan.shape) * plan.detail["bits"] + 32 * (plan.params_before - math.prod(plan.shape))


def strength(plan, method: str) -> float:
    """Larger = more compressed."""
    if plan.skipped:
        return 0.0
    value = plan.detail["allocated"].split()[1]
    return {"lowrank": lambda v: 1 - float(v), "prune": float, "quant": lambda v: -int(v)}[method](value)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_the_budget_is_met_and_the_planted_layer_takes_the_most_compression(method):
    net = planted(method)
    compression_plan = vcon_fx.plan(net, CONFIGS[method], example_inputs=(calibration(2),), calibration=calibration(),
                                    allocate="params")
    plans = compression_plan.plans
    total, budget = sum(held(plans[n], method) for n in LAYERS), weight_budget(net, method)
    assert total <= budget + 1e-6 and total >= 0.85 * budget, (total, budget)
    assert all(strength(plans["a"], method) > strength(plans[n], method) for n in ("b", "c")), \
        {n: plans[n].detail for n in LAYERS}
    assert plans["a"].detail["error"] < min(plans[n].detail.get("error", 1) for n in ("b", "c") if not plans[n].skipped)
    assert any(note.startswith("allocation: 3 layer(s)") for note in compression_plan.notes)


def test_allocation_beats_the_uniform_ratio_on_the_whole_model_at_the_same_budget():
    net, x = planted("lowrank"), calibration()
    torch.manual_seed(5)
    with torch.no_grad():  # a is rank 2, b nearly rank 4: uniform rank 8 wastes on them what c lacks
        net.a.weight.copy_(torch.randn(64, 2) @ torch.randn(2, 64) / 8)
        net.b.weight.copy_(torch.randn(64, 4) @ torch.randn(4, 64) / 8 + 0.01 * torch.randn(64, 64))
    errors, params = {}, {}
    for allocate in (None, "params"):
        vm = vcon_fx.transform(net, vcon_fx.LowRankConfig(ratio=0.25), example_inputs=(x[:2],), calibration=x,
                               allocate=allocate)
        vcon_fx.set_beta(vm, 0.0)
        with torch.no_grad():
            errors[allocate] = float((vm(x) - net(x)).norm() / net(x).norm())
        params[allocate] = sum(p.params_after for p in vm.meta["vcon"].plans.values())
    assert params["params"] <= weight_budget_at(net, 0.25) and params["params"] <= params[None] * 1.02
    assert errors["params"] < 0.5 * errors[None], errors  # measured: 0.30 of the uniform error


def weight_budget_at(net: Planted, ratio: float) -> float:
    return sum(ratio * getattr(net, n).weight.numel() + 64 for n in LAYERS)


def test_the_recipe_rebuilds_the_allocated_model_through_vanish_and_onnx(tmp_path):
    net, x = planted("quant"), calibration()
    vm = vcon_fx.transform(net, vcon_fx.QuantConfig(bits=4), example_inputs=(x[:2],), calibration=x, allocate=True)
    recipe = vm.meta["vcon"]
    assert recipe.selection["allocate"] == "params"
    assert {recipe.plans[n].detail["bits"] for n in LAYERS} != {4}, "nothing was spread"
    inputs = ((x[:5],), {})
    assert_identity_at_beta_one(net, vm, inputs)
    vcon_fx.set_beta(vm, 0.4)
    vcon_fx.save(vm, tmp_path / "m.vcon")
    loaded = vcon_fx.load(tmp_path / "m.vcon", model=Planted())  # a fresh one: the weights come from the file
    torch.testing.assert_close(run(loaded, inputs), run(vm, inputs))
    assert {n: loaded.get_submodule(f"{n}.compressed").bits for n in LAYERS} == \
        {n: recipe.plans[n].detail["bits"] for n in LAYERS}
    small = assert_vanish_parity(loaded, inputs)
    assert_params_promised(small, net, recipe)
    assert_onnx_parity(small, inputs, tmp_path)


def test_a_layer_left_dense_by_the_allocation_is_left_out_of_the_groups():
    net, x = planted("prune"), calibration()
    # at a mild budget the planted layer a (90 % zeros already) takes 0.8 at no cost: another layer can stay whole
    compression_plan = vcon_fx.plan(net, vcon_fx.PruneConfig(sparsity=0.3), example_inputs=(x[:2],), calibration=x,
                                    allocate="params")
    dense = [n for n in LAYERS if compression_plan.plans[n].skipped]
    assert dense and "a" not in dense, {n: compression_plan.plans[n].detail for n in LAYERS}
    assert all("kept dense by --allocate" in compression_plan.plans[n].skip_reason for n in dense)
    assert {g.name for g in compression_plan.groups} == set(LAYERS) - set(dense)


# ── the greedy spread itself ───────────────────────────────────────────────────────────────


class _Option:
    def __init__(self, cost, error):
        self.cost, self.error = cost, error


def test_spread_takes_the_cheapest_error_per_unit_saved_and_never_exceeds_the_budget():
    flat = [_Option(100, 0.0), _Option(50, 0.01), _Option(25, 0.02)]  # loses little per unit saved
    steep = [_Option(100, 0.0), _Option(50, 0.5), _Option(25, 0.9)]
    assert spread({"flat": flat, "steep": steep}, 150) == {"flat": 1, "steep": 0}
    assert spread({"flat": flat, "steep": steep}, 75) == {"flat": 2, "steep": 1}
    with pytest.raises(Infeasible) as info:
        spread({"flat": flat, "steep": steep}, 49)
    assert info.value.least == 50


# ── the command line ───────────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("allocate")
    net = planted("lowrank")
    torch.export.save(torch.export.export(net, (calibration(2),), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                      root / "net.pt2")
    np.savez(root / "calib.npz", inputs=calibration(128).numpy())
    return root


cli = cli_output


def test_inspect_shows_each_layers_setting_and_error_and_transform_records_them(files, tmp_path):
    model, data = str(files / "net.pt2"), str(files / "calib.npz")
    code, text = cli("inspect", model, "--method", "lowrank", "--ratio", "0.3", "--allocate",
                     "--calibration-data", data, "--json")
    assert code == 0, text
    report = json.loads(text)
    layers = report["layers"]
    assert all("error" in layers[n]["detail"] and "allocated" in layers[n]["detail"] for n in LAYERS)
    assert layers["a"]["detail"]["error"] < 1e-3 and report["calibration"]["gram"] is True
    code, text = cli("inspect", model, "--method", "lowrank", "--ratio", "0.3", "--allocate",
                     "--calibration-data", data)
    assert code == 0 and "output error" in text and "allocation: 3 layer(s)" in text, text
    code, text = cli("transform", model, "--method", "lowrank", "--ratio", "0.3", "--allocate",
                     "--calibration-data", data, "-o", str(tmp_path / "m.vcon"))
    assert code == 0, text
    plans = read_recipe(tmp_path / "m.vcon").plans
    assert {n: plans[n].detail["rank"] for n in LAYERS if not plans[n].skipped} == \
        {n: layers[n]["detail"]["rank"] for n in LAYERS if "rank" in layers[n]["detail"]}


@pytest.mark.parametrize("argv, fix", [
    (["--method", "lowrank", "--ratio", "0.3", "--allocate"], "--calibration-data FILE"),
    (["--method", "lowrank", "--rank", "8", "--allocate", "--calibration-data", "{data}"], "low-rank --ratio"),
    (["--method", "prune", "--pattern", "2:4", "--allocate", "--calibration-data", "{data}"], "prune --sparsity"),
    (["--method", "prune", "--sparsity", "0.5", "--allocate", "flops", "--calibration-data", "{data}"],
     "--allocate params"),
    (["--method", "lowrank", "--ratio", "0.01", "--allocate", "--calibration-data", "{data}"], "--ratio of at least"),
], ids=["no-calibration", "rank", "pattern", "flops-prune", "impossible"])
def test_allocate_refused_in_the_users_terms(files, argv, fix, capsys):
    argv = [a.format(data=files / "calib.npz") for a in argv]
    code, _ = cli("transform", str(files / "net.pt2"), *argv, "-o", str(files / "never.vcon"))
    assert code == ConfigError.exit_code
    err = capsys.readouterr().err
    assert fix in err and "--allocate" in err, err
    assert not (files / "never.vcon").exists()


def test_compress_and_inspect_take_the_flag_as_transform_does():
    from vcon_fx.cli.main import build_parser

    parser = build_parser()
    for argv in (["compress", "m.pt2", "--method", "lowrank", "--ratio", "0.5", "--allocate", "--data", "d.npz",
                  "--steps", "4", "--onnx", "m.onnx"],
                 ["inspect", "m.pt2", "--allocate", "flops"], ["transform", "m.pt2", "--method", "quant"]):
        args = parser.parse_args(argv)
        assert args.allocate == {"compress": "params", "inspect": "flops", "transform": None}[argv[0]]
