"""`vcon-fx compress`: the four stages in one command, the work folder, rerun, Ctrl-C + continue, settings.

In-process through `vcon_fx.cli.main.main`, as a user types it, with default flags beyond the
required ones, on a small CNN saved as `.pt2` and a real `.npz` data file.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import vcon_fx
import vcon_fx.training
from vcon_fx.cli.compress import SETTINGS_FILE, _OWN_FLAGS, _stage_parsers
from vcon_fx.cli.main import INTERRUPTED, build_parser, main
from vcon_fx.graph.blend import get_betas
from vcon_fx.io.artifact import read_recipe

STEPS = 20
STOP_AT = 7  # the step the simulated Ctrl-C arrives after


class TinyCNN(nn.Module):
    """stem conv → conv → pool → fc → head: the middle conv and fc get compressed twins."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(torch.relu(self.fc(x.mean(dim=(2, 3)))))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for every run, the module's fixtures included: results repeat bit for bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder with tiny.pt2 (exported at batch 2, dynamic batch) and train.npz (inputs, labels)."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    model = TinyCNN().eval()
    example = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},)),
                      root / "tiny.pt2")
    gen = np.random.default_rng(1)
    x = gen.normal(size=(64, 3, 8, 8)).astype(np.float32)
    np.savez(root / "train.npz", inputs=x, labels=(x[:, 0].mean(axis=(1, 2)) > 0).astype(np.int64))
    return root


def argv(inputs: Path, onnx: Path, *extra: str) -> list[str]:
    return ["compress", str(inputs / "tiny.pt2"), "--method", "lowrank", "--rank", "2", "--data",
            str(inputs / "train.npz"), "--steps", str(STEPS), "--onnx", str(onnx), *extra]


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under `folder` → its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def straight(inputs, tmp_path_factory):
    """One uninterrupted `compress … --check`: (its ONNX, what it printed, the inputs before it ran)."""
    out = tmp_path_factory.mktemp("straight") / "tiny.onnx"
    before = snapshot(inputs)
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        code = main(argv(inputs, out, "--check"))
    assert code == 0, text.getvalue()[-2000:]
    return out, text.getvalue(), before


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_one_command_writes_an_onnx_that_matches_and_keeps_every_artifact(inputs, straight):
    onnx, text, before = straight
    work = onnx.with_name("tiny.work")
    lines = text.splitlines()
    for number, (stage, path) in enumerate([("transform", work / "model.vcon"), ("finetune", work / "model.tuned"),
                                            ("vanish", work / "model.small"), ("export", onnx)], 1):
        assert f"[{number}/4] {stage} → {path}" in lines
    assert f"wrote {work / 'model.vcon'}" in text and "onnxruntime vs PyTorch" in text  # the stages' own reports
    assert "after" in text and f"{STEPS} steps" in text
    assert lines[-1].startswith(f"done: {onnx}") and str(work) in lines[-1] and "delete" in lines[-1]

    # Nothing but the ONNX and the work folder is written; the inputs are untouched.
    assert sorted(p.name for p in onnx.parent.iterdir()) == ["tiny.onnx", "tiny.work"]
    assert snapshot(inputs) == before
    kept = {p.name for p in work.iterdir()}
    assert {"model.vcon", "model.tuned", "model.small", "model.tuned.ckpt", SETTINGS_FILE} <= kept
    assert read_recipe(work / "model.vcon").stage == "blended" and read_recipe(work / "model.small").stage == "vanished"
    tuned = vcon_fx.load(work / "model.tuned")
    assert set(get_betas(tuned).values()) == {0.0}

    small = vcon_fx.load(work / "model.small").eval()
    x = np.random.default_rng(2).normal(size=(5, 3, 8, 8)).astype(np.float32)  # not the example batch of 2
    with torch.no_grad():
        expected = small(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_onnx(onnx, x), expected, rtol=1e-4, atol=1e-5)


