"""Sweep the torchvision zoo through the whole vcon-fx pipeline and write benchmarks/ZOO.md.

Every classification model of `torchvision.models.list_models(module=torchvision.models)`,
randomly initialised (weights=None), at a small input (64×64, or the smallest of 96 / 128 /
160 / 224 / 299 it accepts; ViTs built with image_size=32), goes through

    transform (lowrank, ratio 0.25) → β = 1 identity → β = 0 vanish parity → ONNX parity

using the invariant checks of tests/helpers.py (one helper per invariant). Detection and
segmentation models (weights=None, weights_backbone=None) are tried too and their outcome
listed, and so are the video models (`torchvision.models.video`, clips of the smallest of
VIDEO_SIZES frames × pixels they accept) and the optical-flow model raft_small (two 128×128
frames). Each model runs in its own process with a time limit; results are checkpointed to
benchmarks/zoo_results.json after every model, so an interrupted sweep resumes where it stopped.

    .venv/bin/python benchmarks/zoo_table.py                 # the whole sweep (~30-60 min on 2 cores)
    .venv/bin/python benchmarks/zoo_table.py --only resnet18 vit_b_16 --retry
    .venv/bin/python benchmarks/zoo_table.py --markdown-only # rewrite ZOO.md from the JSON
    .venv/bin/python benchmarks/zoo_table.py --docs          # rewrite docs/zoo.md from the JSON (no sweep)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "zoo_results.json"
TABLE = HERE / "ZOO.md"
DOCS_PAGE = ROOT / "docs" / "zoo.md"
SIZES = (64, 96, 128, 160, 224, 299)
VIDEO_SIZES = ((4, 64), (8, 112), (16, 112), (16, 224))  # (frames, pixels), smallest first
FLOW_SIZE = 128
FAMILIES = ("classification", "segmentation", "detection", "detection backbone", "video", "optical flow")
# the sweep's families whose builders take `weights_backbone`
_BACKBONED = ("segmentation", "detection", "detection backbone")
TIME_LIMIT_S = 900
MACHINE = f"{os.cpu_count()} cores"
RATIO = 0.25
# Constructor arguments that shrink a model's fixed input size (ViTs store it).
BUILD_KWARGS = {"vit_b_16": {"image_size": 32}, "vit_b_32": {"image_size": 32}, "vit_l_16": {"image_size": 32},
                "vit_l_32": {"image_size": 32}, "vit_h_14": {"image_size": 28}}


# ── one model (runs in a child process) ───────────────────────────────────────────────────


def _reason(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[0].split(". Fix: ")[0] if lines else ""  # the table keeps what failed, not the fixes
    return f"{type(exc).__name__}: {text[:600]}" if text else type(exc).__name__


def run_one(name: str, family: str) -> dict:
    """Build `name`, run the pipeline, return a JSON-able record (never raises)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import assert_identity_at_beta_one, assert_onnx_parity, assert_vanish_parity, count_params
    from torchvision import models

    import vcon_fx

    torch.manual_seed(0)
    record: dict = {"model": name, "family": family, "stage": "build"}
    times: dict[str, float] = {}
    record["times"] = times
    t0 = time.perf_counter()
    try:
        kwargs = {"weights": None, **BUILD_KWARGS.get(name, {})}
        builder = models.get_model_builder(name.removesuffix(".backbone"))
        if family in _BACKBONED:
            kwargs["weights_backbone"] = None
        model = detector = builder(**kwargs).eval()
        if family == "detection backbone":
            model = detector.backbone
        record["params"] = count_params(model)
        record["build_kwargs"] = {k: v for k, v in kwargs.items() if v is not None}
        times["build"] = time.perf_counter() - t0

        record["stage"] = "input"
        args, size = _example_inputs(model, name, family)
        record["input"] = size if isinstance(size, int) else f"{size[0]}×{size[1]}×{size[1]}"  # a clip

        record["stage"] = "transform"
        t = time.perf_counter()
        vm = vcon_fx.transform(model, vcon_fx.LowRankConfig(ratio=RATIO), example_inputs=args)
        recipe = vm.meta["vcon"]
        times["transform"] = time.perf_counter() - t
        record["capture"] = recipe.capture
        record["notes"] = list(recipe.notes)
        record["groups"] = len(recipe.groups)
        record["compressed_layers"] = sum(1 for p in recipe.plans.values() if not p.skipped)
        inputs = (args, {})

        record["stage"] = "identity (β = 1)"
        assert_identity_at_beta_one(model, vm, inputs)
        if family == "detection backbone":
            record["stage"] = "detector with the blended backbone (β = 1)"
            _detector_identity(detector, model, vm, size)

        record["stage"] = "vanish parity (β = 0)"
        t = time.perf_counter()
        small = assert_vanish_parity(vm, inputs)
        times["vanish"] = time.perf_counter() - t
        record["params_after"] = count_params(small)
        del vm
        if family == "detection backbone":
            record["stage"] = "detector with the vanished backbone"
            detector.backbone = small
            with torch.no_grad():
                detector([torch.rand(3, size, size)])  # the compressed detector runs end to end
            detector.backbone = model

        record["stage"] = "onnx parity"
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            path = assert_onnx_parity(small, inputs, Path(tmp))
            record["onnx_mb"] = round(path.stat().st_size / 2**20, 2)
        times["onnx"] = time.perf_counter() - t
        record["stage"] = "done"
        record["status"] = "pass"
    except BaseException as exc:  # a model's failure is a row of the table, not a crash
        record["status"] = "fail"
        record["reason"] = _reason(exc)
        record["traceback"] = traceback.format_exc()[-3000:]
    times["total"] = time.perf_counter() - t0
    return record


