"""Which VCON configuration helps, measured on the exported ONNX over seeds; writes CONFIGS.md.

Issue 13 asks why the transition gains so little and which defaults measure best. This script
holds the task and the fine-tuning budget fixed and varies only VCON's configuration:

    abrupt            transition 0 (the baseline)
    default           Q = 20 %, the dense branch trains, prune/quant twins share its weights
    Q 12.5 % / Q 50 % the same with a shorter / longer transition
    frozen            --freeze-dense, and prune/quant twins with their own weights
    frozen, Q 12.5 %  both

The task is the demo's (scikit-learn digits, the tiny ViT, every Linear in its blocks
compressed) at strong settings and budgets small enough that abrupt compression has not
recovered (issue 13: e.g. 50 / 100 steps). Every run of a seed starts from that seed's dense
model and sees the same batches; accuracy is that of the vanished model exported to ONNX, run in
onnxruntime on the 360 test images.

    .venv/bin/python benchmarks/configs.py                 # the grid, 2 worker processes (~15 min idle)
    .venv/bin/python benchmarks/configs.py --tiny --out /tmp/cfg   # smoke test
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.accuracy import _data, _quiet_worker, make_config, pretrain_dense, strength_label  # noqa: E402

CONFIGS = {  # name → (Q as a share of the budget, freeze the dense branch and give twins their own weights)
    "abrupt": (0.0, False),
    "default": (0.2, False),
    "Q 12.5%": (0.125, False),
    "Q 50%": (0.5, False),
    "frozen": (0.2, True),
    "frozen, Q 12.5%": (0.125, True),
}


@dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 600
    budgets: tuple[int, ...] = (50, 100)
    strengths: tuple = (("prune", 0.95), ("quant", 1), ("lowrank", 4))
    lr: float = 1e-3
    batch_size: int = 64
    depth: int = 4


FULL = Grid()
TINY = Grid(seeds=(0,), pretrain_steps=60, budgets=(20,), strengths=(("prune", 0.9),))


def run_one(seed: int, method: str, strength, budget: int, name: str, state: dict, grid: Grid) -> dict:
    """One fine-tuning run from the seed's dense weights; the exported ONNX's test accuracy."""
    import onnxruntime as ort

    import vcon_fx
    from vcon_fx.demo.model import TinyViT, example_inputs

    _quiet_worker()
    t0 = time.process_time()
    share, frozen = CONFIGS[name]
    dense = TinyViT(depth=grid.depth)
    dense.load_state_dict(state)
    config = make_config(method, strength)
    if frozen and method in ("prune", "quant"):
        config = dataclasses.replace(config, separate_weights=True)
    vm = vcon_fx.transform(dense, config, example_inputs=example_inputs(), freeze_dense=frozen)
    data = _data()
    vcon_fx.finetune(vm, data.train, steps=budget, transition=round(share * budget), lr=grid.lr,
                     batch_size=grid.batch_size, eval_data=data.test, seed=seed)
    small = vcon_fx.vanish(vm)
    images, labels = data.test.tensors
    with tempfile.TemporaryDirectory() as tmp:
        path = vcon_fx.export_onnx(small, Path(tmp) / "m.onnx", (images[:2],))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    accuracy = float((np.argmax(logits, -1) == labels.numpy()).mean())
    return {"seed": seed, "method": method, "strength": strength, "budget": budget, "config": name,
            "accuracy": accuracy, "cpu_s": round(time.process_time() - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    grid = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started, t0 = datetime.datetime.now(), time.monotonic()
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        dense = {s: (st, acc) for s, st, acc, _ in pool.map(pretrain_dense, grid.seeds, [grid] * len(grid.seeds))}
        jobs = [pool.submit(run_one, seed, m, s, b, name, dense[seed][0], grid)
                for seed in grid.seeds for m, s in grid.strengths for b in grid.budgets for name in CONFIGS]
        results = [j.result() for j in jobs]
    meta = {"command": "python benchmarks/configs.py" + (" --tiny" if args.tiny else ""),
            "grid": asdict(grid), "dense": {s: acc for s, (_, acc) in dense.items()},
            "started": started.isoformat(timespec="minutes"), "wall_min": round((time.monotonic() - t0) / 60, 1),
            "load": os.getloadavg(), "torch": torch.__version__}
    (args.out / "configs_results.json").write_text(json.dumps({"meta": meta, "runs": results}, indent=1))
    (args.out / "CONFIGS.md").write_text(markdown(meta, results, grid))


def markdown(meta: dict, runs: list[dict], grid: Grid) -> str:
    by = {}
    for r in runs:
        by.setdefault((r["method"], str(r["strength"]), r["budget"], r["config"]), {})[r["seed"]] = 100 * r["accuracy"]
    dense = [100 * a for a in meta["dense"].values()]
    lines = ["# Which VCON configuration helps (issue 13, item 6)", "",
             "Produced by `benchmarks/configs.py` (this file is its output):", "", f"    {meta['command']}", "",
             f"- Task: the demo's digits ViT; dense test accuracy {statistics.mean(dense):.1f} % over seeds "
             f"{', '.join(map(str, grid.seeds))}. Accuracy of the vanished model exported to ONNX, in onnxruntime, "
             "on the 360 test images (1 image = 0.28 points); mean ± sample std over seeds; Δ = config − abrupt "
             "per seed; the count says in how many seeds the config beat abrupt.",
             f"- Budgets: {', '.join(map(str, grid.budgets))} Adam steps (lr {grid.lr:g}, batch {grid.batch_size}), "
             "identical data order per seed for every configuration.",
             f"- Started {meta['started']}, {meta['wall_min']} min wall on a shared 2-core machine.", ""]
    for method, strength in grid.strengths:
        for budget in grid.budgets:
            lines += [f"## {method} {strength_label(method, strength)}, {budget} steps", "",
                      "| configuration | accuracy | Δ vs abrupt | ahead in |", "|---|---|---|---|"]
            base = by.get((method, str(strength), budget, "abrupt"), {})
            for name in CONFIGS:
                accs = by.get((method, str(strength), budget, name), {})
                if not accs:
                    continue
                vals = list(accs.values())
                row = f"| {name} | {_ms(vals)} |"
                if name == "abrupt":
                    row += " – | – |"
                else:
                    deltas = [accs[s] - base[s] for s in accs if s in base]
                    row += f" {_ms(deltas, signed=True)} | {sum(d > 0 for d in deltas)}/{len(deltas)} |"
                lines.append(row)
            lines.append("")
    return "\n".join(lines)


def _ms(values: list[float], signed: bool = False) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.1f} ± {std:.1f}" if signed else f"{mean:.1f} ± {std:.1f}"


if __name__ == "__main__":
    main()
