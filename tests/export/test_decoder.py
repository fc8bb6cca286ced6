"""Decoder language models exported with their KV cache, checked by generation, and `vcon-fx generate`.

GPT-2 (dense) runs in the fast set; the tiny Llama (vanished low-rank, with the MiniLM tokenizer in
its folder: one `export --check` of ~50 s that four tests share), Qwen2, Mistral and Phi-3 in the
slow one. Every comparison is against the PyTorch
model run without a cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import vcon_fx
from vcon_fx.errors import UsageError
from vcon_fx.export.decoder import logits_of
from vcon_fx.export.decoder_run import CachedDecoder, layout_of_session
from vcon_fx.export.generate import generate_text
from vcon_fx.methods import LowRankConfig
from vcon_fx.sources.hf import TOKENIZER_FILES
from vcon_fx.sources.load import minilm_path

SMALL = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)


def _family(name: str, vocab: int = 100):
    import transformers as T

    torch.manual_seed(0)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=vocab, hidden_size=32, num_key_value_heads=2, **SMALL))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=vocab, hidden_size=32, num_key_value_heads=2, **SMALL))
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(vocab_size=vocab, hidden_size=32, num_key_value_heads=2,
                                                    sliding_window=None, **SMALL))
    if name == "phi3":
        return T.Phi3ForCausalLM(T.Phi3Config(vocab_size=vocab, hidden_size=32, num_key_value_heads=2,
                                              pad_token_id=0, **SMALL))
    raise KeyError(name)


def _folder(root, name: str, tokenizer: bool = False):
    folder = root / name
    _family(name, vocab=30522 if tokenizer else 100).save_pretrained(folder)
    for file in TOKENIZER_FILES if tokenizer else ():
        if (minilm_path() / file).is_file():
            shutil.copy(minilm_path() / file, folder / file)
    return folder


def vcon(*args: str, cwd) -> subprocess.CompletedProcess:
    # wide enough that no table cell wraps: the tests read the rows' names
    return subprocess.run([sys.executable, "-m", "vcon_fx", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """(work folder, the Llama folder, its vanished low-rank model (saved as llama.small), `export --check` of that)."""
    root = tmp_path_factory.mktemp("decoder")
    folder = _folder(root, "llama", tokenizer=True)
    lm = vcon_fx.load_model(folder)
    vm = vcon_fx.transform(lm.module, LowRankConfig(rank=4), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source)
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    vcon_fx.save(small, root / "llama.small")
    checked = vcon("export", "llama.small", "--onnx", "llama.onnx", "--check", cwd=root)
    return root, folder, small, checked


@pytest.mark.slow
def test_export_check_of_a_vanished_decoder_compares_32_greedy_tokens(llama):
    root, _, _, checked = llama
    out = " ".join(checked.stdout.split())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for row in ("logits (prompt, empty cache)", "logits (32 cached steps)", "greedy tokens (32 steps)",
                "dense (same export)"):
        assert row in out, out
    assert (root / "llama.onnx").is_file()


@pytest.mark.slow
def test_the_file_takes_and_returns_the_cache_by_name(llama):
    root, folder, _, _ = llama
    session = ort.InferenceSession(str(root / "llama.onnx"), providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_seq", 8]  # [batch, kv heads, past, head dim]
    assert inputs["attention_mask"] == ["batch", "total_seq"] and len(inputs) == 3 + 4
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["present.0.key"] == ["batch", 2, "past_seq + seq", 8] and outputs["logits"] == ["batch", "seq", 30522]
    layout = layout_of_session(session)
    assert layout.tokenizer == str(folder.resolve()) and layout.num_layers == 2


@pytest.mark.slow
@pytest.mark.parametrize("batch, prompt", [(3, 1), (1, 6)])
def test_batch_prompt_and_past_are_dynamic(llama, batch, prompt):
    root, _, small, _ = llama
    session = ort.InferenceSession(str(root / "llama.onnx"), providers=["CPUExecutionProvider"])
    runner = CachedDecoder(session, layout_of_session(session))
    ids = torch.randint(0, 30522, (batch, prompt + 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = logits_of(small(input_ids=ids, attention_mask=torch.ones_like(ids))).numpy()
    got = [runner.prefill(ids[:, :prompt].numpy())]
    for k in range(prompt, prompt + 4):  # past 1…9 tokens, one new token each
        got.append(runner.step(ids[:, k].numpy()))
    assert runner.past_length == prompt + 4
    np.testing.assert_allclose(np.concatenate(got, 1)[:, :-1], want[:, :-1], atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.slow
def test_generate_gives_pytorch_greedy_tokens_and_the_cli_prints_them(llama):
    root, folder, small, _ = llama
    result = generate_text(root / "llama.onnx", "the cache makes decoding fast", max_new_tokens=6)
    from transformers import AutoTokenizer

    ids = torch.tensor([AutoTokenizer.from_pretrained(str(folder))("the cache makes decoding fast")["input_ids"]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, logits_of(small(input_ids=ids, attention_mask=torch.ones_like(ids)))[:, -1:].argmax(-1)], 1)
    assert list(result.tokens) == ids[0, -6:].tolist() and result.tokenizer == str(folder.resolve())

    printed = vcon("generate", "llama.onnx", "--prompt", "the cache makes decoding fast", "--max-new-tokens", "6",
                   cwd=root)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("the cache makes decoding fast" + result.text) and "6 new token(s)" in printed.stdout


def _dense_export_checks(tmp_path, name: str) -> None:
    lm = vcon_fx.load_model(_folder(tmp_path, name))
    path = vcon_fx.export_onnx(lm.module, tmp_path / f"{name}.onnx", lm.example_args, example_kwargs=lm.example_kwargs)
    report = vcon_fx.check_onnx(lm.module, path, lm.example_args, example_kwargs=lm.example_kwargs, runs=1).assert_ok()
    assert [o.name for o in report.outputs][2] == "greedy tokens (32 steps)" and report.outputs[2].max_abs_diff == 0
    assert any(i.name == "past_key_values.0.key" for i in ort.InferenceSession(str(path)).get_inputs())
    with pytest.raises(UsageError, match="records no tokenizer.*--tokenizer FOLDER"):
        generate_text(path, "hi")


def test_a_dense_gpt2_exports_its_cache_and_passes_the_check(tmp_path):
    _dense_export_checks(tmp_path, "gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "mistral", "phi3"])
def test_each_decoder_family_exports_its_cache_and_passes_the_check(tmp_path, name):
    _dense_export_checks(tmp_path, name)


@pytest.mark.slow
def test_no_kv_cache_keeps_the_whole_sequence_export(tmp_path):
    lm = vcon_fx.load_model(_folder(tmp_path, "gpt2"))
    path = vcon_fx.export_onnx(lm.module, tmp_path / "g.onnx", lm.example_args, example_kwargs=lm.example_kwargs,
                               seq_inputs=lm.seq_inputs, kv_cache=False)
    assert [i.name for i in ort.InferenceSession(str(path)).get_inputs()] == ["input_ids", "attention_mask"]


@pytest.mark.slow
def test_a_vanished_int4_decoder_exports_matmul_nbits_with_its_cache_and_checks(tmp_path):
    import onnx

    folder = _folder(tmp_path, "llama")
    for args in (["transform", "llama", "--method", "quant", "--bits", "4", "-o", "q.vcon"],
                 ["vanish", "q.vcon", "--force", "-o", "q.small"],
                 ["export", "q.small", "--onnx", "q.onnx", "--matmul-nbits", "--check"]):
        done = vcon(*args, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    assert "greedy tokens (32 steps" in done.stdout and folder.is_dir()
    ops = [n.op_type for n in onnx.load(str(tmp_path / "q.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 14 and "DequantizeLinear" not in ops  # 7 Linear layers × 2 blocks


def test_a_model_without_a_decoder_is_refused_a_cache_and_generate_refuses_its_file(tmp_path, exported, tiny):
    with pytest.raises(UsageError, match="MLP has no KV cache to export: it is not a Hugging Face causal LM"):
        vcon_fx.export_onnx(tiny.MLP(), tmp_path / "m.onnx", (torch.randn(2, 8),), kv_cache=True)
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UsageError, match="takes no past key/values"):
        generate_text(exported["text"].path, "hi")
