"""Embeddings of Hugging Face models (captured with torch.export) and of traced `F.embedding` calls.

An exported graph looks a table up with `aten.embedding` on a `get_attr` weight; normalize lifts
it into an nn.Embedding holding the same Parameter, so the token embedding is the stem, compressed
with --include-stem by every method, and an LM head reading the same table is tied to it: one
compressed table for both. Small configs, built here (nothing downloaded): GPT-2 (tied), Llama
(untied and tied), BERT (word / position / token-type embeddings, its MLM decoder tied).
The fast set runs GPT-2 end to end (low-rank and int4); the other families, int8, pruning and
the KV-cache export of a vanished GPT-2 with compressed ends are in the slow one.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig, PruneConfig, QuantConfig
from vcon_fx.graph.capture import capture
from vcon_fx.graph.normalize import normalize

from helpers import (
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_params_promised,
    assert_vanish_parity,
)

# 4-bit tables are packed 2 values a byte: above 8192 bytes the ONNX optimizer never folds the
# tied head's unpacked copy into a float constant (a tiny table would be stored twice).
VOCAB = 600
TOKEN_EMBEDDING = {"gpt2": "transformer.wte", "llama": "model.embed_tokens", "llama_tied": "model.embed_tokens",
                   "bert": "bert.embeddings.word_embeddings"}
HEAD = {"gpt2": "lm_head", "llama": "lm_head", "llama_tied": "lm_head", "bert": "cls.predictions.decoder"}
SEQ = ("input_ids", "attention_mask")


def _family(name: str) -> nn.Module:
    import transformers as T

    torch.manual_seed(0)
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64))
    if name in ("llama", "llama_tied"):
        return T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=32, pad_token_id=0, tie_word_embeddings=name == "llama_tied"))
    if name == "bert":
        return T.BertForMaskedLM(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, intermediate_size=64, max_position_embeddings=32))
    raise KeyError(name)


def _inputs(batch: int = 2, seq: int = 6):
    ids = torch.randint(1, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))
    return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _pipeline(model, config, tmp_path, **options):
    """transform → β = 1 identity → vanish parity → promised size → ONNX parity at batch + 1, seq + 1."""
    inputs = _inputs()
    vm = vcon_fx.transform(model, config, example_kwargs=inputs[1], seq_inputs=SEQ, **options)
    assert_identity_at_beta_one(model, vm, inputs)
    small = assert_vanish_parity(copy.deepcopy(vm), inputs)
    assert_params_promised(small, model, small.meta["vcon"])
    return vm, small, assert_onnx_parity(small, inputs, tmp_path, SEQ)


def _vocab_tables(path) -> list[onnx.TensorProto]:
    """The ONNX initializers with one row of values per token: the stored embedding tables (not their scales)."""
    return [i for i in onnx.load(str(path)).graph.initializer
            if len(i.dims) == 2 and i.dims[0] == VOCAB and i.dims[1] > 1]


def test_an_exported_lookup_becomes_an_embedding_on_the_same_parameter():
    model = _family("llama_tied").eval()
    gm = normalize(capture(copy.deepcopy(model), (), _inputs()[1], mode="export", seq_inputs=SEQ).gm)
    embedding, head = gm.get_submodule("model.embed_tokens"), gm.get_submodule("lm_head")
    assert type(embedding) is nn.Embedding and embedding.padding_idx == 0  # the lookup's options travel along
    assert embedding.weight is head.weight  # one Parameter, no copy: a tie, not a reader that forbids the head
    assert not gm.meta["vcon_tied"]
    assert not [n for n in gm.graph.nodes if n.op == "call_function" and "embedding" in str(n.target)]


@pytest.mark.parametrize("name", [
    "gpt2", *(pytest.param(n, marks=pytest.mark.slow) for n in ("llama", "llama_tied", "bert"))])
def test_each_family_compresses_its_token_embedding_and_keeps_a_tie_whole(name, tmp_path):
    model = _family(name).eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    vm, small, path = _pipeline(model, LowRankConfig(ratio=0.25), tmp_path, include_stem=True, include_head=True)
    plans, embedding, head = vm.meta["vcon"].plans, TOKEN_EMBEDDING[name], HEAD[name]
    assert not plans[embedding].skipped and not plans[head].skipped, (plans[embedding].skip_reason,
                                                                     plans[head].skip_reason)
    rank = plans[embedding].detail["rank"]
    assert isinstance(small.get_submodule(embedding).down, nn.Embedding)
    tables = _vocab_tables(path)
    if tied:  # one narrow table in the file, read by the lookup and the logits alike
        assert plans[head].detail["tied_to"] == embedding
        assert small.get_submodule(head).table is small.get_submodule(embedding)
        assert [list(t.dims) for t in tables] == [[VOCAB, rank]]
    else:
        assert "tied_to" not in plans[head].detail
        assert [VOCAB, rank] in [list(t.dims) for t in tables] and [VOCAB, 32] not in [list(t.dims) for t in tables]


@pytest.mark.parametrize("config,storage,width", [
    pytest.param(QuantConfig(bits=8), onnx.TensorProto.INT8, 32, marks=pytest.mark.slow),
    (QuantConfig(bits=4), onnx.TensorProto.UINT8, 16),  # two 4-bit values a byte
    pytest.param(PruneConfig(sparsity=0.5), onnx.TensorProto.FLOAT, 32, marks=pytest.mark.slow),
], ids=["int8", "int4", "prune"])
def test_a_tied_gpt2_table_is_quantized_or_pruned_once_for_both_ends(config, storage, width, tmp_path):
    model = _family("gpt2").eval()
    vm, small, path = _pipeline(model, config, tmp_path, include_stem=True, include_head=True)
    assert vm.meta["vcon"].plans["lm_head"].detail["tied_to"] == "transformer.wte"
    (table,) = _vocab_tables(path)
    assert table.data_type == storage and list(table.dims) == [VOCAB, width]
    graph = onnx.load(str(path)).graph
    readers = [n.op_type for n in graph.node if table.name in n.input]
    assert "Gather" in readers and len(readers) >= 2, readers  # the lookup and the tied logits read one table


def test_default_flags_keep_the_token_embedding_and_head_dense():
    plan = vcon_fx.plan(_family("gpt2").eval(), LowRankConfig(ratio=0.25), example_kwargs=_inputs()[1],
                        seq_inputs=SEQ)
    excluded = plan.selection.excluded
    assert excluded["transformer.wte"].startswith("first layer (stem / embedding) stays dense")
    assert excluded["lm_head"].startswith("last layer (classifier / head) stays dense")
    assert "transformer.wpe" in plan.plans  # the position table is an embedding like any other


def test_bert_calls_its_word_embedding_the_stem():
    plan = vcon_fx.plan(_family("bert").eval(), QuantConfig(bits=8), example_kwargs=_inputs()[1], seq_inputs=SEQ)
    assert plan.selection.excluded["bert.embeddings.word_embeddings"].startswith("first layer")
    assert {"bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"} <= set(plan.plans)


class _FunctionalLM(nn.Module):
    """A table used through F.embedding and F.linear (as a traced graph records it), or also by a matmul."""

    def __init__(self, matmul: bool = False):
        super().__init__()
        self.table = nn.Parameter(torch.randn(50, 16))
        self.mid = nn.Linear(16, 16)
        self.matmul = matmul

    def forward(self, ids):
        h = torch.tanh(self.mid(F.embedding(ids, self.table, padding_idx=-1)))
        return h @ self.table.t() if self.matmul else F.linear(h, self.table)


def test_a_traced_functional_embedding_is_lifted_and_tied_to_its_head(tmp_path):
    model, ids = _FunctionalLM().eval(), torch.randint(0, 50, (2, 5))
    vm = vcon_fx.transform(model, QuantConfig(bits=8), example_inputs=(ids,), include_stem=True, include_head=True)
    assert vm.meta["vcon"].plans["table_linear"].detail["tied_to"] == "weight_embedding"
    dense = vm.get_submodule("weight_embedding").dense
    assert dense.padding_idx == 49 and dense.weight is vm.get_submodule("table_linear").dense.weight
    assert_identity_at_beta_one(model, vm, ((ids,), {}))
    assert_vanish_parity(copy.deepcopy(vm), ((ids,), {}))


def test_a_table_also_read_by_a_matmul_stays_dense_with_the_reason():
    model, ids = _FunctionalLM(matmul=True).eval(), torch.randint(0, 50, (2, 5))
    plan = vcon_fx.plan(model, QuantConfig(bits=8), example_inputs=(ids,), include_stem=True, include_head=True)
    reason = plan.selection.excluded["weight_embedding"]
    assert reason.startswith("refused") and "also read by node" in reason and "untie" in reason


@pytest.mark.slow
def test_a_vanished_gpt2_with_compressed_ends_exports_its_kv_cache(tmp_path):
    import onnxruntime as ort

    _family("gpt2").save_pretrained(tmp_path / "gpt2")
    lm = vcon_fx.load_model(tmp_path / "gpt2")
    vm = vcon_fx.transform(lm.module, LowRankConfig(ratio=0.25), example_kwargs=lm.example_kwargs,
                           seq_inputs=lm.seq_inputs, source=lm.source, include_stem=True, include_head=True)
    assert vm.meta["vcon"].plans["lm_head"].detail["tied_to"] == "transformer.wte"
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    path = vcon_fx.export_onnx(small, tmp_path / "g.onnx", lm.example_args, example_kwargs=lm.example_kwargs)
    assert any(i.name == "past_key_values.0.key" for i in ort.InferenceSession(str(path)).get_inputs())
    report = vcon_fx.check_onnx(small, path, lm.example_args, example_kwargs=lm.example_kwargs, runs=1).assert_ok()
    assert report.outputs[2].name == "greedy tokens (32 steps)" and report.outputs[2].max_abs_diff == 0
    assert len(_vocab_tables(path)) == 1  # still tied in the cached file
