"""Static int8 benchmark: vcon-fx's static int8 export against dense fp32 and onnxruntime's quantize_static.

    python benchmarks/int8.py --out benchmarks/INT8.md [--json results.json] [--tiny]

Latency (random-weight torchvision CNNs at 224 px, batch 1 and 8, 1 and 2 threads): for each model
three files, timed interleaved round by round in this one process:
- dense: `export_onnx` of the fp32 model;
- vcon-fx static int8: `transform(quant bits=8 act_bits=8, stem and head included)`, activation
  ranges observed in train mode at β = 0 on the calibration batches (the stand-in for
  fine-tuning a random model), `vanish`, `integer_export(kernel="static")`;
- onnxruntime `quantize_static`: its recommended `quant_pre_process`, then QDQ, uint8
  activations, int8 per-channel weights, MinMax calibration on the same batches.

Accuracy (a small residual CNN trained on scikit-learn's digits, 360 test images) on the
exported ONNX in onnxruntime: dense; quantize_static calibrated on the first training images;
vcon-fx static int8 fine-tuned abrupt (β = 0 from step 0) and VCON (β falls over half the
steps); plus the PyTorch fake-quant model's accuracy and how far onnxruntime's outputs are from it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, fmt_ratio, interleave, machine, machine_line, markdown_table, ratio_of, ort_session, write_text_atomic  # noqa: E402

MODELS = ("resnet18", "resnet50", "mobilenet_v3_large", "efficientnet_b0")
GOALS = "resnet50 static int8 ≥ 2× faster than dense fp32 (latency ratio ≤ 0.5); latency ≤ 1.05× quantize_static's"


def build_files(name: str, size: int, folder: Path, calibration: list[torch.Tensor]) -> dict:
    """The three ONNX files of one model, and what each holds (kernel counts, islands, notes)."""
    import torchvision

    import vcon_fx
    from vcon_fx.export.integer import integer_export
    from vcon_fx.export.islands import find_islands, kernel_counts, optimized_graph

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    example = (torch.randn(2, 3, size, size),)
    files = {"dense": folder / f"{name}.dense.onnx", "vcon": folder / f"{name}.vcon.onnx",
             "ort": folder / f"{name}.ort.onnx"}
    started = time.perf_counter()
    vcon_fx.export_onnx(model, files["dense"], example)
    vm = vcon_fx.transform(model, vcon_fx.QuantConfig(bits=8, act_bits=8), example_inputs=example,
                           selection=vcon_fx.SelectionConfig(include_stem=True, include_head=True))
    vcon_fx.set_beta(vm, 0.0)
    vm.train()
    with torch.no_grad():
        for batch in calibration:
            vm(batch)
    vm.eval()
    report = integer_export(vcon_fx.vanish(vm), files["vcon"], example, kernel="static")
    _quantize_static(files["dense"], files["ort"], folder, calibration)
    info = {"build_s": time.perf_counter() - started, "notes": report.notes}
    for key, path in files.items():
        graph = optimized_graph(path)
        info[key] = {"kernels": _conv_kernels(kernel_counts(graph)), "islands": len(find_islands(graph)),
                     "mb": path.stat().st_size / 1e6}
    return {"files": {k: str(v) for k, v in files.items()}, **info}


def _quantize_static(dense: Path, out: Path, folder: Path, calibration: list[torch.Tensor]) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = folder / f"{dense.stem}.pre.onnx"
    quant_pre_process(str(dense), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"x": b.numpy()} for b in calibration])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)


def _conv_kernels(counts: dict[str, int]) -> dict[str, int]:
    keep = ("Conv", "FusedConv", "QLinearConv", "MatMul", "Gemm", "QGemm", "MatMulIntegerToFloat", "QLinearAdd",
            "Add", "QLinearMul", "QLinearGlobalAveragePool", "ReduceMean", "GlobalAveragePool")
    return {k: v for k, v in counts.items() if k in keep}


def time_model(files: dict, size: int, batches: tuple[int, ...], threads: tuple[int, ...], rounds: int,
               iters: int) -> list[dict]:
    """Ratios vcon/dense, vcon/ort and ort/dense per (batch, threads), timed interleaved."""
    from vcon_fx.bench.worker import session_config

    rows = []
    for t in threads:
        sessions = {k: ort_session(p, t, options=session_config(p)) for k, p in files.items()}
        for b in batches:
            feed = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
            fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: feed})) for k, s in sessions.items()}
            # batch 1 runs are short and noisier: more of them for the same time
            times = interleave(fns, rounds=rounds * (2 if b == 1 else 1), iters=iters + (1 if b == 1 else 0), warmup=1)
            rows.append({"batch": b, "threads": t, "dense_ms": 1e3 * float(np.median(times["dense"])),
                         "vcon_vs_dense": ratio_of(times, "vcon", "dense"), "vcon_vs_ort": ratio_of(times, "vcon", "ort"),
                         "ort_vs_dense": ratio_of(times, "ort", "dense")})
    return rows


# ── accuracy on a task with labels ─────────────────────────────────────────────────────────


class DigitsCNN(torch.nn.Module):
    """Conv-BN-ReLU stem, two residual blocks (the second strided, with a 1×1 downsample), average pool, Linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.a1, self.a2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.an1, self.an2 = nn.BatchNorm2d(width), nn.BatchNorm2d(width)
        self.b1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(2 * width), nn.BatchNorm2d(2 * width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x):
        relu = torch.nn.functional.relu
        x = self.stem(x)
        x = relu(x + self.an2(self.a2(relu(self.an1(self.a1(x))))))
        x = relu(self.down(x) + self.bn2(self.b2(relu(self.bn1(self.b1(x))))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _ort_outputs(path: Path, images: torch.Tensor) -> np.ndarray:
    session = ort_session(path, 2)
    return session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]


def accuracy_rows(folder: Path, *, tiny: bool) -> dict:
    """Accuracy of dense, quantize_static and vcon-fx static int8 (calibrated, abrupt, VCON) in onnxruntime."""
    import copy

    import vcon_fx
    from vcon_fx.demo.model import load_digits_data, pretrain
    from vcon_fx.export.integer import integer_export

    data = load_digits_data()
    images, labels = data.test.tensors
    train_x = data.train.tensors[0]
    calibration = list(train_x[:64 if tiny else 256].split(32))
    torch.manual_seed(0)
    dense = DigitsCNN()
    pretrain(dense, data.train, steps=20 if tiny else 200)
    example = (train_x[:2],)
    steps = 4 if tiny else 100
    acc, notes, rows = {}, [], []

    def score(label: str, path: Path, torch_model=None) -> None:
        out = _ort_outputs(path, images)
        acc[label] = float((out.argmax(-1) == labels.numpy()).mean())
        row = [label, f"{acc[label]:.4f}", "", "", ""]
        if torch_model is not None:
            with torch.no_grad():
                ref = torch_model(images).numpy()
            row[2:] = [f"{float((ref.argmax(-1) == labels.numpy()).mean()):.4f}",
                       f"{np.abs(out - ref).max() / np.abs(ref).max():.3%}", f"{(out.argmax(-1) == ref.argmax(-1)).mean():.4f}"]
        rows.append(row)

    vcon_fx.export_onnx(dense, folder / "digits.dense.onnx", example)
    score("dense fp32", folder / "digits.dense.onnx", dense)
    _quantize_static(folder / "digits.dense.onnx", folder / "digits.ort.onnx", folder, calibration)
    score("onnxruntime quantize_static", folder / "digits.ort.onnx")
    selection = vcon_fx.SelectionConfig(include_stem=True, include_head=True)
    ptq = vcon_fx.transform(copy.deepcopy(dense), vcon_fx.QuantConfig(bits=8), example_inputs=example, selection=selection)
    vcon_fx.set_beta(ptq, 0.0)
    small = vcon_fx.vanish(ptq)
    integer_export(small, folder / "digits.ptq.onnx", example, kernel="static", calibration=[((b,), {}) for b in calibration])
    score("vcon-fx static int8, no fine-tuning (calibrated like quantize_static)", folder / "digits.ptq.onnx", small)
    for label, transition in (("abrupt", 0), ("VCON", steps // 2)):
        vm = vcon_fx.transform(copy.deepcopy(dense), vcon_fx.QuantConfig(bits=8, act_bits=8), example_inputs=example,
                               selection=selection)
        started = time.perf_counter()
        vcon_fx.finetune(vm, data.train, vcon_fx.FinetuneConfig(steps=steps, transition=transition, batch_size=64, lr=1e-4))
        small = vcon_fx.vanish(vm)
        report = integer_export(small, folder / f"digits.{label}.onnx", example, kernel="static")
        score(f"vcon-fx static int8, {label}", folder / f"digits.{label}.onnx", small)
        notes.append(f"{label}: {steps} fine-tuning steps (transition {transition}) in {time.perf_counter() - started:.0f} s; "
                     + "; ".join(report.notes))
    table = markdown_table(["model", "accuracy (ONNX, onnxruntime)", "accuracy (PyTorch)",
                            "max |onnxruntime − PyTorch| / max |PyTorch|", "same prediction"], rows)
    notes.insert(0, f"{len(labels)} test images; dense pre-trained {20 if tiny else 200} steps; quantize_static and the "
                    f"calibrated row see the first {sum(len(b) for b in calibration)} training images; the PyTorch "
                    "model of the calibrated row quantizes weights only, so its difference column is the activation "
                    "quantization itself, where the fine-tuned rows compare with their own fake-quant model")
    return {"table": table, "acc": acc, "notes": notes}


def render(results: dict) -> str:
    lines = ["# Static int8: vcon-fx against dense fp32 and onnxruntime's quantize_static", "",
             f"Made by `{results['command']}` in {results['minutes']:.1f} min. Machine: {results['machine']}.", "",
             "How to read it:",
             "- Latency ratios are medians over interleaved rounds in one process (in brackets the min–max over "
             "rounds); < 1 is faster. vcon/dense is the speed-up the file buys, vcon/ort compares with onnxruntime's "
             "own `quantize_static` (QDQ, `quant_pre_process`, uint8 activations, int8 per-channel weights, the same "
             "calibration batches).",
             "- Every session opens with `vcon_fx.bench.worker.session_config(path)` (what `vcon-fx bench` uses): for "
             "static int8 files that is onnxruntime's defaults, graph optimizations on, which fuse the QDQ pairs.",
             "- Kernels are counted on onnxruntime's optimized graph (ORT_ENABLE_EXTENDED); islands are float ops "
             "between integer kernels (`vcon_fx/export/islands.py`).", "",
             f"Goals: {GOALS}; accuracy ≥ quantize_static's.", "", "## Latency", ""]
    for name, model in results["latency"].items():
        lines += [f"### {name}", ""]
        rows = [[r["batch"], r["threads"], f"{r['dense_ms']:.1f}", fmt_ratio(r["vcon_vs_dense"]),
                 fmt_ratio(r["vcon_vs_ort"]), fmt_ratio(r["ort_vs_dense"])] for r in model["timing"]]
        lines += [markdown_table(["batch", "threads", "dense ms", "vcon static / dense", "vcon static / quantize_static",
                                  "quantize_static / dense"], rows), ""]
        for key, label in (("vcon", "vcon-fx static int8"), ("ort", "quantize_static"), ("dense", "dense")):
            held = model[key]
            lines.append(f"- {label}: {held['mb']:.1f} MB, {held['islands']} island(s), kernels {json.dumps(held['kernels'])}")
        lines += [f"- export notes: {'; '.join(model['notes'])}", ""]
    lines += ["## Accuracy (digits CNN, exported ONNX in onnxruntime)", "", results["accuracy"]["table"], ""]
    lines += [f"- {note}" for note in results["accuracy"]["notes"]] + ["", "## Goals", ""]
    lines += [f"- {line}" for line in results["goals"]]
    return "\n".join(lines) + "\n"


def goals(results: dict) -> list[str]:
    out = []
    r50 = results["latency"].get("resnet50")
    if r50:
        for row in r50["timing"]:
            speed, versus = row["vcon_vs_dense"]["ratio"], row["vcon_vs_ort"]["ratio"]
            out.append(f"resnet50 batch {row['batch']}, {row['threads']} thread(s): {1 / speed:.2f}× faster than dense "
                       f"({'MET' if speed <= 0.5 else 'MISSED'} ≥ 2×); {versus:.2f}× quantize_static's latency "
                       f"({'MET' if versus <= 1.05 else 'MISSED'} ≤ 1.05×)")
    acc = results["accuracy"]["acc"]
    ort = acc.get("onnxruntime quantize_static")
    for key in ("vcon-fx static int8, abrupt", "vcon-fx static int8, VCON"):
        if key in acc and ort is not None:
            out.append(f"{key}: {acc[key]:.4f} vs quantize_static {ort:.4f} ({'MET' if acc[key] >= ort else 'MISSED'})")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("INT8.md")))
    parser.add_argument("--json")
    parser.add_argument("--tiny", action="store_true", help="one small model, one setting: a smoke run")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    tiny = args.tiny
    models, size = (("resnet18",), 32) if tiny else (MODELS, 224)
    batches, threads, rounds, iters = ((1,), (1,), 2, 1) if tiny else ((1, 8), (1, 2), 5, 2)
    torch.manual_seed(0)
    calibration = [torch.randn(2, 3, size, size) for _ in range(2 if tiny else 4)]
    results = {"command": command_line(), "machine": machine_line(machine()), "latency": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            built = build_files(name, size, Path(tmp), calibration)
            built["timing"] = time_model({k: Path(v) for k, v in built.pop("files").items()}, size, batches, threads,
                                         rounds, iters)
            results["latency"][name] = built
            print(f"{name}: {built['timing'][0]['vcon_vs_dense']['ratio']:.2f}× dense", file=sys.stderr)
        results["accuracy"] = accuracy_rows(Path(tmp), tiny=tiny)
    results["goals"] = goals(results)
    results["minutes"] = (time.perf_counter() - started) / 60
    write_text_atomic(args.out, render(results))
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