def _detector_identity(detector, backbone, blended, size: int) -> None:
    """Put the blended backbone (β = 1) into the detector: its detections must not change."""
    import torch

    images = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        ref = detector(images)
        detector.backbone = blended
        try:
            got = detector(images)
        finally:
            detector.backbone = backbone
    for r, g in zip(ref, got):
        for key in r:
            if r[key].shape != g[key].shape or not torch.allclose(r[key].float(), g[key].float(), atol=1e-4, rtol=1e-4):
                raise AssertionError(f"detections ({key}) change when the blended backbone is put back")


def _example_inputs(model, name: str, family: str):
    """The smallest input the model runs on (batch 2), and its size."""
    import torch

    image_size = getattr(model, "image_size", None)
    sizes = (int(image_size),) if image_size else SIZES
    if family.startswith("detection"):
        sizes = (128,) + tuple(s for s in SIZES if s > 128)
    if family == "video":
        sizes = VIDEO_SIZES
    if family == "optical flow":
        sizes = (FLOW_SIZE,)
    last = None
    for size in sizes:
        gen = torch.Generator().manual_seed(0)
        if family == "detection":
            args = ([torch.rand(3, size, size, generator=gen), torch.rand(3, size, size, generator=gen)],)
        elif family == "video":
            frames, pixels = size
            args = (torch.randn(2, 3, frames, pixels, pixels, generator=gen),)
        elif family == "optical flow":
            args = tuple(torch.randn(2, 3, size, size, generator=gen) for _ in range(2))  # two frames
        else:
            args = (torch.randn(2, 3, size, size, generator=gen),)
        try:
            with torch.no_grad():
                model(*args)
            return args, size
        except Exception as exc:  # too small for this model: try the next size
            last = exc
    raise RuntimeError(f"runs on none of the input sizes {sizes}: {_reason(last)}")


# ── the sweep ─────────────────────────────────────────────────────────────────────────────


def all_models() -> list[tuple[str, str]]:
    from torchvision import models

    out = [(n, "classification") for n in models.list_models(module=models)]
    out += [(n, "segmentation") for n in models.list_models(module=models.segmentation)]
    out += [(n, "detection") for n in models.list_models(module=models.detection)]
    # Detection models take lists of images and run data-dependent box code (neither tracer follows
    # it); their backbones are plain image-to-features modules: compress those and put them back
    # (the row checks the detector's detections are unchanged with the blended backbone at β = 1,
    # and that it runs with the vanished one).
    out += [(f"{n}.backbone", "detection backbone") for n in models.list_models(module=models.detection)]
    out += [(n, "video") for n in models.list_models(module=models.video)]
    out += [(n, "optical flow") for n in models.list_models(module=models.optical_flow)]
    return out


