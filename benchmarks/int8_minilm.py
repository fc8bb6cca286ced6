"""int8 MiniLM with default export flags: the kernel `export` picks, against `--dynamic-int8` and quantize_dynamic.

Issue 15 asks that a quantized transformer be fast without reading the footnotes: before it,
`vcon-fx export` of an int8 MiniLM ran weight-only (1.9× slower than onnxruntime's
`quantize_dynamic`) unless `--dynamic-int8` was given. This script builds the pretrained
all-MiniLM-L6-v2 as `quant --bits 8` (β = 0, vanished, no fine-tuning), exports it the way the
CLI does by default (`integer_export(kernel="auto")`, no calibration data), with the dynamic
kernel forced (`--dynamic-int8`), and with auto plus calibration data (real English sentences
from CPython's pydoc topics: the static kernel where it stays faithful), and times them against
the dense ONNX and `quantize_dynamic` of it, interleaved round by round in one process
(1 thread, batch 1 and 8, sequence 128). Output: benchmarks/INT8_MINILM.md.

    python benchmarks/int8_minilm.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import (command_line, cosine, fmt_ratio, interleave, machine, machine_line,  # noqa: E402
                    markdown_table, ort_session, ratio_of, write_text_atomic)
from deploy import load_minilm  # noqa: E402

SEQ = 128


def calibration_batches(loaded, count: int = 64, batch: int = 8) -> list[tuple[tuple, dict]]:
    """(args, kwargs) batches of real English sentences, tokenized by MiniLM's tokenizer (pure)."""
    import torch
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from vcon_fx.sources.load import minilm_path

    text = " ".join(topics.values()).split(". ")
    sentences = [s.strip() for s in text if len(s.split()) > 6][:count]
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    out = []
    for i in range(0, len(sentences), batch):
        enc = tok(sentences[i:i + batch], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        kwargs = {k: enc[k].to(torch.long) for k in loaded.kwargs if k in enc}
        args = tuple(enc["input_ids"] for _ in loaded.args)
        out.append((args, kwargs))
    return out


def build(work: Path) -> tuple[dict[str, Path], dict[str, str], object]:
    """The dense ONNX, the vcon int8 files and quantize_dynamic's: label → path; label → kernels said."""
    import vcon_fx
    from onnxruntime.quantization import quantize_dynamic
    from vcon_fx.export.integer import integer_export
    from vcon_fx.methods import QuantConfig

    loaded = load_minilm(SEQ)
    files = {"dense fp32": work / "dense.onnx"}
    vcon_fx.export_onnx(loaded.module, files["dense fp32"], loaded.args, example_kwargs=loaded.kwargs,
                        seq_inputs=loaded.seq_inputs)
    vm = vcon_fx.transform(loaded.module, QuantConfig(bits=8), example_inputs=loaded.args,
                           example_kwargs=loaded.kwargs, seq_inputs=loaded.seq_inputs)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    said = {}
    runs = (("vcon int8, export default (auto)", "auto", None),
            ("vcon int8, --dynamic-int8", "dynamic", None),
            ("vcon int8, auto + --calibration-data", "auto", calibration_batches(loaded)))
    for label, kernel, calibration in runs:
        path = work / f"{len(files)}.onnx"
        report = integer_export(small, path, loaded.args, kernel=kernel, example_kwargs=loaded.kwargs,
                                seq_inputs=loaded.seq_inputs, calibration=calibration)
        files[label] = path
        counts: dict[str, int] = {}
        for k in report.layers.values():
            counts[k] = counts.get(k, 0) + 1
        said[label] = ", ".join(f"{k} ×{n}" for k, n in counts.items())
    files["onnxruntime quantize_dynamic"] = work / "ort.onnx"
    quantize_dynamic(str(files["dense fp32"]), str(files["onnxruntime quantize_dynamic"]))
    return files, said, loaded


def measure(files: dict[str, Path], loaded, rounds: int) -> list[list]:
    """Rows of the table: latency ratios to dense and to quantize_dynamic at batch 1 and 8, cosine to dense."""
    from vcon_fx.bench.worker import session_config

    sessions = {label: ort_session(path, 1, options=session_config(path)) for label, path in files.items()}
    results = {}
    for batch in (1, 8):
        feeds = loaded.feeds(batch)
        fns = {label: (lambda s=s: s.run(None, feeds)) for label, s in sessions.items()}
        times = interleave(fns, rounds=rounds, iters=3, budget_s=90)
        dense_out = sessions["dense fp32"].run(None, feeds)[0]
        results[batch] = {label: (ratio_of(times, label, "dense fp32"),
                                  ratio_of(times, label, "onnxruntime quantize_dynamic"),
                                  cosine(np.asarray(s.run(None, feeds)[0]), np.asarray(dense_out)))
                          for label, s in sessions.items()}
    rows = []
    for label, path in files.items():
        row = [label, f"{path.stat().st_size / 1e6:.1f}"]
        for batch in (1, 8):
            to_dense, to_ort, cos = results[batch][label]
            row += [f"{to_dense['ms']:.1f}", fmt_ratio(to_dense), fmt_ratio(to_ort), f"{cos:.4f}"]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "INT8_MINILM.md"))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    info, start = machine(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        files, said, loaded = build(Path(tmp))
        rows = measure(files, loaded, args.rounds)
    headers = ["model", "MB"] + [h.format(b) for b in (1, 8) for h in
                                 ("b{} ms", "b{} ÷ dense", "b{} ÷ quantize_dynamic", "b{} cosine to dense")]
    text = "\n".join([
        "# int8 MiniLM with default export flags",
        "",
        f"Made by `{command_line()}` in {(time.perf_counter() - start) / 60:.1f} min. {machine_line(info)}",
        "",
        "all-MiniLM-L6-v2 (pretrained) as `quant --bits 8`, β = 0, vanished, no fine-tuning; sequence 128, "
        "onnxruntime CPU, 1 thread; sessions opened with the options `vcon-fx bench` uses for each file; "
        "ratios are medians over interleaved rounds (min–max in brackets), < 1 is faster.",
        "",
        markdown_table(headers, rows),
        "",
        "Kernels each vcon export chose (per quantized layer):",
        "",
        *[f"- {label}: {kinds}" for label, kinds in said.items()],
        "",
    ])
    write_text_atomic(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
