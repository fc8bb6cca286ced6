"""Untrusted files: nothing vcon-fx reads can run code, and nothing it writes needs pickle.

- A malicious pickle (its __reduce__ runs a shell command that creates a marker file) is
  refused everywhere unless `trust_pickle` is given; the refusal names the safe formats.
  (The CLI runs of the same files are cases of test_bad_input.py: malicious-pickle-*.)
- Artifacts vcon-fx writes load with pickle disabled (pickle.load/loads/Unpickler and
  torch.load(weights_only=False) raise during `vcon_fx.artifact.load`).
- A recipe cannot grant trust: an artifact whose recipe names a pickled source still needs
  `trust_pickle`.
- Hugging Face folders: pickled weights are refused; custom code (`auto_map`) never runs,
  even when someone answers "y" to transformers' prompt.
- ONNX files whose external data points outside their folder are refused.
- Damaged or edited files (recipes, archives, safetensors) raise VconError, never anything else.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import vcon_fx
from vcon_fx.io import artifact
from vcon_fx.errors import ArtifactError, DataError, LoadError, UnsafeFileError, VconError
from vcon_fx.sources.load import load_model

from pickles import FourLayerMLP, Payload

SAFE_ALTERNATIVES = (".pt2", "Hugging Face folder", "--arch")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("security")
    torch.manual_seed(0)
    net = FourLayerMLP().eval()
    ep = torch.export.export(net, (torch.randn(2, 8),), dynamic_shapes={"x": {0: torch.export.Dim.DYNAMIC}})
    torch.export.save(ep, str(root / "mlp.pt2"))
    save_file(net.state_dict(), str(root / "sd.safetensors"))
    lm = load_model(root / "mlp.pt2")
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_inputs=lm.example_args,
                           source=lm.source)
    artifact.save(vm, root / "blended.vcon")
    at_zero = copy.deepcopy(vm)
    vcon_fx.set_beta(at_zero, 0.0)
    artifact.save(vcon_fx.vanish(at_zero), root / "vanished.vcon")
    return root


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a torch.save file whose unpickling creates `marker`, marker)."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": Payload(f"touch {marker}")}, path)
    return path, marker


# ── pickles ───────────────────────────────────────────────────────────────────────────────


def test_the_payload_is_live(evil):
    """Control: unpickling the file really runs the command, so the refusals below mean something."""
    path, marker = evil
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_malicious_pickle_is_refused_with_safe_alternatives(evil):
    path, marker = evil
    with pytest.raises(UnsafeFileError) as info:
        load_model(path)
    assert not marker.exists()
    text = str(info.value)
    assert "\n" not in text and "posix.system" in text, text  # names what it would have run
    for alternative in (*SAFE_ALTERNATIVES, "--trust-pickle"):
        assert alternative in text, f"the refusal does not mention {alternative}: {text}"


def test_malicious_pickle_as_weights_or_state_dict_is_refused(evil):
    path, marker = evil
    for kwargs in ({"arch": "torchvision:resnet18"},):
        with pytest.raises(UnsafeFileError):
            load_model(path, **kwargs)
    with pytest.raises(UnsafeFileError):
        load_model("torchvision:squeezenet1_1", weights=path)
    assert not marker.exists()


def test_trust_pickle_is_the_only_gate(evil):
    """With the flag, the file is unpickled (and its code runs): the flag means what it says."""
    path, marker = evil
    with pytest.raises(LoadError, match="not an nn.Module"):
        load_model(path, trust_pickle=True)
    assert marker.exists()


def test_pickled_numpy_data_is_refused(tmp_path):
    from vcon_fx.data.readers import load_data

    marker = tmp_path / "PWNED"
    objects = np.empty(1, dtype=object)
    objects[0] = Payload(f"touch {marker}")
    np.savez(tmp_path / "evil.npz", inputs=objects)
    with pytest.raises(DataError, match="Python objects"):
        load_data(tmp_path / "evil.npz", input_spec={"args": [{"shape": [1, 8], "dtype": "float32"}]})
    assert not marker.exists()


# ── what vcon-fx writes loads without pickle ─────────────────────────────────────────────


def _ban_pickle(monkeypatch) -> list[str]:
    """Make every code-running unpickle path raise; torch.load(weights_only=True) stays allowed.

    Returns the list the banned calls are recorded in (it should stay empty).
    """
    calls: list[str] = []

    def refuse(name):
        def fail(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called while loading a vcon artifact")
        return fail

    for name in ("load", "loads", "Unpickler", "_Unpickler"):
        monkeypatch.setattr(pickle, name, refuse(f"pickle.{name}"))
    real_load = torch.load

    def torch_load(*args, **kwargs):
        if kwargs.get("weights_only") is False or os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            calls.append("torch.load(weights_only=False)")
            raise AssertionError("torch.load(weights_only=False) was called while loading a vcon artifact")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", torch_load)
    return calls


@pytest.fixture
def no_pickle(monkeypatch) -> list[str]:
    return _ban_pickle(monkeypatch)


@pytest.mark.parametrize("name", ["blended.vcon", "vanished.vcon"])
def test_artifacts_load_without_pickle(work, name, no_pickle):
    gm = artifact.load(work / name)
    assert no_pickle == []
    x = torch.randn(3, 8)
    assert gm(x).shape == (3, 4)
    # Only JSON and safetensors inside.
    assert sorted(p.name for p in (work / name).iterdir()) == ["model.safetensors", "recipe.json"]
    json.loads((work / name / "recipe.json").read_text())
    header = (work / name / "model.safetensors").read_bytes()
    n = int.from_bytes(header[:8], "little")
    assert json.loads(header[8:8 + n])["__metadata__"]["format"] == "vcon-fx"


def test_hf_artifact_loads_without_pickle(hf_folder, tmp_path, monkeypatch):
    lm = load_model(hf_folder, seq_len=8)
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=2), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source)
    artifact.save(vm, tmp_path / "hf.vcon")
    calls = _ban_pickle(monkeypatch)
    gm = artifact.load(tmp_path / "hf.vcon")
    assert calls == []
    assert vcon_fx.get_betas(gm) == vcon_fx.get_betas(vm)


def test_a_recipe_cannot_grant_trust(work, tmp_path, evil):
    """An edited recipe naming a pickled source still needs trust_pickle: the payload never runs."""
    path, marker = evil
    art = tmp_path / "tampered.vcon"
    shutil.copytree(work / "blended.vcon", art)
    recipe = json.loads((art / "recipe.json").read_text())
    from vcon_fx.sources.base import sha256_file

    recipe["source"] = {"kind": "pickle", "path": str(path), "sha256": sha256_file(path),
                        "input_shape": None, "seq_len": None, "batch_size": 1}
    (art / "recipe.json").write_text(json.dumps(recipe))
    with pytest.raises(UnsafeFileError):
        artifact.load(art)
    assert not marker.exists()


# ── Hugging Face folders ──────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def test_hf_pickled_weights_are_refused(hf_folder, tmp_path):
    folder = tmp_path / "bert-bin"
    folder.mkdir()
    shutil.copy(hf_folder / "config.json", folder / "config.json")
    marker = tmp_path / "PWNED"
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(50, 16), "x": Payload(f"touch {marker}")},
               folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        load_model(folder)
    assert not marker.exists()


def _remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "custom-code"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evilbert", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
    }))
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "from transformers import PretrainedConfig\n\n\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evilbert'\n"
    )
    return folder, marker


def test_hf_custom_code_is_refused(tmp_path):
    folder, marker = _remote_code_folder(tmp_path)
    with pytest.raises(LoadError):
        load_model(folder)
    assert not marker.exists()


def test_hf_custom_code_never_runs_even_if_the_user_says_yes(tmp_path, monkeypatch):
    folder, marker = _remote_code_folder(tmp_path)
    monkeypatch.setattr("builtins.input", lambda *args, **kwargs: "y")
    with pytest.raises(LoadError):
        load_model(folder)
    assert not marker.exists(), "the folder's Python code ran"


# ── ONNX ──────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_its_folder_is_refused(tmp_path, location):
    from onnx import TensorProto, helper, numpy_helper

    from vcon_fx.bench.compare import validate_onnx

    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    weight = numpy_helper.from_array(np.zeros(4, np.float32), "w")
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": "16"}.items():
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4]) for n in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", [io[0]], [io[1]], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model" / "trav.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(LoadError):
        validate_onnx(path)


# ── the public name ───────────────────────────────────────────────────────────────────────


def test_vcon_fx_load_stays_the_artifact_loader():
    """Importing the model-source loader (vcon_fx/sources/load.py) leaves `vcon_fx.load` the artifact loader."""
    import vcon_fx.sources.load  # noqa: F401  (what the CLI and artifact.load do)

    assert vcon_fx.load is artifact.load


# ── damaged or edited files: VconError, never anything else ──────────────────────────────


@pytest.mark.parametrize("spec", [{"kind": "pt2", "path": None}, {"kind": "pt2"}, {"kind": "pt2", "path": True},
                                  {"kind": "pt2", "path": "x.pt2", "sha256": 1}],
                         ids=["none-path", "no-path", "bool-path", "int-sha"])
def test_rebuild_model_rejects_malformed_specs(spec, tmp_path):
    from vcon_fx.sources.load import rebuild_model

    if spec.get("path") == "x.pt2":
        spec = {**spec, "path": str(tmp_path / "x.pt2")}
        (tmp_path / "x.pt2").write_bytes(b"x")
    with pytest.raises(LoadError):
        rebuild_model(spec)


_DELETE = object()
_values = st.one_of(st.just(_DELETE), st.none(), st.booleans(), st.integers(-3, 64), st.floats(allow_nan=True),
                    st.text(max_size=6), st.lists(st.integers(-2, 40), max_size=3),
                    st.dictionaries(st.text(max_size=4), st.integers(-2, 40), max_size=2))


def _paths(obj, prefix=()):
    """Every key path inside a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _mutate(obj, path, value):
    if not path:
        return None if value is _DELETE else value
    out = copy.deepcopy(obj)
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_edited_recipe_gives_vcon_errors_only(work, data):
    """Change one value anywhere in a real recipe.json: loading either works or raises VconError."""
    original = json.loads((work / "vanished.vcon" / "recipe.json").read_text())
    paths = list(_paths(original))
    path = data.draw(st.sampled_from(paths), label="path")
    value = data.draw(_values, label="value")
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "a.vcon"
        shutil.copytree(work / "vanished.vcon", art)
        (art / "recipe.json").write_text(json.dumps(_mutate(original, path, value)))
        try:
            artifact.load(art)
        except VconError as exc:
            assert "\n" not in str(exc), f"multi-line error: {exc}"


@settings(max_examples=30, deadline=None)
@given(text=st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                         lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=3), max_leaves=12))
def test_any_json_recipe_gives_artifact_error(text):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "recipe.json").write_text(json.dumps(text))
        with pytest.raises(ArtifactError):
            artifact.read_recipe(tmp)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.parametrize("name", ["mlp.pt2", "sd.safetensors"])
def test_damaged_model_files_give_load_errors_only(work, name, data):
    """Truncate a file or flip bytes in it: load_model works (harmless flip) or raises LoadError."""
    blob = bytearray((work / name).read_bytes())
    how = data.draw(st.sampled_from(["truncate", "flip"]), label="how")
    if how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="keep")]
    else:
        for at in data.draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=8), label="at"):
            blob[at] ^= 0xFF
    from vcon_fx.sources.base import read_state_dict

    # A state dict is parsed by read_state_dict (load_model would then build --arch around it).
    read = read_state_dict if name.endswith(".safetensors") else load_model
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(bytes(blob))
        try:
            read(path)
        except VconError as exc:
            assert isinstance(exc, LoadError), type(exc)
            assert "\n" not in str(exc)
