"""The README's command-line quickstart, run as written, so the README cannot drift from what works.

The files it names are made the usual way: `model.pt2` by `torch.export.save(torch.export.export(
model, (x,)))` at batch 1 without `dynamic_shapes`, `train.safetensors` from real handwritten
digits. `compress` runs in one folder, the stage-by-stage commands in another (both write
`model.onnx`).
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import save_file

from vcon_fx.cli.main import main

from pickles import DigitsMLP

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[list[str]]:
    """The vcon-fx commands of the README's command-line quickstart block, comments dropped."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart: the command line"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return [shlex.split(ln) for ln in lines if ln.startswith("vcon-fx ")]


def user_files(folder: Path) -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.export.save(torch.export.export(DigitsMLP().eval(), (torch.rand(1, 64),)), folder / "model.pt2")
    digits = load_digits()
    save_file({"inputs": (digits.data / 16).astype(np.float32), "labels": digits.target.astype(np.int64)},
              str(folder / "train.safetensors"))


def vcon(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv[1:])
    assert code == 0, f"{shlex.join(argv)} exited {code}:\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def test_the_readme_names_the_commands_this_test_runs():
    commands = [c[1] for c in quickstart_commands()]
    assert commands[0] == "compress" and {"transform", "finetune", "vanish", "export", "bench"} <= set(commands)


@pytest.mark.parametrize("part", ["compress", "stage by stage"])
def test_the_readme_quickstart_runs_as_written(part, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    user_files(tmp_path)
    commands = quickstart_commands()
    commands = commands[:1] if part == "compress" else commands[1:]
    printed = "".join(vcon(argv) for argv in commands)
    assert Path("model.onnx").is_file()
    assert "onnxruntime vs PyTorch" in printed  # export --check ran and passed
    if part == "stage by stage":
        assert Path("model.small").is_dir() and Path("dense.onnx").is_file()


def language_model_commands() -> list[list[str]]:
    """The vcon-fx commands of the README's language-model quickstart block."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart: a language model"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(ln) for ln in block.splitlines() if ln.startswith("vcon-fx ")]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "t5"])  # the README: "… T5 and BART too"
def test_the_readme_language_model_quickstart_runs_as_written(tmp_path, monkeypatch, family):
    from user_sources import hf_causal_lm, hf_seq2seq_lm

    # a Llama (or T5) folder written by save_pretrained, with a tokenizer
    source = (hf_causal_lm if family == "llama" else hf_seq2seq_lm)(tmp_path)
    Path(source.model).rename(tmp_path / "my-llm")
    Path(source.data).rename(tmp_path / "text.txt")
    monkeypatch.chdir(tmp_path)
    commands = language_model_commands()
    assert [c[1] for c in commands] == ["compress", "generate"]
    said = [vcon(argv) for argv in commands]
    assert (tmp_path / "llm.onnx").is_file() and "MatMulNBits" in {n.op_type for n in onnx.load(
        str(tmp_path / "llm.onnx")).graph.node}
    assert "The quick brown fox" in " ".join(said[1].split())
    assert family == "llama" or (tmp_path / "llm.encoder.onnx").is_file()
