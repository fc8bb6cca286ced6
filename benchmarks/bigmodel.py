"""A ~1B-parameter Llama through transform → vanish → export on a small CPU machine: time and peak memory.

A Llama-shaped causal LM is built from a `LlamaConfig` (random weights: nothing is downloaded,
and neither memory nor time depends on the values) and saved with `save_pretrained`. Then the
command line runs each stage in its own process, as a user would:

    vcon-fx inspect   FOLDER --method quant --bits 4 --dtype bf16 --json   (the estimate)
    vcon-fx transform FOLDER --method quant --bits 4 --dtype bf16 -o m.vcon
    vcon-fx vanish    m.vcon --force -o m.small                           (β = 0 at once: no fine-tuning)
    vcon-fx export    m.small --onnx m.onnx --matmul-nbits                 (KV cache, INT4 MatMulNBits)

Each stage's wall time and peak resident memory (the process's own ru_maxrss, read with
`os.wait4`) go into the table, next to the size of the model in float32 and bf16 and the
estimate `inspect` prints. Fine-tuning is not timed (it needs data and hours at this size on two
cores); its one-step peak is the estimate's.

Usage:
    .venv/bin/python benchmarks/bigmodel.py                      # ~1B, writes benchmarks/BIGMODEL.md
    .venv/bin/python benchmarks/bigmodel.py --size 300m --out /tmp/b.md
    .venv/bin/python benchmarks/bigmodel.py --size tiny --out /tmp/b.md   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, machine_line, markdown_table, write_text_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# hidden, layers, intermediate, heads, vocab (full multi-head attention)
SIZES = {"tiny": (64, 2, 128, 4, 256), "300m": (1024, 16, 2816, 16, 32000), "1b": (2048, 16, 5632, 32, 32000)}
METHOD = ("--method", "quant", "--bits", "4")
GIB = 1024 ** 3


def build(folder: Path, size: str) -> dict:
    """Save the Llama of `size` to `folder` (in this process: it is freed before the stages run)."""
    import torch
    import transformers as T

    hidden, layers, inter, heads, vocab = SIZES[size]
    config = T.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                           num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                           max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(folder)
    return {"params": params, "hidden": hidden, "layers": layers, "intermediate": inter, "vocab": vocab}


def stage(name: str, argv: list[str], cwd: Path) -> dict:
    """Run `python -m vcon_fx ARGV` in a fresh process: its wall time, peak RSS and output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen([sys.executable, "-m", "vcon_fx", *argv], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{text[-4000:]}")
    print(f"{name}: {seconds:.0f} s, peak {usage.ru_maxrss / 1024 ** 2:.2f} GiB", flush=True)
    return {"stage": name, "seconds": seconds, "peak_gib": usage.ru_maxrss * 1024 / GIB, "output": text}


def run(size: str, work: Path) -> tuple[dict, list[dict], dict]:
    model = build(work / "llama", size)
    print(f"built {model['params'] / 1e9:.2f}B parameters", flush=True)
    stages = [stage("inspect (estimate)", ["inspect", "llama", *METHOD, "--dtype", "bf16", "--json"], work)]
    estimate = json.loads(stages[0]["output"][stages[0]["output"].index("{"):])["memory"]
    stages.append(stage("transform (bf16)", ["transform", "llama", *METHOD, "--dtype", "bf16", "-o", "m.vcon"], work))
    stages.append(stage("vanish", ["vanish", "m.vcon", "--force", "-o", "m.small"], work))
    stages.append(stage("export (MatMulNBits, KV cache)", ["export", "m.small", "--onnx", "m.onnx", "--matmul-nbits"],
                        work))
    files = {name: sum(f.stat().st_size for f in (work / name).glob("*")) if (work / name).is_dir()
             else sum(f.stat().st_size for f in work.glob(name + "*")) for name in ("llama", "m.vcon", "m.small", "m.onnx")}
    return model, stages, {"estimate": estimate, "files": files}


def report(size: str, model: dict, stages: list[dict], extra: dict) -> str:
    params, est, files = model["params"], extra["estimate"], extra["files"]
    rows = [[s["stage"], f"{s['seconds']:.0f} s", f"{s['peak_gib']:.2f} GiB"] for s in stages]
    sizes = markdown_table(["", "GiB"], [
        ["weights in float32 (4 bytes × parameters)", f"{params * 4 / GIB:.2f}"],
        ["weights in bf16", f"{params * 2 / GIB:.2f}"],
        ["estimate: transform peak (bf16; model + twins + work space)", f"{est['transform_peak'] / GIB:.2f}"],
        ["estimate: one training step (model + gradients + Adam, activations excluded)", f"{est['step_peak'] / GIB:.2f}"],
        *[[f"file: {name}", f"{b / GIB:.2f}"] for name, b in files.items()]])
    return "\n".join([
        "# A ~1B-parameter Llama on a small CPU machine", "",
        f"Machine: {machine_line()}. Command: `{command_line()}`.", "",
        f"Model: Llama-shaped, {params / 1e9:.2f}B parameters (hidden {model['hidden']}, {model['layers']} layers, "
        f"intermediate {model['intermediate']}, vocab {model['vocab']}, untied LM head), random weights from a "
        "`LlamaConfig`, saved with `save_pretrained` (float32). Method: `quant --bits 4` on every Linear of the blocks "
        "(the embedding and LM head stay dense by default). Each stage is the command line in its own process; "
        "peak memory is that process's maximum resident set size.", "",
        markdown_table(["stage", "wall time", "peak memory"], rows), "",
        sizes, "",
        "What the numbers say:", "",
        "- `--dtype bf16` reads the folder straight into bf16 (no float32 copy first), and a quant twin shares the "
        "dense weight (its latent weight IS the dense layer's Parameter), so transform holds one bf16 copy of the "
        "model plus one layer's float32 work space at a time (`copy_model=False`: the command line never copies "
        "the whole model).",
        "- vanish rebuilds the source in bf16 from the recipe, loads the artifact's weights into it and deletes the "
        "dense branches in place: again one copy.",
        "- export rebuilds in float32 (onnxruntime's CPU kernels take float32): the vanished model, the source "
        "re-captured with its KV cache, and the exporter's own graph are what its peak holds; the INT4 weights are "
        "packed as MatMulNBits afterwards.",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(SIZES), default="1b")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "BIGMODEL.md"))
    parser.add_argument("--work", help="folder for the model and artifacts (default: a temporary one, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        model, stages, extra = run(args.size, Path(tmp))
    write_text_atomic(args.out, report(args.size, model, stages, extra))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
