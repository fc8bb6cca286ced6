"""Your own model on the first try: every way users hand a model over, with default flags, end to end.

Each source (tests/user_sources.py) goes through the README's four commands with no flag beyond
the method: transform → finetune (a few steps on a real data file) → vanish → export --check.
The ONNX then runs in onnxruntime at a batch size (and, for text, a sequence length) other than
the example's, against the vanished model in PyTorch. One source also goes through `compress`.
The quick sources run in `make test`; a causal LM, a torchvision model and the real MiniLM folder
in `make test-zoo`.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

import vcon_fx
from vcon_fx.cli.main import main
from vcon_fx.export.decoder import logits_of
from vcon_fx.export.decoder_run import CachedDecoder, layout_of_session
from vcon_fx.graph.recipe import inputs_from_spec
from vcon_fx.io.artifact import read_recipe
from vcon_fx.sources.load import load_model, minilm_path

from helpers import assert_close_outputs, leaves, run
from user_sources import MAKERS, UserSource, text_lines

FAST = ("static-pt2", "baked-pt2", "dynamic-pt2", "pickled-module", "state-dict-arch", "hf-text-encoder", "hf-vit")
SLOW = ("hf-causal-lm", "torchvision")
STEPS = "3"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("user_sources")


@pytest.fixture(autouse=True)
def in_tmp(tmp_path, monkeypatch):
    """Commands write their default outputs into the current folder, as a user's shell would."""
    monkeypatch.chdir(tmp_path)


