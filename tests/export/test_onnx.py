"""export_onnx: real exports of tiny models, read back with onnx and run with onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from vcon_fx.errors import ExportError, OutputExistsError, UsageError
from vcon_fx.export import onnx as onnx_export
from vcon_fx.export.naming import flatten_inputs, flatten_outputs
from vcon_fx.export.onnx import export_onnx


def io_dims(path) -> dict:
    """Graph input/output name -> dims (a str for a dynamic dim, an int for a static one)."""
    graph = onnx.load(str(path)).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def run_ort(path, feeds: dict) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.mark.parametrize("name, expected", [
    ("mlp", {"x": ["batch", 8], "output": ["batch", 4]}),
    ("conv", {"x": ["batch", 3, 8, 8], "output": ["batch", 5]}),
    ("dict", {"x": ["batch", 6], "scores": ["batch", 3], "aux_0": ["batch", 2], "aux_1": ["batch"]}),
    ("text", {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"], "output": ["batch", 3]}),
])
def test_names_and_dynamic_axes(exported, name, expected):
    assert io_dims(exported[name].path) == expected
    onnx.checker.check_model(str(exported[name].path))


def test_export_restores_train_flags(exported):
    # every conftest model was in train mode at export; BatchNorm/Dropout ran in eval meanwhile
    assert all(m.training for case in exported.values() for m in case.model.modules())


@pytest.mark.parametrize("capture", ["fx", "export"])
def test_graph_modules_export_like_the_model(exported, tiny, tmp_path, capture):
    """A symbolic_trace GraphModule and a torch.export module give the same ONNX interface."""
    case = exported["text"]
    model = case.model.eval()
    if capture == "fx":
        gm = torch.fx.symbolic_trace(model)
    else:
        auto = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
        gm = torch.export.export(model, (), case.kwargs, dynamic_shapes={k: auto for k in case.kwargs}).module()
    path = export_onnx(gm, tmp_path / "gm.onnx", (), example_kwargs=case.kwargs, seq_inputs=case.seq_inputs)
    assert io_dims(path) == io_dims(case.path)
    other = tiny.text_inputs(4, 11)
    (got,) = run_ort(path, other)
    with torch.no_grad():
        want = model(**other).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    model.train()


def test_a_graph_with_fixed_shapes_gives_an_onnx_with_those_shapes(exported, tmp_path):
    """torch.export without dynamic shapes fixes every size: the ONNX says so in its input shapes
    (instead of an error after the work, or a file that only looks dynamic)."""
    import onnxruntime as ort

    case = exported["text"]
    gm = torch.export.export(case.model.eval(), (), case.kwargs).module()
    case.model.train()
    out = export_onnx(gm, tmp_path / "static.onnx", (), example_kwargs=case.kwargs, seq_inputs=case.seq_inputs)
    shapes = {i.name: i.shape for i in ort.InferenceSession(str(out)).get_inputs()}
    assert shapes["input_ids"] == list(case.kwargs["input_ids"].shape)  # numbers, not "batch" / "seq"
    assert all(isinstance(d, int) for shape in shapes.values() for d in shape)


class Pinned(nn.Module):
    def forward(self, x):
        return x.reshape(2, 4, 2)  # a literal size: only batch 2 fits


def test_a_model_that_pins_the_batch_is_refused(tmp_path):
    # torch.export keeps a symbol for x's batch but pins its range to [2, 2]; the ONNX file
    # would drop that range and look dynamic, so export refuses
    with pytest.raises(ExportError, match=r"Pinned made dims static.*x dim 0 \(batch\) is fixed to 2"):
        export_onnx(Pinned(), tmp_path / "pinned.onnx", (torch.randn(2, 8),))


def test_refuses_to_overwrite_without_force(tiny, tmp_path, monkeypatch, capfd):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"keep me")
    model = tiny.MLP()
    model.fc1.eval()  # mixed flags, which export must give back as they were
    with pytest.raises(OutputExistsError, match="--force"):
        export_onnx(model, out, (torch.randn(2, 8),))
    assert out.read_bytes() == b"keep me"

    # with force, and (by a lowered threshold) the large-model route: weights beside the file
    monkeypatch.setattr(onnx_export, "INLINE_LIMIT_BYTES", 0)
    export_onnx(model, out, (torch.randn(2, 8),), force=True)
    assert capfd.readouterr() == ("", "")  # the library never prints, nor does the exporter for it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert model.training and not model.fc1.training and model.fc2.training
    onnx.checker.check_model(str(out))
    x = torch.randn(3, 8)
    (got,) = run_ort(out, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model.eval()(x).numpy(), rtol=1e-5, atol=1e-6)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # a branch on a value: torch.export cannot capture it
            return x.nonzero()
        return x


def test_exporter_failure_is_an_export_error(tmp_path, capsys):
    with pytest.raises(ExportError) as info:
        export_onnx(DataDependent(), tmp_path / "bad.onnx", (torch.ones(2, 3),))
    message = str(info.value)
    assert "DataDependent" in message and "--capture export" in message and "static" in message
    assert "\n" not in message and "\x1b" not in message
    assert capsys.readouterr() == ("", "")  # the exporter's graph dumps went to the debug log
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_come_before_any_work(tiny, tmp_path):
    with pytest.raises(UsageError, match=r"seq_inputs \['ids'\].*\['input_ids', 'attention_mask'\]"):
        export_onnx(tiny.TextModel(), tmp_path / "t.onnx", (), example_kwargs=tiny.text_inputs(2, 3), seq_inputs=("ids",))
    with pytest.raises(UsageError, match="tuple"):
        export_onnx(tiny.MLP(), tmp_path / "m.onnx", [[1, 2]][0][0])
    with pytest.raises(UsageError, match="do not fit MLP.forward"):
        export_onnx(tiny.MLP(), tmp_path / "m.onnx", (torch.randn(2, 8), torch.randn(2, 8)))
    assert list(tmp_path.iterdir()) == []


def test_flatten_names_follow_signature_and_pytree():
    class Two(nn.Module):
        def forward(self, x, pair, scale=2, mask=None):
            return x

    args = (torch.ones(1), [torch.ones(1), torch.ones(1)])
    names = [n for n, _ in flatten_inputs(Two(), args, {"scale": 3, "mask": torch.ones(1)})]
    assert names == ["x", "pair_0", "pair_1", "mask"]
    t = torch.ones(1)
    assert [n for n, _ in flatten_outputs(t)] == ["output"]
    assert [n for n, _ in flatten_outputs((t, [t, None]))] == ["output_0", "output_1_0"]
    assert [n for n, _ in flatten_outputs({"a b": t, "c": (t, 1)})] == ["a_b", "c_0"]


def test_flatten_names_hugging_face_model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    t = torch.ones(1)
    out = outputs.SequenceClassifierOutput(logits=t, hidden_states=(t, t))
    assert [n for n, _ in flatten_outputs(out)] == ["logits", "hidden_states_0", "hidden_states_1"]
