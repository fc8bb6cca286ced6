"""Encoder-decoder LMs (T5) exported with their KV cache as two files, checked by generation, and `vcon-fx generate`.

The dense T5 runs in the fast set; the vanished low-rank T5 and the CLI (`export --check`,
`generate` on a folder saved with `save_pretrained`, MiniLM tokenizer beside it) in the slow one.
Every comparison is against the PyTorch model run without a cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import vcon_fx
from vcon_fx.export.check import check_onnx
from vcon_fx.export.onnx import export_onnx
from vcon_fx.export.seq2seq import encoder_path
from vcon_fx.export.seq2seq_check import _torch_greedy
from vcon_fx.export.seq2seq_run import open_seq2seq, seq2seq_layout_of_session
from vcon_fx.methods import LowRankConfig
from vcon_fx.sources.hf import TOKENIZER_FILES
from vcon_fx.sources.load import minilm_path

LAYERS = 2


def _t5_folder(root):
    import transformers as T

    torch.manual_seed(0)
    folder = root / "t5"
    config = T.T5Config(vocab_size=30522, d_model=64, d_ff=128, num_layers=LAYERS, num_heads=4, d_kv=16)
    T.T5ForConditionalGeneration(config).save_pretrained(folder)
    for file in TOKENIZER_FILES:
        if (minilm_path() / file).is_file():
            shutil.copy(minilm_path() / file, folder / file)
    return folder


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    root = tmp_path_factory.mktemp("seq2seq")
    return root, vcon_fx.load_model(_t5_folder(root))


def _names_and_axes(path):
    decoder, encoder = ort.InferenceSession(str(path)), ort.InferenceSession(str(encoder_path(path)))
    assert [i.name for i in encoder.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in encoder.get_outputs()] == ["last_hidden_state"]
    assert [i.shape for i in encoder.get_inputs()] == [["batch", "encoder_seq"]] * 2
    kinds = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")
    names = [i.name for i in decoder.get_inputs()]
    assert names == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"] + [
        f"past_key_values.{i}.{k}" for i in range(LAYERS) for k in kinds]
    assert [o.name for o in decoder.get_outputs()] == ["logits"] + [f"present.{i}.{k}" for i in range(LAYERS)
                                                                    for k in kinds]
    shapes = {i.name: i.shape for i in decoder.get_inputs()}
    assert shapes["input_ids"] == ["batch", "seq"] and shapes["encoder_attention_mask"] == ["batch", "encoder_seq"]
    assert shapes["encoder_hidden_states"] == ["batch", "encoder_new_seq", 64]
    assert shapes["past_key_values.1.decoder.value"] == ["batch", 4, "past_seq", 16]
    assert shapes["past_key_values.1.encoder.key"] == ["batch", 4, "encoder_past_seq", 16]
    return decoder


def _parity(model, path, kwargs, *, varied: bool):
    """The check's rows hold, and free-running greedy tokens (batch 3, a new prompt length) equal PyTorch's."""
    report = check_onnx(model, path, (), example_kwargs=kwargs, runs=2)
    report.assert_ok()
    assert [o.name for o in report.outputs][0] == "logits (first step, empty cache)"
    assert report.outputs[2].name.startswith("greedy tokens (32 steps")
    decoder = ort.InferenceSession(str(path))
    layout = seq2seq_layout_of_session(decoder)
    prompt = torch.randint(5, 30000, (3, 7), generator=torch.Generator().manual_seed(1))
    want, _ = _torch_greedy(model, prompt, 32, layout)
    got = open_seq2seq(path, decoder, layout).greedy(prompt.numpy(), 32).tokens
    np.testing.assert_array_equal(got, want.numpy())
    # the random dense T5 says more than one token, so the run exercises the cache (a low-rank one says 0 only)
    assert len(np.unique(want.numpy())) > 1 or not varied


def test_dense_t5_exports_decoder_with_cache_and_encoder(t5):
    root, lm = t5
    out = export_onnx(lm.module, root / "dense.onnx", lm.example_args, example_kwargs=lm.example_kwargs)
    assert out == root / "dense.onnx" and encoder_path(out) == root / "dense.encoder.onnx"
    layout = seq2seq_layout_of_session(_names_and_axes(out))
    assert layout.encoder == "dense.encoder.onnx" and layout.tokenizer == str((root / "t5").resolve())
    assert layout.decoder_start_token_id == 0  # T5 starts from its padding token (no decoder_start_token_id set)
    _parity(lm.module, out, lm.example_kwargs, varied=True)


def test_an_existing_encoder_file_is_refused_without_force(t5):
    from vcon_fx.errors import OutputExistsError

    root, lm = t5
    (root / "kept.encoder.onnx").write_bytes(b"someone else's file")
    with pytest.raises(OutputExistsError, match="kept.encoder.onnx exists: pass --force"):
        export_onnx(lm.module, root / "kept.onnx", lm.example_args, example_kwargs=lm.example_kwargs)
    assert not (root / "kept.onnx").exists() and (root / "kept.encoder.onnx").read_bytes() == b"someone else's file"


def test_no_kv_cache_keeps_the_whole_model_export(t5):
    root, lm = t5
    out = export_onnx(lm.module, root / "flat.onnx", lm.example_args, example_kwargs=lm.example_kwargs,
                      seq_inputs=lm.seq_inputs, kv_cache=False)
    names = [i.name for i in ort.InferenceSession(str(out)).get_inputs()]
    assert names == ["input_ids", "attention_mask", "decoder_input_ids"] and not encoder_path(out).exists()


@pytest.mark.slow
def test_vanished_lowrank_t5_exports_with_cache(t5):
    root, lm = t5
    vm = vcon_fx.transform(lm.module, LowRankConfig(rank=4), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    out = export_onnx(small, root / "small.onnx", (), example_kwargs=lm.example_kwargs)
    _names_and_axes(out)
    _parity(small, out, lm.example_kwargs, varied=False)


def vcon(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vcon_fx", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_cli_export_check_and_generate_on_a_saved_t5_folder(t5):
    root, _ = t5
    checked = vcon("export", "t5", "--onnx", "cli.onnx", "--check", cwd=root)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "cli.encoder.onnx" in checked.stdout and "greedy tokens (32 steps" in checked.stdout
    assert (root / "cli.encoder.onnx").is_file()
    made = vcon("generate", "cli.onnx", "--prompt", "summarize: the house is small", "--max-new-tokens", "5", cwd=root)
    assert made.returncode == 0, made.stdout + made.stderr
    assert "summarize: the house is small" in made.stdout and "new token(s) after a" in made.stdout
    (root / "cli.encoder.onnx").unlink()
    missing = vcon("generate", "cli.onnx", "--prompt", "hello", cwd=root)
    assert missing.returncode != 0 and "cli.encoder.onnx" in missing.stdout + missing.stderr


def _bart_folder(root):
    import transformers as T

    torch.manual_seed(0)
    folder = root / "bart"
    config = T.BartConfig(vocab_size=30522, d_model=64, encoder_layers=LAYERS, decoder_layers=LAYERS,
                          encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                          decoder_ffn_dim=128)
    T.BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_a_quantized_bart_exports_an_integer_pair_with_the_default_kernels(tmp_path):
    """BART too, and the default export of a quant model (integer_export, kernel auto): it writes through a temporary
    float file, so the encoder must land beside the user's file and the decoder's metadata name it."""
    from vcon_fx.errors import OutputExistsError
    from vcon_fx.export import KERNELS, integer_export
    from vcon_fx.methods import QuantConfig

    lm = vcon_fx.load_model(_bart_folder(tmp_path))
    vm = vcon_fx.transform(lm.module, QuantConfig(bits=8), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    out = tmp_path / "bart.onnx"
    report = integer_export(small, out, (), kernel="auto", example_kwargs=lm.example_kwargs, seq_inputs=lm.seq_inputs)
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["bart.encoder.onnx", "bart.onnx"]
    decoder = _names_and_axes(out)
    assert seq2seq_layout_of_session(decoder).encoder == "bart.encoder.onnx"
    encoder_ops = {n.op_type for n in onnx.load(str(encoder_path(out))).graph.node}
    assert "DynamicQuantizeMatMul" in encoder_ops and "dynamic" in " ".join(report.notes)  # the encoder's integers too
    check_onnx(small, out, (), example_kwargs=lm.example_kwargs, rtol=KERNELS["dynamic"].rtol,
               runs=1).assert_ok()
    out.unlink()  # the decoder gone, its encoder still there: a new export must not replace it silently
    with pytest.raises(OutputExistsError, match="bart.encoder.onnx exists: pass --force"):
        integer_export(small, out, (), kernel="auto", example_kwargs=lm.example_kwargs, seq_inputs=lm.seq_inputs)
    assert not out.exists()
