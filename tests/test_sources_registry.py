"""The model-source registry: every kind registers itself; a new kind is one class; spec JSON unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vcon_fx.errors import LoadError, UsageError
from vcon_fx.sources import registry
from vcon_fx.sources.base import LoadedModel
from vcon_fx.sources.load import load_model, rebuild_model


def test_built_in_kinds_in_their_order():
    kinds = registry.source_kinds()
    assert list(kinds) == ["pt2", "torchvision", "hf", "pickle", "state_dict"]
    assert {name: kind.form for name, kind in kinds.items()} == {
        "pt2": "file", "torchvision": "name", "hf": "folder", "pickle": "file", "state_dict": "file"}
    with pytest.raises(LoadError, match="expected one of pt2, torchvision, hf, pickle, state_dict$"):
        rebuild_model({"kind": "onnx", "path": "m.onnx"})


def test_source_spec_json_is_the_recorded_format(tmp_path):
    """The exact keys, in order, that recipe.json records for a state dict with a torchvision arch."""
    import torchvision

    torch.manual_seed(3)
    path = tmp_path / "w.safetensors"
    save_file(torchvision.models.get_model("squeezenet1_1", weights=None).state_dict(), str(path))
    lm = load_model(path, arch="torchvision:squeezenet1_1", input_shape=(1, 3, 64, 64))
    spec = json.loads(json.dumps(lm.source))
    assert list(spec) == ["kind", "path", "sha256", "arch", "arch_sha256", "input_shape", "seq_len", "batch_size"]
    assert spec["kind"] == "state_dict" and spec["arch"] == "torchvision:squeezenet1_1" and spec["arch_sha256"] is None
    assert spec["input_shape"] == [1, 3, 64, 64] and spec["seq_len"] is None and spec["batch_size"] == 2
    again = rebuild_model(spec)
    assert again.source == lm.source
    with torch.no_grad():
        assert torch.equal(again.module(*again.example_args), lm.module(*lm.example_args))


class _Zoo(registry.SourceKind):
    """A test kind: `zoo:WIDTH` names a seeded Linear(WIDTH, 2)."""

    name, form = "zoo", "name"
    keys, required = ("width",), ("width",)

    def recognises(self, request) -> bool:
        return isinstance(request.source, str) and request.source.startswith("zoo:")

    def load(self, request):
        request.refuse("arch", "a zoo model names its architecture already")
        width = request.text[len("zoo:"):]
        torch.manual_seed(0)
        return LoadedModel(module=nn.Linear(int(width), 2), example_args=(torch.ones(1, int(width)),)), {"width": width}

    def source_of(self, spec) -> str:
        return "zoo:" + spec["width"]

    def recorded_files(self, spec):
        return []


def test_a_registered_kind_loads_and_rebuilds(monkeypatch):
    """Adding a source kind is one decorated class: load_model, rebuild_model and the spec checks see it."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))  # the test's kind leaves with the test
    registry.register_source(_Zoo)
    lm = load_model("zoo:5")
    assert lm.source == {"kind": "zoo", "width": "5", "input_shape": None, "seq_len": None, "batch_size": 2}
    assert not lm.module.training
    again = rebuild_model(json.loads(json.dumps(lm.source)))
    assert torch.equal(again.module.weight, lm.module.weight)
    with pytest.raises(UsageError, match="--arch does not apply to zoo:5: a zoo model names"):
        load_model("zoo:5", arch="torchvision:resnet18")
    with pytest.raises(LoadError, match=r"kind 'zoo' has unknown keys \['path'\]"):
        rebuild_model({**lm.source, "path": "x"})
    with pytest.raises(LoadError, match="registered twice"):
        registry.register_source(_Zoo)