def vcon(*argv: str) -> str:
    """Run one vcon-fx command in this process, as the console script would; returns what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in argv])
    assert code == 0, f"vcon-fx {' '.join(map(str, argv))} exited {code}:\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def readme_pipeline(source: UserSource, where: Path, method: tuple[str, ...] = ("--method", "lowrank", "--rank", "8")):
    """transform → finetune → vanish → export --check with default flags; (printed text, ONNX path)."""
    printed = vcon("transform", source.model, *method, *source.flags, "-o", where / "m.vcon")
    trust = ["--trust-pickle"] if "--trust-pickle" in source.flags else []  # every command that rebuilds it
    printed += vcon("finetune", where / "m.vcon", "--data", source.data, "--steps", STEPS, *trust)
    printed += vcon("vanish", where / "m.tuned", *trust)  # writes m.small into the current folder, `where`
    onnx = where / "m.onnx"
    printed += vcon("export", "m.small", "--onnx", onnx, "--check", *trust)
    return printed, onnx


def other_sizes(spec: dict, batch: int, seq: int | None) -> tuple[tuple, dict]:
    """Inputs of the recorded kinds at `batch` (and sequence length `seq` for text inputs)."""
    args, kwargs = inputs_from_spec(spec, batch=batch)
    if seq is not None:
        kwargs = {k: (v[:, :1].repeat(1, seq) if v.dim() == 2 else v) for k, v in kwargs.items()}
    return args, kwargs


def assert_onnx_runs_like_pytorch(small_path: Path, onnx: Path, inputs: tuple[tuple, dict], trust_pickle: bool):
    small = vcon_fx.load(small_path, trust_pickle=trust_pickle)
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    args, kwargs = inputs
    layout = layout_of_session(session)
    if layout is not None:  # a decoder LM's file takes its KV cache: the prompt from an empty cache
        got = CachedDecoder(session, layout).prefill(kwargs["input_ids"].numpy())
        assert_close_outputs([logits_of(run(small, inputs))], [torch.from_numpy(got)], 1e-4, "onnxruntime vs PyTorch")
        return
    names = [i.name for i in session.get_inputs()]
    feed = {k: v.numpy() for k, v in kwargs.items() if k in names}
    feed.update({n: a.numpy() for n, a in zip([n for n in names if n not in feed], args)})
    got = [torch.from_numpy(g) for g in session.run(None, feed)]
    assert_close_outputs(leaves(run(small, inputs)), got, 1e-4, f"onnxruntime vs PyTorch at {[v.shape for v in feed.values()]}")


def check_source(name: str, root: Path, tmp_path: Path) -> str:
    source = MAKERS[name](root)
    printed, onnx = readme_pipeline(source, tmp_path)
    spec = read_recipe(tmp_path / "m.small").inputs
    shapes = {i.name: i.shape for i in ort.InferenceSession(str(onnx)).get_inputs()}
    trust = "--trust-pickle" in source.flags
    if source.fixed_batch is not None:
        # The graph computes with its batch: the ONNX says so, and runs at exactly that batch.
        assert all(shape[0] == source.fixed_batch for shape in shapes.values()), shapes
        assert_onnx_runs_like_pytorch(tmp_path / "m.small", onnx, other_sizes(spec, source.fixed_batch, None), trust)
        return printed
    assert all(shape[0] == "batch" for shape in shapes.values()), shapes
    for batch, seq in ((1, 5 if source.text else None), (3, 23 if source.text else None), (8, None)):
        assert_onnx_runs_like_pytorch(tmp_path / "m.small", onnx, other_sizes(spec, batch, seq), trust)
    return printed


@pytest.mark.parametrize("name", FAST)
def test_the_readme_pipeline_with_default_flags(name, root, tmp_path):
    printed = check_source(name, root, tmp_path)
    if name == "static-pt2":
        assert "re-exported it with a dynamic batch (same outputs)" in printed
    if name == "baked-pt2":
        assert printed.count("baked.pt2 was exported with fixed shapes") == 1  # said once, by transform
        assert 'dynamic_shapes={"input": {0: Dim.AUTO}}' in printed  # their input's name (nn.Sequential's)
        assert "the model runs only at batch 4" in printed and "pads its last partial batch" in printed


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW)
def test_the_readme_pipeline_with_default_flags_zoo(name, root, tmp_path):
    check_source(name, root, tmp_path)


@pytest.mark.slow
def test_the_real_minilm_folder_with_default_flags(root, tmp_path):
    source = UserSource(str(minilm_path()), text_lines(root), text=True)
    printed, onnx = readme_pipeline(source, tmp_path, ("--method", "lowrank", "--ratio", "0.5"))
    assert "static" not in printed
    spec = read_recipe(tmp_path / "m.small").inputs
    for batch, seq in ((1, 7), (5, 40)):
        assert_onnx_runs_like_pytorch(tmp_path / "m.small", onnx, other_sizes(spec, batch, seq), False)


def test_compress_runs_the_same_pipeline_on_a_static_pt2(root, tmp_path):
    source = MAKERS["static-pt2"](root)
    onnx = tmp_path / "out.onnx"
    printed = vcon("compress", source.model, "--method", "lowrank", "--rank", "8", "--data", source.data,
                   "--steps", STEPS, "--onnx", onnx, "--check")
    assert "re-exported it with a dynamic batch" in printed
    spec = read_recipe(tmp_path / "out.work" / "model.small").inputs
    for batch in (1, 7):
        assert_onnx_runs_like_pytorch(tmp_path / "out.work" / "model.small", onnx, other_sizes(spec, batch, None), False)


# ── what each source's captured graph accepts, without the CLI ──────────────────────────────


@pytest.mark.parametrize("name", ["static-pt2", "pickled-module", "state-dict-arch", "hf-text-encoder", "hf-vit"])
def test_captured_graphs_run_at_batch_1_3_and_8(name, root):
    source = MAKERS[name](root)
    flags = dict(zip(source.flags[::2], source.flags[1::2])) if "--arch" in source.flags else {}
    lm = load_model(source.model, trust_pickle="--trust-pickle" in source.flags, arch=flags.get("--arch"))
    tensors = [t for t in (*lm.example_args, *lm.example_kwargs.values()) if isinstance(t, torch.Tensor)]
    assert all(t.shape[0] >= 2 for t in tensors), "an example batch of 1 would be fixed by torch.export"
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_inputs=lm.example_args,
                           example_kwargs=lm.example_kwargs, seq_inputs=lm.seq_inputs, source=lm.source)
    assert "fixed" not in vm.meta["vcon"].inputs
    spec = vm.meta["vcon"].inputs
    seqs = (6, 19) if source.text else (None,)
    for batch in (1, 3, 8):
        for seq in seqs:
            out = leaves(run(vm, other_sizes(spec, batch, seq)))
            assert out[0].shape[0] == batch and (seq is None or out[0].shape[1] == seq)


def test_an_input_shape_with_batch_1_is_captured_at_batch_2_and_says_so(root):
    lm = load_model("torchvision:squeezenet1_1", input_shape=(1, 3, 64, 64))
    assert lm.example_args[0].shape == (2, 3, 64, 64)
    assert any("example batch 1 → 2" in note for note in lm.notes)


def test_a_baked_pt2_records_its_fixed_batch_and_training_uses_it(root):
    source = MAKERS["baked-pt2"](root)
    lm = load_model(source.model)
    assert len(lm.notes) == 1 and "stay fixed" in lm.notes[0]
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_inputs=lm.example_args, source=lm.source)
    assert vm.meta["vcon"].inputs["fixed"] == {"batch": 4}
    data = torch.utils.data.TensorDataset(torch.rand(10, 64), torch.randint(0, 10, (10,)))  # 10: a partial batch
    result = vcon_fx.finetune(vm, data, steps=2)
    assert result.steps == 2 and 0 <= result.metrics["after"] <= 1
    with pytest.raises(vcon_fx.errors.ConfigError, match="only at batch 4.*--batch-size 4"):
        vcon_fx.finetune(vm, data, steps=2, batch_size=8)


def test_a_text_pt2_with_fixed_batch_and_sequence_says_so_and_refuses_another_length(root, tmp_path):
    from transformers import BertConfig, BertModel

    from vcon_fx.data import load_data_for
    from vcon_fx.errors import DataError

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=64)).eval()
    ids = torch.randint(0, 100, (1, 16))
    program = torch.export.export(bert, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    torch.export.save(program, tmp_path / "bert.pt2")
    lm = load_model(tmp_path / "bert.pt2")
    assert len(lm.notes) == 1 and "stay fixed" in lm.notes[0]
    assert '"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "attention_mask": {0: Dim.AUTO, 1: Dim.AUTO}' in lm.notes[0]
    vm = vcon_fx.transform(lm.module, vcon_fx.LowRankConfig(rank=4), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source)
    assert vm.meta["vcon"].inputs["fixed"] == {"batch": 1, "sequence": 16}
    with pytest.raises(DataError, match="only at sequence length 16.*--seq-len 16"):
        load_data_for(vm, text_lines(root), seq_len=32)
