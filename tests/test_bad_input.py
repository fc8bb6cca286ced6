"""Bad input through the real command line: every case one `python -m vcon_fx …` subprocess.

Each case checks the exit code (docs/cli.md's table), that stderr is exactly one line starting
"error:" (no traceback), and that nothing was written: neither the working folder nor the
shared input folder gains or changes a file (hidden temporary files included).

The inputs are tiny and built once per test session (per xdist worker): a torch.export
archive of a 4-layer MLP, state dicts, malicious pickles, vcon artifacts at β = 1, β = 0 and
vanished, an ONNX file and data files. Each subprocess costs ~3-6 s of imports.

Tests run as root in CI, where chmod does not stop writes: "output folder not writable" uses
a parent that is a regular file, and /proc (where only creating a file shows it is not
writable).
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import vcon_fx
from vcon_fx.errors import ArtifactError, DataError, LoadError, OutputExistsError, SelectionError, StageError, UsageError
from vcon_fx.io.artifact import save
from vcon_fx.sources.load import load_model

# The exit codes docs/cli.md lists, by the error that carries each (2 is also argparse's own).
USAGE, LOAD, SELECTION, STAGE = UsageError.exit_code, LoadError.exit_code, SelectionError.exit_code, StageError.exit_code
ARTIFACT, EXISTS, DATA = ArtifactError.exit_code, OutputExistsError.exit_code, DataError.exit_code

from pickles import FourLayerMLP, Payload

FINETUNE = ["-m", "vcon_fx"]


class ExecPayload:
    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


@dataclass
class Files:
    root: Path
    marker: Path

    def __getattr__(self, name):  # files.mlp_pt2 → root / "mlp.pt2"
        return self.root / name.replace("_dot_", ".")


def _write_onnx(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "tiny", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("inputs")
    marker = root / "PWNED"
    torch.manual_seed(0)
    net = FourLayerMLP().eval()
    batch = {"x": {0: torch.export.Dim.DYNAMIC}}
    torch.export.save(torch.export.export(net, (torch.randn(2, 8),), dynamic_shapes=batch), str(root / "mlp.pt2"))
    # Exported without dynamic shapes, as many users do, and reshaping with the batch size: it runs
    # at batch 2 only (vcon-fx cannot free that batch).
    torch.export.save(torch.export.export(BatchReshapingMLP().eval(), (torch.randn(2, 2, 4),)), str(root / "static.pt2"))
    save_file(net.state_dict(), str(root / "sd.safetensors"))
    torch.save(net.state_dict(), root / "sd.pt")
    torch.save(net, root / "whole.pt")
    torch.save({"weight": torch.zeros(2), "x": Payload(f"touch {marker}")}, root / "evil.pt")
    (root / "evil.pth").write_bytes(pickle.dumps({"x": ExecPayload(f"open({str(marker)!r}, 'w').close()")}))
    _write_onnx(root / "tiny.onnx")

    # vcon artifacts of mlp.pt2: blended (β = 1), blended at β = 0, vanished.
    lm = load_model(root / "mlp.pt2")
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_inputs=lm.example_args,
                           source=lm.source)
    save(vm, root / "blended.vcon")
    at_zero = copy.deepcopy(vm)
    vcon_fx.set_beta(at_zero, 0.0)
    save(at_zero, root / "beta0.vcon")
    save(vcon_fx.vanish(at_zero), root / "vanished.vcon")

    # Fine-tuning data: inputs (N, 8), labels in [0, 4).
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
    nan = x.clone()
    nan[3, 2] = float("nan")
    save_file({"inputs": nan, "labels": y}, str(root / "nan.safetensors"))
    save_file({"inputs": torch.randn(16, 7, generator=gen), "labels": y}, str(root / "shape.safetensors"))
    save_file({"inputs": x, "labels": y + 10}, str(root / "labels.safetensors"))
    np.savez(root / "good.npz", inputs=x.numpy(), labels=y.numpy())
    assert not marker.exists()
    return Files(root, marker)


def snapshot(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
    return out


def vcon(cwd: Path, *args: str, entry=("-m", "vcon_fx"), timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VCON_DEBUG"}
    return subprocess.run([sys.executable, *entry, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


# ── the matrix ────────────────────────────────────────────────────────────────────────────
# Each setup gets (tmp, files) and returns the argv. `tmp` is the working folder; files made
# there by the setup are part of the "before" snapshot.


@dataclass(frozen=True)
class Case:
    setup: Callable[[Path, Files], list]
    code: int
    words: tuple[str, ...] = ()
    entry: tuple[str, ...] = ("-m", "vcon_fx")
    prepare: Callable[[Path], object] | None = None  # makes files in the working folder first


def _folder(tmp: Path, name: str) -> Path:
    (tmp / name).mkdir()
    return tmp / name


def _write(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def _half(src: Path, tmp: Path, name: str) -> Path:
    data = src.read_bytes()
    return _write(tmp, name, data[: len(data) // 2])


def _copy_artifact(src: Path, tmp: Path) -> Path:
    dst = tmp / src.name
    shutil.copytree(src, dst)
    return dst


def _corrupt_recipe(files: Files, tmp: Path, text: str) -> Path:
    art = _copy_artifact(files.beta0_dot_vcon, tmp)
    (art / "recipe.json").write_text(text)
    return art


def _zip_not_pt2(tmp: Path) -> Path:
    with zipfile.ZipFile(tmp / "fake.pt2", "w") as z:
        z.writestr("hello.txt", "not a model")
    return tmp / "fake.pt2"


def _safetensors_bad_header(tmp: Path) -> Path:
    # Header length 2**40: safetensors must refuse it, not try to allocate it.
    return _write(tmp, "huge.safetensors", (1 << 40).to_bytes(8, "little") + b"{}")


def _lowrank(files: Files, *extra: str) -> list:
    return ["transform", files.mlp_dot_pt2, "--method", "lowrank", *extra, "-o", "out.vcon"]


def _not_artifact_folder(tmp: Path) -> Path:
    folder = tmp / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    return folder


def _finetune(files: Files, model, data) -> list:
    return ["finetune", model, "--data", data, "--steps", "2", "--batch-size", "4", "-o", "out.tuned"]


_SAFE = (".pt2", "hugging face", "--arch")  # the safe alternatives every pickle refusal names

CASES = {
    # ── 3: model source missing, unknown, corrupt, or needing --trust-pickle
    "missing-file": Case(lambda t, f: ["inspect", "nope.pt2"], LOAD, ("does not exist",)),
    "directory-instead-of-file": Case(lambda t, f: ["inspect", _folder(t, "d")], LOAD, ("folder",)),
    "wrong-extension": Case(lambda t, f: ["inspect", _write(t, "model.onnx", b"\x08\x07")], LOAD, ("unknown extension",)),
    "empty-file": Case(lambda t, f: ["inspect", _write(t, "empty.pt2", b"")], LOAD, ("empty",)),
    "truncated-pt2": Case(lambda t, f: ["transform", _half(f.mlp_dot_pt2, t, "half.pt2"), "--method", "lowrank",
                                        "--rank", "4", "-o", "out.vcon"], LOAD, ("torch.export",)),
    "zip-but-not-pt2": pytest.param(
        Case(lambda t, f: ["inspect", _zip_not_pt2(t)], LOAD, ("not in a subdirectory",))),
    "truncated-safetensors-state-dict": Case(
        lambda t, f: ["inspect", _half(f.sd_dot_safetensors, t, "half.safetensors"), "--arch", "torchvision:resnet18"],
        LOAD, ("safetensors",)),
    "safetensors-huge-header": Case(lambda t, f: ["inspect", _safetensors_bad_header(t), "--arch",
                                                  "torchvision:resnet18"], LOAD, ("safetensors",)),
    "state-dict-without-arch": Case(lambda t, f: ["inspect", f.sd_dot_safetensors], LOAD, ("--arch",)),
    "pickled-module-without-trust": Case(lambda t, f: ["inspect", f.whole_dot_pt], LOAD, ("--trust-pickle", *_SAFE)),
    "malicious-pickle-inspect": Case(lambda t, f: ["inspect", f.evil_dot_pt], LOAD, ("--trust-pickle", *_SAFE)),
    "malicious-pickle-transform": Case(
        lambda t, f: ["transform", f.evil_dot_pt, "--method", "lowrank", "--rank", "4", "-o", "out.vcon"],
        LOAD, ("--trust-pickle", *_SAFE)),
    "malicious-legacy-pickle": Case(lambda t, f: ["inspect", f.evil_dot_pth], LOAD, ("--trust-pickle", *_SAFE)),
    "path-with-markup-closing-tag": pytest.param(
        Case(lambda t, f: ["inspect", "x[/y].pt2"], LOAD, ("x[/y].pt2",))),
    "path-with-markup-tag": pytest.param(
        Case(lambda t, f: ["inspect", "[bold]x.pt2"], LOAD, ("[bold]x.pt2",))),
    # ── 2: bad argument or config
    "unknown-method": Case(lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "magic", "-o", "out.vcon"],
                           USAGE, ("unknown method", "lowrank")),
    "rank-zero": Case(lambda t, f: _lowrank(f, "--rank", "0"), USAGE, ("--rank",)),
    "rank-negative": Case(lambda t, f: _lowrank(f, "--rank", "-3"), USAGE, ("--rank",)),
    "rank-at-layer-size": Case(lambda t, f: _lowrank(f, "--rank", "32"), USAGE, ("dense",)),
    "two-lowrank-sizes": Case(lambda t, f: _lowrank(f, "--rank", "4", "--energy", "0.5"), USAGE, ("exactly one",)),
    "energy-above-one": Case(lambda t, f: _lowrank(f, "--energy", "1.5"), USAGE, ("--energy",)),
    "bad-shape-string": Case(lambda t, f: _lowrank(f, "--rank", "4", "--input-shape", "1xAx8"), USAGE, ("shape",)),
    "input-shape-does-not-fit": Case(lambda t, f: _lowrank(f, "--rank", "4", "--input-shape", "2x7"), USAGE,
                                     ("input",)),
    "rank-multiple-zero": Case(lambda t, f: _lowrank(f, "--rank", "4", "--rank-multiple", "0"), USAGE, ("--rank-multiple",)),
    "svd-unknown": Case(lambda t, f: _lowrank(f, "--rank", "4", "--svd", "fast"), USAGE, ("--svd",)),
    "activation-aware-with-quant": Case(
        lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "quant", "--bits", "8", "--activation-aware", "-o",
                      "out.vcon"], USAGE, ("activation_aware",)),
    "int4-of-a-float-model": Case(lambda t, f: ["export", f.vanished_dot_vcon, "--onnx", "out.onnx", "--int4"], USAGE,
                                  ("quant",)),
    "int4-and-dynamic-int8": Case(lambda t, f: ["export", f.vanished_dot_vcon, "--onnx", "out.onnx", "--int4",
                                                "--dynamic-int8"], USAGE, ("exclude",)),
    "rank-not-a-number": pytest.param(
        Case(lambda t, f: _lowrank(f, "--rank", "four"), USAGE, ("--rank",))),
    "sparsity-above-one": Case(
        lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "prune", "--sparsity", "1.5", "-o", "out.vcon"],
        USAGE, ("sparsity",)),
    "sparsity-zero": Case(
        lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "prune", "--sparsity", "0", "-o", "out.vcon"],
        USAGE, ("sparsity",)),
    "bits-unsupported": Case(
        lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "quant", "--bits", "3", "-o", "out.vcon"],
        USAGE, ("bits",)),
    # ── 5: targets matched no layer
    "targets-match-nothing": Case(lambda t, f: _lowrank(f, "--rank", "4", "--targets", "decoder.*"), SELECTION,
                                  ("decoder.*",)),
    # ── 6: wrong stage
    "vanish-while-beta-positive": Case(lambda t, f: ["vanish", f.blended_dot_vcon, "-o", "out.small"], STAGE, ("β",)),
    "export-with-dense-branch": Case(lambda t, f: ["export", f.blended_dot_vcon, "--onnx", "out.onnx"], STAGE,
                                     ("vanish",)),
    "finetune-not-an-artifact": Case(lambda t, f: _finetune(f, _not_artifact_folder(t), f.good_dot_npz), STAGE,
                                     ("vcon-fx transform",), FINETUNE),
    "finetune-vanished-artifact": Case(lambda t, f: _finetune(f, f.vanished_dot_vcon, f.good_dot_npz), STAGE,
                                       ("vanish",), FINETUNE),
    # ── 7: artifact missing or corrupt
    "vanish-folder-without-recipe": Case(lambda t, f: ["vanish", _folder(t, "empty"), "-o", "out.small"], ARTIFACT,
                                         ("recipe.json",)),
    "recipe-not-json": Case(lambda t, f: ["vanish", _corrupt_recipe(f, t, '{"format": "vcon-fx", '), "-o",
                                          "out.small"], ARTIFACT, ("json",)),
    "recipe-not-a-recipe": Case(lambda t, f: ["inspect", _corrupt_recipe(f, t, "[1, 2, 3]")], ARTIFACT, ("recipe",)),
    "recipe-wrong-types": Case(lambda t, f: ["vanish", _corrupt_recipe(
        f, t, '{"format": "vcon-fx", "stage": "blended", "plans": 5, "groups": 1, "config": {}}'), "-o",
        "out.small"], ARTIFACT, ("recipe.json",)),
    "weights-truncated": Case(lambda t, f: ["vanish", _truncate_weights(f, t), "-o", "out.small"], ARTIFACT,
                              ("model.safetensors",)),
    "weights-missing": Case(lambda t, f: ["vanish", _drop_weights(f, t), "-o", "out.small"], ARTIFACT,
                            ("model.safetensors",)),
    # ── 8: output exists; 2: output not writable or equal to the input
    "transform-output-exists": Case(lambda t, f: _lowrank(f, "--rank", "4"), EXISTS, ("--force",),
                                    prepare=lambda t: _folder(t, "out.vcon")),
    "export-output-exists": Case(lambda t, f: ["export", f.vanished_dot_vcon, "--onnx", "out.onnx"], EXISTS, ("--force",),
                                 prepare=lambda t: _write(t, "out.onnx", b"keep me")),
    "output-is-the-input": Case(lambda t, f: ["vanish", _copy_artifact(f.beta0_dot_vcon, t), "-o", "beta0.vcon",
                                              "--force"], USAGE, ("input",)),
    "output-parent-is-a-file": Case(lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "lowrank", "--rank", "4",
                                                  "-o", "afile/out.vcon"], USAGE, ("not a folder",),
                                    prepare=lambda t: _write(t, "afile", b"x")),
    "output-in-proc": Case(lambda t, f: ["transform", f.mlp_dot_pt2, "--method", "lowrank", "--rank", "4", "-o",
                                         "/proc/vcon-fx-out.vcon"], USAGE, ("not writable",)),
    # ── 9: bad data file (fine-tuning)
    "data-missing": Case(lambda t, f: _finetune(f, f.blended_dot_vcon, "nope.npz"), DATA, ("does not exist",),
                         FINETUNE),
    "data-nan": Case(lambda t, f: _finetune(f, f.blended_dot_vcon, f.nan_dot_safetensors), DATA, ("nan",), FINETUNE),
    "data-wrong-shape": Case(lambda t, f: _finetune(f, f.blended_dot_vcon, f.shape_dot_safetensors), DATA, ("shape",),
                             FINETUNE),
    "data-labels-out-of-range": Case(lambda t, f: _finetune(f, f.blended_dot_vcon, f.labels_dot_safetensors), DATA,
                                     ("label",), FINETUNE),
    # Known at transform, so refused before any work, naming the batch the model runs at.
    "finetune-pt2-with-fixed-batch": pytest.param(
        Case(lambda t, f: _finetune(f, _static_artifact(f, t), f.good_dot_npz), USAGE, ("only at batch 2",
                                                                                        "--batch-size 2"), FINETUNE)),
    "data-truncated": Case(lambda t, f: _finetune(f, f.blended_dot_vcon, _half(f.nan_dot_safetensors, t,
                                                                                 "half.safetensors")), DATA,
                           ("half.safetensors",), FINETUNE),
    # ── 3: ONNX files for `vcon-fx bench`
    "bench-missing-onnx": Case(lambda t, f: ["bench", "nope.onnx"], LOAD, ("does not exist",)),
    "bench-truncated-onnx": Case(lambda t, f: ["bench", _half(f.tiny_dot_onnx, t, "half.onnx")], LOAD, ("onnx",)),
    "bench-against-corrupt": Case(lambda t, f: ["bench", f.tiny_dot_onnx, "--against",
                                                _write(t, "dense.onnx", b"")], LOAD, ("dense.onnx",)),
}


class BatchReshapingMLP(torch.nn.Module):
    """Flattens with the batch size, as `x.view(x.size(0), -1)` does: a static export bakes it in."""

    def __init__(self):
        super().__init__()
        self.mlp = FourLayerMLP()

    def forward(self, x):
        return self.mlp(x.view(x.size(0), -1))


def _static_artifact(files: Files, tmp: Path) -> Path:
    lm = load_model(files.static_dot_pt2)
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_inputs=lm.example_args,
                           source=lm.source)
    return save(vm, tmp / "static.vcon")


def _truncate_weights(files: Files, tmp: Path) -> Path:
    art = _copy_artifact(files.beta0_dot_vcon, tmp)
    data = (art / "model.safetensors").read_bytes()
    (art / "model.safetensors").write_bytes(data[: len(data) // 2])
    return art


def _drop_weights(files: Files, tmp: Path) -> Path:
    art = _copy_artifact(files.beta0_dot_vcon, tmp)
    (art / "model.safetensors").unlink()
    return art


def test_matrix_is_big_enough():
    assert len(CASES) >= 25


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_bad_input(case: Case, files: Files, tmp_path: Path):
    if case.prepare is not None:
        case.prepare(tmp_path)
    argv = case.setup(tmp_path, files)
    before_work, before_inputs = snapshot(tmp_path), snapshot(files.root)
    proc = vcon(tmp_path, *argv, entry=case.entry)
    lines = proc.stderr.strip().splitlines()
    where = f"\n$ vcon-fx {' '.join(map(str, argv))}\nstdout: {proc.stdout[-1500:]}\nstderr: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, where
    assert len(lines) == 1 and lines[0].startswith("error:"), f"stderr is not one 'error:' line{where}"
    assert proc.returncode == case.code, f"exit code {proc.returncode}, expected {case.code}{where}"
    for word in case.words:
        assert word.lower() in lines[0].lower(), f"the error does not mention {word!r}{where}"
    assert snapshot(tmp_path) == before_work, f"files were created or changed in the working folder{where}"
    assert snapshot(files.root) == before_inputs, f"an input changed{where}"
    assert not files.marker.exists(), "a pickle payload ran"