def test_the_same_command_again_skips_every_stage(inputs, straight, capsys):
    onnx, _, _ = straight
    work = onnx.with_name("tiny.work")
    before = snapshot(onnx.parent)
    assert main(argv(inputs, onnx, "--check")) == 0
    out = capsys.readouterr().out
    for number, stage in enumerate(["transform", "finetune", "vanish", "export"], 1):
        assert f"[{number}/4] {stage}: done already" in out
    assert "wrote" not in out and f"({work / 'model.tuned'})" in out
    assert snapshot(onnx.parent) == before


def test_ctrl_c_keeps_the_work_and_the_same_command_continues(inputs, straight, tmp_path, monkeypatch, capsys):
    real = vcon_fx.training.finetune

    def interrupted(vm, data, config, *, on_step=None, **kwargs):
        def step(info):
            on_step(info)
            if info["step"] == STOP_AT:
                os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the loop saves this step, then stops
        return real(vm, data, config, on_step=step, **kwargs)

    onnx = tmp_path / "tiny.onnx"
    work = tmp_path / "tiny.work"
    monkeypatch.setattr(vcon_fx.training, "finetune", interrupted)
    assert main(argv(inputs, onnx)) == INTERRUPTED
    err = capsys.readouterr().err
    assert f"kept model.vcon, the fine-tuning checkpoint of step {STOP_AT} in {work}/" in err
    assert "run the same command again to continue" in err and "--resume" not in err
    assert sorted(p.name for p in (work / "model.tuned.ckpt").iterdir())[-1] == f"step-{STOP_AT}"
    assert not (work / "model.tuned").exists() and not onnx.exists()

    monkeypatch.undo()
    assert main(argv(inputs, onnx)) == 0
    out = capsys.readouterr().out
    assert "[1/4] transform: done already" in out
    assert f"[2/4] finetune → {work / 'model.tuned'} (continuing from the checkpoint of step {STOP_AT})" in out
    assert f"{STEPS} steps" in out and f"resumed from step {STOP_AT}" in out

    # The same weights, and the same ONNX outputs, as the run that was never interrupted.
    weights = [load_file(str(folder / "model.small" / "model.safetensors"))
               for folder in (work, straight[0].with_name("tiny.work"))]
    a, b = weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = np.random.default_rng(3).normal(size=(4, 3, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(run_onnx(onnx, x), run_onnx(straight[0], x))


def test_other_settings_in_the_same_work_folder_are_refused_and_force_starts_over(inputs, straight, tmp_path, capsys):
    work = tmp_path / "tiny.work"
    shutil.copytree(straight[0].with_name("tiny.work"), work)
    shutil.copy(straight[0], tmp_path / "tiny.onnx")
    other = argv(inputs, tmp_path / "tiny.onnx")
    other[other.index("--rank") + 1] = "3"
    before = snapshot(tmp_path)
    assert main(other) == 2
    err = capsys.readouterr().err
    assert f"{work} holds a run of `vcon-fx compress` with other settings (--rank 2 → 3)" in err
    assert "pass --force to start over" in err and "--work" in err
    assert snapshot(tmp_path) == before

    assert main([*other, "--force"]) == 0
    out = capsys.readouterr().out
    assert "[1/4] transform → " in out and "done already" not in out
    assert read_recipe(work / "model.small").config.rank == 3


def test_refusals_before_any_work(inputs, tmp_path, capsys):
    onnx = tmp_path / "tiny.onnx"
    onnx.write_bytes(b"someone's file")
    assert main(argv(inputs, onnx)) == 8  # an ONNX that is not this command's own: --force to replace it
    assert "--force" in capsys.readouterr().err
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(argv(inputs, tmp_path / "b.onnx", "--work", str(foreign), "--force")) == 2
    assert "not a `vcon-fx compress` work folder" in capsys.readouterr().err
    assert main(argv(inputs, tmp_path / "c.onnx", "--transition", str(STEPS + 1))) == 2
    assert "longer than --steps" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "tiny.onnx"] and (foreign / "keep.txt").is_file()


def test_every_stage_flag_is_a_compress_flag():
    """A flag added to transform, finetune or export (not an output flag) is accepted by compress as well."""
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    for name, stage in _stage_parsers().items():
        for action in stage._actions:
            for flag in set(action.option_strings) - _OWN_FLAGS:
                assert compress._option_string_actions[flag].dest == action.dest, f"{name} {flag}"
