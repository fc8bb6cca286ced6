"""The compressed model vcon-fx delivers, column by column: data-aware starts, the transition, a teacher, allocation.

Issue 13's table. Every column compresses the same dense model to the same size; the columns add
one ingredient at a time, so each one's share is visible:

    one-shot plain / data-aware     β = 0 straight after transform, no training (plain SVD,
                                    magnitude, round-to-nearest / whitened SVD, Wanda, GPTQ)
    abrupt plain / data-aware       the same start, then fine-tuned with β = 0 from step 0
    abrupt DA + allocation          … with the budget spread over the layers (--allocate)
    VCON plain / data-aware         the transition (β linear 1 → 0 over Q = 20 % of the steps)
    VCON DA + teacher               … with --distill 0.5 (the dense branch as teacher)
    VCON DA + teacher + allocation  … and --allocate
    + adaptive                      … and the adaptive β schedule

(b) the demo's digits ViT at the strongest setting of each method, fine-tuning budgets small
enough that abrupt compression has not recovered; every trained column gets the same steps, data
order and learning rate; accuracy is that of the vanished model exported to ONNX, run in
onnxruntime on the 360 test images; 3 seeds. (a) the pretrained MiniLM (quality_minilm.py):
one-shot (plain, data-aware, allocated) and fine-tuned by distillation on real sentences (the
trained columns, 3 seeds, the same steps each), scored on 471 held-out sentences: cosine to the
original's sentence embeddings and top-10 nearest-neighbour agreement.

    .venv/bin/python benchmarks/quality.py                 # both parts (~90 min on 2 idle cores)
    .venv/bin/python benchmarks/quality.py --parts minilm  # MiniLM only; keeps the saved ViT tables
    .venv/bin/python benchmarks/quality.py --tiny --out /tmp/q   # smoke test
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import multiprocessing as mp
import os
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

from benchmarks.accuracy import _data, _quiet_worker, pretrain_dense  # noqa: E402

# column → (steps taken: False for one-shot; transition share Q; data-aware; distill weight; allocate; schedule)
COLUMNS = {
    "one-shot plain": (False, 0.0, False, 0.0, False, "linear"),
    "one-shot data-aware": (False, 0.0, True, 0.0, False, "linear"),
    "abrupt plain": (True, 0.0, False, 0.0, False, "linear"),
    "abrupt data-aware": (True, 0.0, True, 0.0, False, "linear"),
    "abrupt DA + allocation": (True, 0.0, True, 0.0, True, "linear"),
    "VCON plain": (True, 0.2, False, 0.0, False, "linear"),
    "VCON data-aware": (True, 0.2, True, 0.0, False, "linear"),
    "VCON DA + teacher": (True, 0.2, True, 0.5, False, "linear"),
    "VCON DA + teacher + allocation": (True, 0.2, True, 0.5, True, "linear"),
    "+ adaptive schedule": (True, 0.2, True, 0.5, True, "adaptive"),
}
WITHOUT_TRANSITION = [c for c, spec in COLUMNS.items() if spec[1] == 0.0]
CALIBRATION_SAMPLES = 128


@dataclass(frozen=True)
class Grid:
    seeds: tuple[int, ...] = (0, 1, 2)
    pretrain_steps: int = 600
    budgets: tuple[int, ...] = (25, 50)
    settings: tuple = (("prune", 0.95), ("lowrank", 0.1), ("quant", 2))
    lr: float = 1e-3
    batch_size: int = 64
    depth: int = 4
    minilm: tuple = (("lowrank", 0.5), ("lowrank", 0.3), ("quant", 4), ("prune", "2:4"))
    minilm_steps: int = 50  # fine-tuning steps of every trained MiniLM column (0: one-shot only)
    minilm_trained: tuple = (("lowrank", 0.3), ("quant", 4), ("prune", "2:4"))  # the strongest of each method


FULL = Grid()
TINY = Grid(seeds=(0,), pretrain_steps=60, budgets=(10,), settings=(("prune", 0.9),), minilm=(("lowrank", 0.5),), minilm_steps=3,
            minilm_trained=(("lowrank", 0.5),))


def method_config(method: str, strength, data_aware: bool):
    """The config of a setting, plain or data-aware (`init`) (pure)."""
    import vcon_fx

    init = "data-aware" if data_aware else "plain"
    if method == "lowrank":
        return vcon_fx.LowRankConfig(ratio=strength, init=init)
    if method == "quant":
        return vcon_fx.QuantConfig(bits=strength, init=init)
    if strength == "2:4":
        return vcon_fx.PruneConfig(pattern="2:4", init=init)
    return vcon_fx.PruneConfig(sparsity=strength, init=init)


def setting_label(method: str, strength) -> str:
    return {"lowrank": f"low-rank ratio {strength}", "quant": f"{strength}-bit weights"}.get(
        method, f"{strength} sparsity" if strength == "2:4" else f"{round(100 * strength)} % pruned")


def vit_run(seed: int, method: str, strength, budget: int, column: str, state: dict, grid: Grid) -> dict:
    """One column of one seed: transform (→ fine-tune) → vanish → ONNX test accuracy in onnxruntime."""
    import onnxruntime as ort

    import vcon_fx
    from vcon_fx.demo.model import TinyViT, example_inputs

    _quiet_worker()
    t0 = time.process_time()
    trained, share, data_aware, distill, allocate, schedule = COLUMNS[column]
    dense = TinyViT(depth=grid.depth)
    dense.load_state_dict(state)
    data = _data()
    images, labels = data.test.tensors
    calibration = data.train.tensors[0][:CALIBRATION_SAMPLES] if (data_aware or allocate) else None
    vm = vcon_fx.transform(dense, method_config(method, strength, data_aware), example_inputs=example_inputs(),
                           calibration=calibration, allocate="params" if allocate else None)
    if trained:
        vcon_fx.finetune(vm, data.train, steps=budget, transition=round(share * budget), lr=grid.lr,
                         batch_size=grid.batch_size, eval_data=data.test, seed=seed, distill=distill,
                         schedule=schedule)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    with tempfile.TemporaryDirectory() as tmp:
        path = vcon_fx.export_onnx(small, Path(tmp) / "m.onnx", (images[:2],))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    accuracy = float((np.argmax(logits, -1) == labels.numpy()).mean())
    return {"seed": seed, "method": method, "strength": strength, "budget": budget, "column": column,
            "accuracy": accuracy, "cpu_s": round(time.process_time() - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parts", default="vit,minilm")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    parser.add_argument("--render-from", type=Path, help="rewrite QUALITY.md from a saved quality_results.json")
    args = parser.parse_args()
    if args.render_from:
        saved = json.loads(args.render_from.read_text())
        grid = Grid(**{k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
                       for k, v in saved["meta"]["grid"].items()})
        (args.out / "QUALITY.md").write_text(markdown(saved["meta"], saved["vit"], saved["minilm"], grid))
        return
    grid = TINY if args.tiny else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started, t0 = datetime.datetime.now(), time.monotonic()
    log = lambda text: print(f"[{time.monotonic() - t0:6.0f} s] {text}", flush=True)  # noqa: E731
    runs, dense, minilm, vit_run = [], {}, [], None
    if "vit" in args.parts:
        with cf.ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            dense = {s: (st, acc) for s, st, acc, _ in pool.map(pretrain_dense, grid.seeds, [grid] * len(grid.seeds))}
            jobs = [pool.submit(vit_run, seed, m, s, b, c, dense[seed][0], grid)
                    for seed in grid.seeds for m, s in grid.settings for b in grid.budgets for c in COLUMNS]
            for job in cf.as_completed(jobs):
                runs.append(job.result())
                log(f"vit {runs[-1]}")
    if "minilm" in args.parts:
        from benchmarks.quality_minilm import minilm_part

        minilm = minilm_part(grid, log, method_config, setting_label)
    saved = args.out / "quality_results.json"
    if "vit" not in args.parts and saved.exists():  # a MiniLM-only rerun keeps the saved ViT tables
        previous = json.loads(saved.read_text())
        runs, dense = previous["vit"], {int(s): (None, a) for s, a in previous["meta"]["dense"].items()}
        vit_run = previous["meta"].get("vit_run") or {k: previous["meta"][k] for k in ("command", "started", "wall_min")}
    command = "python benchmarks/quality.py" + (" --tiny" if args.tiny else "") + \
        (f" --parts {args.parts}" if args.parts != "vit,minilm" else "")
    meta = {"command": command, "grid": asdict(grid),
            "dense": {s: acc for s, (_, acc) in dense.items()}, "started": started.isoformat(timespec="minutes"),
            "wall_min": round((time.monotonic() - t0) / 60, 1), "load": os.getloadavg(), "torch": torch.__version__}
    if vit_run:
        meta["vit_run"] = vit_run
    (args.out / "quality_results.json").write_text(json.dumps({"meta": meta, "vit": runs, "minilm": minilm}, indent=1))
    (args.out / "QUALITY.md").write_text(markdown(meta, runs, minilm, grid))


def markdown(meta: dict, runs: list[dict], minilm: list[dict], grid: Grid) -> str:
    from benchmarks.quality_report import render

    return render(meta, runs, minilm, grid, COLUMNS, WITHOUT_TRANSITION, setting_label)


if __name__ == "__main__":
    main()
