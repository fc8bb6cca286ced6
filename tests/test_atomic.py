"""Atomic writes: a save that fails midway leaves the previous output (or none), never a
truncated one, and no temporary file behind.

Faults are injected in-process: the safetensors writer writes half a file and then raises,
or a rename raises. One case kills a real child process (SIGKILL) in the middle of a save.
Fine-tuning checkpoints under SIGINT/SIGKILL are tested in test_cli_finetune.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx.io import artifact
from vcon_fx.io import atomic as fileio
from vcon_fx.errors import OutputError, OutputExistsError, UsageError, VconError


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 32)
        self.fc = nn.Linear(32, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.relu(self.stem(x)))))


X = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def vm():
    torch.manual_seed(0)
    return vcon_fx.transform(Net().eval(), vcon_fx.LowRankConfig(rank=4), example_inputs=(X,))


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file and folder under `folder` (hidden ones included)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def half_then(exc: BaseException):
    """A stand-in for safetensors' save_model: writes half a real file, then fails."""
    real = artifact.st_save_model

    def fake(model, filename, metadata=None):
        real(model, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise exc

    return fake


def load_back(path: Path) -> torch.Tensor:
    # An artifact made from a Python object is loaded with that architecture again.
    return artifact.load(path, model=Net().eval())(X)


# ── a fresh save that fails leaves nothing ────────────────────────────────────────────────


@pytest.mark.parametrize("exc", [RuntimeError("disk pulled out"), KeyboardInterrupt(), OSError(28, "No space left on device")],
                         ids=["error", "ctrl-c", "disk-full"])
def test_failed_fresh_save_leaves_nothing(tmp_path, vm, monkeypatch, exc):
    monkeypatch.setattr(artifact, "st_save_model", half_then(exc))
    expected = OutputError if isinstance(exc, OSError) else type(exc)
    with pytest.raises(expected):
        vcon_fx.save(vm, tmp_path / "m.vcon")
    assert snapshot(tmp_path) == {}, "a failed save left files behind"


def test_disk_full_is_one_clear_error(tmp_path, vm, monkeypatch):
    monkeypatch.setattr(artifact, "st_save_model", half_then(OSError(28, "No space left on device")))
    with pytest.raises(OutputError) as info:
        vcon_fx.save(vm, tmp_path / "m.vcon")
    assert info.value.exit_code == UsageError.exit_code and isinstance(info.value, VconError)  # an unusable -o path
    assert "No space left" in str(info.value) and "\n" not in str(info.value)


# ── a failed save over an existing artifact keeps the old one ────────────────────────────


@pytest.fixture
def existing(tmp_path, vm):
    out = tmp_path / "m.vcon"
    vcon_fx.save(vm, out)
    return out


@pytest.mark.parametrize("exc", [RuntimeError("killed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failed_overwrite_keeps_previous_artifact(existing, vm, monkeypatch, exc):
    before = snapshot(existing.parent)
    monkeypatch.setattr(artifact, "st_save_model", half_then(exc))
    with pytest.raises(type(exc)):
        vcon_fx.save(vm, existing, force=True)
    assert snapshot(existing.parent) == before, "the previous artifact changed, or temp files were left"
    monkeypatch.undo()
    assert torch.allclose(load_back(existing), vm(X))


def test_failed_rename_of_new_output(tmp_path, vm, monkeypatch):
    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(fileio.os, "replace", refuse)
    with pytest.raises(OutputError, match="Read-only file system"):
        vcon_fx.save(vm, tmp_path / "m.vcon")
    assert snapshot(tmp_path) == {}


@pytest.mark.parametrize("how", ["exchange", "fallback-second-rename"])
def test_failed_swap_keeps_previous_artifact(existing, vm, monkeypatch, how):
    before = snapshot(existing.parent)
    if how == "exchange":
        def boom(a, b):
            raise OSError(5, "Input/output error")
        monkeypatch.setattr(fileio, "_exchange", boom)
    else:
        # No RENAME_EXCHANGE: old aside, new in. The second rename fails: the old one must come back.
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
        real = os.replace
        calls = []

        def second_fails(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
            return real(src, dst)

        monkeypatch.setattr(fileio.os, "replace", second_fails)
    with pytest.raises(OutputError, match="Input/output error"):
        vcon_fx.save(vm, existing, force=True)
    assert snapshot(existing.parent) == before
    monkeypatch.undo()
    assert torch.allclose(load_back(existing), vm(X))


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_forced_overwrite_replaces_and_cleans_up(existing, vm, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    small = vcon_fx.vanish(_at_beta_zero(vm))
    vcon_fx.save(small, existing, force=True)
    assert sorted(p.name for p in existing.parent.iterdir()) == ["m.vcon"], "old or temp folders left behind"
    assert artifact.read_recipe(existing).stage == "vanished"


def _at_beta_zero(vm):
    import copy

    twin = copy.deepcopy(vm)
    vcon_fx.set_beta(twin, 0.0)
    return twin


def test_overwrite_without_force_is_refused(existing, vm):
    before = snapshot(existing.parent)
    with pytest.raises(OutputExistsError):
        vcon_fx.save(vm, existing)
    assert snapshot(existing.parent) == before


def test_output_folder_has_ordinary_permissions(tmp_path, vm):
    out = vcon_fx.save(vm, tmp_path / "m.vcon")
    umask = fileio._umask()
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in out.iterdir():
        assert f.stat().st_mode & 0o077, f"{f.name} is private to its owner (mkstemp's 0600 leaked)"


# ── single files (ONNX, logs) ─────────────────────────────────────────────────────────────


def test_atomic_path_failure_keeps_old_file(tmp_path):
    target = tmp_path / "log.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("new, half writ")
            raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.jsonl"]


def test_atomic_path_failed_rename(tmp_path, monkeypatch):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old")
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OutputError):
        fileio.write_text_atomic(target, "new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_write_text_atomic_replaces(tmp_path):
    target = tmp_path / "a.txt"
    fileio.write_text_atomic(target, "one")
    fileio.write_text_atomic(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


# ── outputs that cannot be written are refused before any work ────────────────────────────


def test_output_under_a_regular_file_is_refused(tmp_path):
    # Tests run as root, where chmod does not stop writes: a parent that is a file does.
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        fileio.check_output(blocker / "out.vcon")


def test_output_in_missing_folder_is_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        fileio.check_output(tmp_path / "nope" / "out.vcon")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_output_in_proc_is_refused_even_for_root():
    # os.access(W_OK) is true for root on /proc; only trying to create a file tells the truth.
    with pytest.raises(UsageError, match="not writable"):
        fileio.check_output("/proc/vcon-fx-test.vcon")
    with pytest.raises(OutputError):
        with fileio.atomic_dir("/proc/vcon-fx-test.vcon"):
            pass


def test_output_equal_to_input_is_refused(tmp_path):
    src = tmp_path / "model.pt2"
    src.write_bytes(b"x")
    with pytest.raises(UsageError, match="also an input"):
        fileio.check_output(src, force=True, inputs=(str(src),))
    assert src.read_bytes() == b"x"


# ── a real process killed mid-save ────────────────────────────────────────────────────────


def test_sigkill_mid_save_keeps_previous_artifact(existing, vm):
    """The child writes half the weights into the temporary folder, then SIGKILLs itself."""
    before = {k: v for k, v in snapshot(existing.parent).items()}
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        import vcon_fx
        from vcon_fx.io import artifact
        from test_atomic import Net, X
        torch.manual_seed(0)
        vm = vcon_fx.transform(Net().eval(), vcon_fx.LowRankConfig(rank=2), example_inputs=(X,))
        real = artifact.st_save_model
        def die(model, filename, metadata=None):
            real(model, filename, metadata=metadata)
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        artifact.st_save_model = die
        vcon_fx.save(vm, {str(existing)!r}, force=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    after = snapshot(existing.parent)
    kept = {k: v for k, v in after.items() if k.split("/")[0] == "m.vcon"}
    assert kept == before, "the previous artifact changed"
    # A killed process cannot clean up: at worst one hidden temporary folder remains.
    leftovers = {k.split("/")[0] for k in after if k.split("/")[0] != "m.vcon"}
    assert all(name.startswith(".m.vcon.") and name.endswith(".tmp") for name in leftovers), leftovers
    assert torch.allclose(load_back(existing), vm(X))
