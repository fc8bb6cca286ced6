"""Uniform settings against `--allocate` at the same budget, one-shot (no fine-tuning); writes ALLOCATION.md.

The task and model are the demo's (vcon_fx/demo/model.py): scikit-learn's digits (1437 train /
360 test images, fixed split) and the tiny ViT (2×2 patches, dim 64, 4 blocks), every Linear
inside the blocks compressed (16 layers). Per seed one dense model is trained; then, for every
setting, two transforms from it with the same 128 calibration images (the first training images):

    uniform    transform(config, calibration=…)                    every layer at the setting
    allocated  transform(config, calibration=…, allocate="params")  the same budget, spread by
                                                                     each layer's measured error

Both are data-aware (whitened low-rank, Wanda, GPTQ) and measured at β = 0 in PyTorch, before
any fine-tuning: test accuracy, and the relative error of the logits against the dense model's
on the 360 test images. "held" is what the compressed layers hold (parameters; quant: weight bits),
so the two columns are compared at the same budget.

    .venv/bin/python benchmarks/allocation.py                       # the table (~5 min on a shared 2-core machine)
    .venv/bin/python benchmarks/allocation.py --tiny --out /tmp/a.md  # smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import vcon_fx  # noqa: E402
from benchmarks.common import command_line, machine_line, markdown_table, write_text_atomic  # noqa: E402
from vcon_fx.demo.model import TinyViT, accuracy, example_inputs, load_digits_data, pretrain  # noqa: E402

SETTINGS = (("lowrank", 0.5), ("lowrank", 0.3), ("lowrank", 0.2), ("lowrank", 0.1), ("prune", 0.5),
            ("prune", 0.7), ("prune", 0.9), ("quant", 4), ("quant", 2))
TINY_SETTINGS = (("lowrank", 0.3), ("quant", 4))
CALIBRATION = 128
PRETRAIN_STEPS = 400  # dense test accuracy ~95 %


def config_of(method: str, value) -> vcon_fx.MethodConfig:
    return {"lowrank": lambda: vcon_fx.LowRankConfig(ratio=value), "prune": lambda: vcon_fx.PruneConfig(sparsity=value),
            "quant": lambda: vcon_fx.QuantConfig(bits=value)}[method]()


def held(vm) -> float:
    """What the compressed layers hold, as --allocate counts it (quant: weight bits)."""
    total = 0.0
    for plan in vm.meta["vcon"].plans.values():
        if "bits" in plan.detail and not plan.skipped:
            weights = math.prod(plan.shape)
            total += weights * int(plan.detail["bits"]) + 32 * (plan.params_before - weights)
        else:
            total += plan.params_after
    return total


def one_shot(dense, data, config, allocate: str | None) -> dict:
    """Transform (uniform or allocated), β = 0, measured on the test images."""
    calibration = data.train.tensors[0][:CALIBRATION]
    start = time.perf_counter()
    vm = vcon_fx.transform(dense, config, example_inputs=example_inputs(), calibration=calibration, allocate=allocate)
    seconds = time.perf_counter() - start
    vcon_fx.set_beta(vm, 0.0)
    images = data.test.tensors[0]
    with torch.no_grad():
        ref, out = dense(images), vm(images)
    spread = next((n.split(": ", 2)[-1] for n in vm.meta["vcon"].notes if n.startswith("allocation:")), "")
    return {"accuracy": accuracy(vm, data.test), "error": float((out - ref).norm() / ref.norm()), "held": held(vm),
            "seconds": seconds, "spread": spread}


def run(seeds: tuple[int, ...], settings, pretrain_steps: int) -> tuple[list[list], dict]:
    data = load_digits_data()
    results: dict = {}
    dense_accuracy = []
    for seed in seeds:
        torch.manual_seed(seed)
        dense = TinyViT()
        pretrain(dense, data.train, steps=pretrain_steps, seed=seed)
        dense.eval()
        dense_accuracy.append(accuracy(dense, data.test))
        for method, value in settings:
            for allocate in (None, "params"):
                results.setdefault((method, value, allocate), []).append(
                    one_shot(dense, data, config_of(method, value), allocate))
            print(f"seed {seed} {method} {value}: done", file=sys.stderr, flush=True)
    rows = []
    for method, value in settings:
        uniform, allocated = results[(method, value, None)], results[(method, value, "params")]
        wins = sum(a["accuracy"] > u["accuracy"] for a, u in zip(allocated, uniform))
        rows.append([f"{method} {'ratio' if method == 'lowrank' else 'sparsity' if method == 'prune' else 'bits'} {value}",
                     _mean(uniform, "accuracy", pct=True), _mean(allocated, "accuracy", pct=True),
                     _mean(uniform, "error"), _mean(allocated, "error"),
                     f"{statistics.mean(a['held'] / u['held'] for a, u in zip(allocated, uniform)):.3f}",
                     f"{wins}/{len(seeds)}", f"{statistics.mean(r['seconds'] for r in allocated):.1f} s",
                     allocated[0]["spread"]])
    better = sum(statistics.mean(r["accuracy"] for r in results[(m, v, "params")])
                 > statistics.mean(r["accuracy"] for r in results[(m, v, None)]) for m, v in settings)
    worse = sum(statistics.mean(r["accuracy"] for r in results[(m, v, "params")])
                < statistics.mean(r["accuracy"] for r in results[(m, v, None)]) for m, v in settings)
    return rows, {"dense": dense_accuracy, "better": better, "worse": worse}


def _mean(runs: list[dict], key: str, pct: bool = False) -> str:
    values = [r[key] * (100 if pct else 1) for r in runs]
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}" if pct else f"{mean:.3f} ± {std:.3f}"


def report(rows, extra, seeds, pretrain_steps, seconds) -> str:
    headers = ["setting", "uniform acc %", "allocated acc %", "uniform logit error", "allocated logit error",
               "held (allocated ÷ uniform)", "allocated better (seeds)", "allocate time", "spread (first seed)"]
    dense = ", ".join(f"{a * 100:.1f}" for a in extra["dense"])
    return "\n".join([
        "# Budget allocation: uniform against `--allocate`, one-shot",
        "",
        f"Command: `{command_line()}` ({seconds / 60:.1f} min). {machine_line()}",
        "",
        f"The demo's digits ViT (16 Linear layers compressed), {len(seeds)} seed(s), each trained dense for "
        f"{pretrain_steps} steps (dense test accuracy: {dense} %). Every setting is transformed twice from the same "
        f"dense model with the same {CALIBRATION} calibration images: every layer at the setting (uniform), or the "
        "same budget spread by `allocate=\"params\"` (allocated). Both start data-aware (whitened low-rank, Wanda, "
        "GPTQ); no fine-tuning; measured in PyTorch at β = 0 on the 360 test images. Logit error: "
        "‖logits − dense logits‖ / ‖dense logits‖. Held: what the compressed layers hold (parameters; quant: weight "
        "bits), allocated ÷ uniform (≤ 1: the allocation never spends more). Mean ± std over seeds.",
        "",
        markdown_table(headers, rows),
        "",
        f"Verdict: the allocated model is more accurate in {extra['better']} of {len(rows)} settings (by the mean "
        f"over seeds), less accurate in {extra['worse']}. Each layer's error is weighed by its gain to the model's "
        "output, measured once per layer at the uniform setting, so the prediction is best near that setting; "
        "at mild settings, where every layer's error is small, a layer the linear prediction ranks badly can cost "
        "more than the uniform setting. See docs/methods.md (Budget allocation).",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one seed, two settings, a short pretraining")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).with_name("ALLOCATION.md")))
    args = parser.parse_args(argv)
    seeds = (0,) if args.tiny else tuple(range(args.seeds))
    settings, steps = (TINY_SETTINGS, 60) if args.tiny else (SETTINGS, PRETRAIN_STEPS)
    torch.set_num_threads(1)  # on a shared 2-core machine one thread trains this tiny model ~6× faster than two
    start = time.perf_counter()
    rows, extra = run(seeds, settings, steps)
    path = write_text_atomic(args.out, report(rows, extra, seeds, steps, time.perf_counter() - start))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
