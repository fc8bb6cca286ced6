"""`vcon-fx finetune`: the tuned artifact and final line, refusals, SIGINT + --resume, torchrun."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vcon_fx
from vcon_fx.cli.main import INTERRUPTED
from vcon_fx.io.artifact import load
from vcon_fx.cli.finetune import add_finetune_parser, cmd_finetune, default_output
from vcon_fx.errors import OutputExistsError, StageError, UsageError
from vcon_fx.sources.load import load_model
from vcon_fx.graph.blend import get_betas

from test_finetune import TinyMLP

PY = sys.executable
ENTRY = ["-m", "vcon_fx"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A .pt2 source, its blended artifact, and labelled / unlabelled data."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = TinyMLP(dropout=0.1).eval()
    ep = torch.export.export(model, (torch.randn(4, 8),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(ep, root / "tiny.pt2")
    lm = load_model(root / "tiny.pt2")
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=2), example_inputs=lm.example_args, source=lm.source)
    vcon_fx.save(vm, root / "tiny.vcon")
    gen = np.random.default_rng(1)
    x = gen.normal(size=(64, 8)).astype(np.float32)
    np.savez(root / "train.npz", inputs=x, labels=(x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5))
    np.savez(root / "plain.npz", inputs=x)
    return root


def run(argv: list[str]) -> int:
    """Parse with the sub-command's own parser and call it, as cli.main does."""
    parser = argparse.ArgumentParser(prog="vcon-fx")
    add_finetune_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_finetune(parser.parse_args(["finetune", *argv]))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_finetune_writes_a_tuned_artifact_and_reports_before_after(files, tmp_path, capsys):
    out = tmp_path / "tuned"
    log = tmp_path / "log.jsonl"
    code = run([str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "20", "--transition", "25%",
                "--lr", "1e-2", "--batch-size", "16", "--log", str(log), "-o", str(out)])
    assert code == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "accuracy" in last and "original" in last and "after" in last and "wrote" in last
    tuned = load(out)
    assert set(get_betas(tuned).values()) == {0.0}
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(21)) and rows[5]["beta"] == 1 - 4 / 5
    assert not (tmp_path / "tuned.ckpt").exists()  # checkpoints only when asked for or interrupted


def test_distillation_and_the_default_output_name(files, tmp_path, capsys):
    src = tmp_path / "m.vcon"
    src.symlink_to(files / "tiny.vcon", target_is_directory=True)
    assert default_output(str(src)) == tmp_path / "m.tuned"
    assert run([str(src), "--data", str(files / "plain.npz"), "--steps", "4", "--transition", "0"]) == 0
    assert "cosine" in capsys.readouterr().out and (tmp_path / "m.tuned" / "recipe.json").is_file()


def test_refusals(files, tmp_path):
    with pytest.raises(StageError, match="not a vcon artifact.*vcon-fx transform"):
        run([str(files), "--data", str(files / "train.npz"), "--steps", "2"])
    with pytest.raises(UsageError, match="--transition"):
        run([str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "2", "--transition", "abc",
             "-o", str(tmp_path / "x")])
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        run([str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "2", "-o", str(tmp_path / "exists")])
    small = tmp_path / "small"
    vm = load(files / "tiny.vcon")
    vcon_fx.set_beta(vm, 0.0)
    vcon_fx.save(vcon_fx.vanish(vm), small)
    with pytest.raises(StageError, match="already vanished"):
        run([str(small), "--data", str(files / "train.npz"), "--steps", "2"])


def test_sigint_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(files, tmp_path):
    steps = "300"
    common = ["--data", str(files / "train.npz"), "--steps", steps, "--batch-size", "8", "--lr", "1e-2"]
    out, log = tmp_path / "run", tmp_path / "run.jsonl"
    argv = [PY, *ENTRY, "finetune", str(files / "tiny.vcon"), *common, "-o", str(out), "--log", str(log)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == INTERRUPTED, err[-2000:]
    assert "--resume" in err
    checkpoints = sorted((tmp_path / "run.ckpt").iterdir())
    assert len(checkpoints) == 1 and checkpoints[0].name.startswith("step-")
    stopped = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped < int(steps) and not out.exists()

    resumed = subprocess.run(argv + ["--resume"], capture_output=True, text=True, env=env, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {stopped}" in resumed.stdout
    logged = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert logged == list(range(int(steps) + 1))

    straight = tmp_path / "straight"
    assert run([str(files / "tiny.vcon"), *common, "-o", str(straight)]) == 0
    a, b = tensors(out), tensors(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_processes(files, tmp_path):
    out = tmp_path / "ddp"
    torchrun = str(Path(PY).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *ENTRY, "finetune",
                           str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "6",
                           "--batch-size", "8", "--save-every", "3", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 alone prints and writes
    assert set(get_betas(load(out)).values()) == {0.0}
    assert sorted(p.name for p in (tmp_path / "ddp.ckpt").iterdir()) == ["step-3", "step-6"]


def test_fsdp_in_one_process_is_refused_before_loading(files, tmp_path):
    from vcon_fx.errors import ConfigError

    with pytest.raises(ConfigError, match="single process.*torchrun") as info:
        run([str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "2", "--fsdp",
             "-o", str(tmp_path / "out")])
    assert info.value.exit_code == 2 and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_two_processes_fsdp(files, tmp_path):
    out = tmp_path / "fsdp"
    torchrun = str(Path(PY).with_name("torchrun"))
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", *ENTRY, "finetune",
                           str(files / "tiny.vcon"), "--data", str(files / "train.npz"), "--steps", "6",
                           "--batch-size", "8", "--save-every", "3", "--fsdp", "-o", str(out)],
                          capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote") == 1
    assert set(get_betas(load(out)).values()) == {0.0}
    assert sorted(p.name for p in (tmp_path / "fsdp.ckpt" / "step-6" / "shards").iterdir()) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    small = tmp_path / "small"
    assert subprocess.run([PY, *ENTRY, "vanish", str(out), "-o", str(small)], capture_output=True).returncode == 0
    assert load(small) is not None