def by_size(names: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Smallest first (counted on the meta device: nothing allocated), so a cut-short sweep covers most."""
    import torch
    from torchvision import models

    def size(item):
        name, family = item
        kwargs = {"weights": None, **BUILD_KWARGS.get(name, {})}
        if family in _BACKBONED:
            kwargs["weights_backbone"] = None
        for device in ("meta", "cpu"):  # a few builders (RegNet) do not build on meta
            try:
                with torch.device(device):
                    built = models.get_model_builder(name.removesuffix(".backbone"))(**kwargs)
                    return sum(p.numel() for p in built.parameters())
            except Exception:
                continue
        return 10**12
    return sorted(names, key=size)


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict) -> None:
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
    os.replace(tmp, RESULTS)


def run_child(name: str, family: str, limit: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, family, str(out)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=limit, capture_output=True, text=True)
        if out.stat().st_size:
            return json.loads(out.read_text())
        tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else tail[0][:300]
        return {"model": name, "family": family, "status": "fail", "stage": "worker", "reason": why}
    except subprocess.TimeoutExpired:
        return {"model": name, "family": family, "status": "fail", "stage": "time limit",
                "reason": f"did not finish in {limit} s on this machine", "times": {"total": time.perf_counter() - t}}
    finally:
        out.unlink(missing_ok=True)


def sweep(names: list[tuple[str, str]], retry: bool, limit: int) -> dict:
    for i, (name, family) in enumerate(names, 1):
        if name in load_results() and not retry:
            continue  # done, or claimed by another sweep running beside this one
        claimed = load_results()
        claimed[name] = {"model": name, "family": family, "status": "running", "stage": "started"}
        save_results(claimed)
        t = time.perf_counter()
        record = run_child(name, family, limit)
        record["machine"] = MACHINE
        results = load_results()  # re-read: another sweep (--only ...) may have added rows meanwhile
        results[name] = record
        save_results(results)
        print(f"[{i}/{len(names)}] {name}: {record['status']} ({record.get('stage')}) "
              f"{time.perf_counter() - t:.0f}s {record.get('reason', '')[:160]}", flush=True)
    return load_results()


# ── the table ─────────────────────────────────────────────────────────────────────────────


def _m(n) -> str:
    return f"{n / 1e6:.1f}M" if isinstance(n, (int, float)) else "–"


def markdown(results: dict, machine: str) -> str:
    order = {n: i for i, (n, _) in enumerate(all_models())}
    rows = sorted(results.values(), key=lambda r: order.get(r["model"], 10**6))
    lines = [
        "# The torchvision zoo through vcon-fx",
        "",
        "Written by `benchmarks/zoo_table.py` (`.venv/bin/python benchmarks/zoo_table.py`). Every model is",
        "randomly initialised (`weights=None`, `weights_backbone=None`), run at the smallest input of",
        f"{', '.join(map(str, SIZES))} pixels it accepts (ViTs built with `image_size=32`, vit_h_14 with 28),",
        f"batch 2, and sent through `transform(LowRankConfig(ratio={RATIO}))` → β = 1 identity (≤ 1e-6 rel.) →",
        "vanish at β = 0 (≤ 1e-6 rel. to the blended model) → ONNX export with a dynamic batch → onnxruntime",
        "at batch 2 and 3 (≤ 1e-4 rel.). The checks are those of `tests/helpers.py`.",
        "",
        f"Machine: {machine}, shared with other jobs (test runs, other benchmarks) during the sweep, so the",
        "times are wall times under load. Each model ran in its own process, with a time limit (600-900 s)",
        "and an address-space cap (ZOO_MEMORY_GB, default 14 GB). Rows that hit the time limit under load",
        "were run again (`--only NAME --retry`); the table keeps each model's latest result.",
        "",
    ]
    for family in FAMILIES:
        fam = [r for r in rows if r.get("family") == family]
        if not fam:
            continue
        ok = sum(r["status"] == "pass" for r in fam)
        title = f"## {family.capitalize()}: {ok} of {len(fam)} pass"
        if family == "detection backbone":
            title += " (`transform(model.backbone, ...)`, then `model.backbone = vanished`)"
        lines += [title, "",
                  "| model | params | after vanish | input | capture | groups | status | reason / time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in fam:
            if r["status"] == "running":
                lines.append(f"| {r['model']} | – | – | – | – | – | not finished | the sweep was stopped before it ended |")
                continue
            if r["status"] == "pass":
                why = f"{r.get('times', {}).get('total', 0):.0f} s"
            else:
                why = f"at {r.get('stage')}: {r.get('reason', '')}".replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['model']} | {_m(r.get('params'))} | {_m(r.get('params_after'))} | "
                         f"{r.get('input', '–')} | {r.get('capture', '–')} | {r.get('groups', '–')} | "
                         f"{r['status']} | {why} |")
        lines.append("")
    machines = sorted({r.get("machine", "") for r in rows} - {""})
    if len(machines) > 1:
        lines += ["Rows came from: " + "; ".join(machines), ""]
    notes = sorted({n for r in rows for n in r.get("notes", []) if "use_cache" not in n})
    if notes:
        lines += ["## Capture notes seen", ""] + [f"- {n}" for n in notes[:20]] + [""]
    return "\n".join(lines)


def docs_page(results: dict) -> str:
    """docs/zoo.md: how the sweep runs, counts per family, every model that does not pass with its reason."""
    lines = [
        "# The torchvision zoo through vcon-fx",
        "",
        "Generated by `benchmarks/zoo_table.py --docs` from `benchmarks/zoo_results.json`: do not edit by hand.",
        "The command only reads the JSON; it does not run the sweep again.",
        "",
        "Every model of `torchvision.models.list_models(module=torchvision.models)`, plus the segmentation,",
        "detection, video and optical-flow models, is randomly initialised and built at a small input (64 px,",
        f"or the smallest of {', '.join(map(str, SIZES))} that fits; ViTs built with `image_size=32`, vit_h_14",
        "with 28; video clips of the smallest of " + ", ".join(f"{f}×{p}×{p}" for f, p in VIDEO_SIZES),
        f"(frames × pixels) that fits; raft_small two {FLOW_SIZE}×{FLOW_SIZE} frames). Each goes",
        f"through `transform(LowRankConfig(ratio={RATIO}))` → β = 1 identity → vanish parity → ONNX parity in",
        "onnxruntime at another batch size, with the checks of `tests/helpers.py`.",
        "",
        "Whole detection models take a list of images and run data-dependent box code that neither tracer",
        "follows. Their backbones (`model.backbone`, a plain image → feature-maps module) are compressed",
        "instead. Each backbone row also checks two things: the detector gives the same detections with the",
        "blended backbone put back at β = 1, and it runs end to end with the vanished one. That is a",
        "Python-API workflow ([capture.md](capture.md#detection-backbones)); the CLI's `torchvision:` source",
        "takes classification, segmentation and video models.",
        "",
        "Sizes, capture path, groups and time per model: [benchmarks/ZOO.md](../benchmarks/ZOO.md). The sweep",
        "is a benchmark, not a test (about an hour on 2 cores: `.venv/bin/python benchmarks/zoo_table.py`; the",
        "video and optical-flow rows ran side by side on a 16-core machine: `benchmarks/device_video_sweep.sh`,",
        "then `zoo_table.py --merge`); `make test-zoo` covers seven torchvision families with every method, and",
        "r3d_18, r2plus1d_18 and raft_small (`tests/test_zoo.py`, marked slow).",
        "",
        zoo_summary(results),
    ]
    return "\n".join(lines) + "\n"


def zoo_summary(results: dict) -> str:
    """Counts per family, every model that does not pass with its reason, then the passing models."""
    order = {n: i for i, (n, _) in enumerate(all_models())}
    rows = sorted(results.values(), key=lambda r: order.get(r["model"], 10**6))
    counts = []
    for family in FAMILIES:
        fam = [r for r in rows if r.get("family") == family]
        if fam:
            counts.append(f"{family} {sum(r['status'] == 'pass' for r in fam)} of {len(fam)}")
    lines = ["Passing, per family: " + "; ".join(counts) + ".", "",
             "| model | family | stopped at | reason |", "|---|---|---|---|"]
    for r in rows:
        if r["status"] != "pass":
            reason = r.get("reason", "the sweep did not reach it") if r["status"] != "running" else "not run yet"
            # keep where each tracer stopped; the tracers' own messages are in ZOO.md
            reason = re.sub(r"\) \w+(?:Error|Node): [^;]*", ")", reason.removeprefix("CaptureError: "))
            reason = reason.replace("|", "\\|").replace("\n", " ")
            lines.append(f"| {r['model']} | {r['family']} | {r.get('stage', '–')} | {reason[:400]} |")
    passed = [r["model"] for r in rows if r["status"] == "pass"]
    lines += ["", f"Passing ({len(passed)}): " + ", ".join(passed) + "."]
    return "\n".join(lines)


def write_docs_page(results: dict) -> Path:
    """Write docs/zoo.md from the sweep's results (atomic: temporary file, then rename)."""
    DOCS_PAGE.parent.mkdir(exist_ok=True)
    tmp = DOCS_PAGE.with_suffix(".md.tmp")
    tmp.write_text(docs_page(results))
    os.replace(tmp, DOCS_PAGE)
    return DOCS_PAGE


def machine_line() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    import torch
    return f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("NAME", "FAMILY", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="model names (default: all)")
    parser.add_argument("--family", choices=FAMILIES)
    parser.add_argument("--retry", action="store_true", help="run models that already have a result again")
    parser.add_argument("--limit", type=int, default=TIME_LIMIT_S, help="seconds per model")
    parser.add_argument("--markdown-only", action="store_true")
    parser.add_argument("--merge", metavar="DIR", help="add the worker JSONs in DIR (device_video_sweep.sh) to the results")
    parser.add_argument("--machine", default="another machine", help="with --merge: where those rows ran")
    parser.add_argument("--docs", action="store_true", help="write docs/zoo.md from the JSON (runs no model)")
    parser.add_argument("--largest-first", action="store_true", help="for a second sweep beside the first")
    args = parser.parse_args(argv)
    if args.worker:
        import resource

        # A model too big for this machine fails alone (MemoryError) instead of waking the OOM killer.
        cap = int(os.environ.get("ZOO_MEMORY_GB", "14")) * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        import torch
        torch.set_num_threads(int(os.environ.get("ZOO_THREADS", 0)) or max(1, (os.cpu_count() or 2)))
        name, family, out = args.worker
        record = run_one(name, family)
        Path(out).write_text(json.dumps(record))
        return 0
    if args.docs:
        print(f"wrote {write_docs_page(load_results()).relative_to(ROOT)}")
        return 0
    if args.merge:
        results = load_results()
        for path in sorted(Path(args.merge).glob("*.json")):
            record = json.loads(path.read_text())
            record["machine"] = args.machine
            results[record["model"]] = record
        save_results(results)
        print(f"merged {len(list(Path(args.merge).glob('*.json')))} rows from {args.merge}")
        return 0
    names = all_models()
    if args.only:
        names = [(n, f) for n, f in names if n in set(args.only)]
    if args.family:
        names = [(n, f) for n, f in names if f == args.family]
    results = load_results() if args.markdown_only else sweep(by_size(names)[::-1] if args.largest_first else by_size(names),
                                                                  args.retry, args.limit)
    TABLE.write_text(markdown(results, machine_line()) + "\n")
    print(f"wrote {TABLE} ({len(results)} models)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
