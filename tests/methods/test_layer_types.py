"""The layer types beyond Linear / Conv1d / Conv2d: 3-D and transposed convolutions, embeddings
(tied to an output head or not) and recurrent layers, with every method.

The zoo (tests/zoo.py: unet, video3d, lstm_lm, recurrent_tagger) runs them through the four
invariants in tests/test_invariants.py; here: each layout's factorization is exact at full rank,
the per-layer reasons for what does not apply, embeddings deployed as integer tables gathered
then dequantized, tied embeddings kept tied (or refused together), and the recurrent kernels'
gradients.
"""

from __future__ import annotations

import copy
from collections import Counter

import onnx
import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig, PruneConfig, QuantConfig
from vcon_fx.methods import recurrent_kernels
from vcon_fx.methods.layouts import assign_factors, factor_layers
from vcon_fx.methods.svd import truncated_svd

from helpers import (
    assert_close_outputs,
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_params_promised,
    assert_vanish_parity,
    run,
)

CONFIGS = {
    "lowrank": LowRankConfig(ratio=0.25),
    "prune": PruneConfig(sparsity=0.5),
    "quant": QuantConfig(bits=8),
    "quant4": QuantConfig(bits=4),
    "lowrank+quant": vcon_fx.ComposeConfig((LowRankConfig(ratio=0.25), QuantConfig(bits=8))),
}


def _pipeline(model, inputs, config, tmp_path, seq_inputs=(), **options):
    """transform → identity → vanish parity → promised size → ONNX parity; returns (vm, small, onnx path)."""
    args, kwargs = inputs
    vm = vcon_fx.transform(model, config, example_inputs=args, example_kwargs=kwargs, seq_inputs=seq_inputs,
                           **options)
    assert_identity_at_beta_one(model, vm, inputs)
    small = assert_vanish_parity(copy.deepcopy(vm), inputs)
    assert_params_promised(small, model, small.meta["vcon"])
    path = assert_onnx_parity(small, inputs, tmp_path, seq_inputs)
    return vm, small, path


# ── low-rank on each layout: exact at full rank ──────────────────────────────────────────


@pytest.mark.parametrize("layer,x", [
    (nn.Conv3d(4, 6, 3, padding=1), torch.randn(2, 4, 3, 5, 5)),
    (nn.ConvTranspose1d(6, 4, 4, stride=2, padding=1), torch.randn(2, 6, 7)),
    (nn.ConvTranspose2d(6, 5, 3, stride=2, output_padding=1), torch.randn(2, 6, 4, 4)),
    (nn.ConvTranspose3d(4, 3, 2, stride=2), torch.randn(2, 4, 2, 3, 3)),
    (nn.Embedding(30, 8, padding_idx=0), torch.randint(0, 30, (2, 5))),
], ids=["conv3d", "convtranspose1d", "convtranspose2d", "convtranspose3d", "embedding"])
def test_each_layout_factorizes_exactly_at_full_rank(layer, x):
    torch.manual_seed(0)
    rank = min(layer.weight.shape[0], layer.weight[0].numel())
    down, up = factor_layers(layer, rank)
    a, b = truncated_svd(layer.weight.detach().reshape(layer.weight.shape[0], -1), rank, "exact")
    assign_factors(layer, down, up, a, b)
    with torch.no_grad():
        assert_close_outputs(layer(x), up(down(x)), 1e-5, f"{type(layer).__name__} vs its rank-{rank} factors")


class _Decoder1d(nn.Module):
    """Conv1d stem → ConvTranspose1d ×2 (one grouped) → Conv1d head: an audio-style upsampler."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv1d(2, 16, 3, padding=1)
        self.up1 = nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose1d(16, 16, 4, stride=2, padding=1, groups=4)
        self.depthwise = nn.Conv3d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv1d(16, 1, 1)

    def forward(self, x):
        x = torch.relu(self.up2(torch.relu(self.up1(torch.relu(self.stem(x))))))
        x = self.depthwise(x[:, :, None, None, :].expand(-1, -1, 2, 2, -1)).mean(dim=(2, 3))
        return self.head(x)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_transposed_and_grouped_convolutions_with_every_method(method, tmp_path):
    torch.manual_seed(0)
    model, x = _Decoder1d().eval(), torch.randn(2, 2, 12)
    vm, _small, _path = _pipeline(model, ((x,), {}), CONFIGS[method], tmp_path)
    plans = vm.meta["vcon"].plans
    assert not plans["up1"].skipped, plans["up1"].skip_reason
    if method.startswith("lowrank"):  # a factor shared across groups would mix channels the layer never mixes
        assert "grouped convolution (groups=4)" in plans["up2"].skip_reason
        assert "depthwise convolution" in plans["depthwise"].skip_reason
    else:
        assert not plans["up2"].skipped and not plans["depthwise"].skipped


def test_structured_pruning_says_why_new_types_keep_their_channels():
    torch.manual_seed(0)
    model = _Decoder1d().eval()
    plan = vcon_fx.plan(model, PruneConfig(sparsity=0.5, structured=True), example_inputs=(torch.randn(2, 2, 12),),
                        granularity="block", blocks=("up1",))
    assert "a ConvTranspose1d keeps its own" in plan.plans["up1"].skip_reason


# ── embeddings: integer tables gathered, then dequantized ──────────────────────────────────


class _LM(nn.Module):
    """Embedding → Linear + tanh → vocabulary head, the head's weight tied to the embedding or not."""

    def __init__(self, tied: bool, vocab: int = 300, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _lm_case(tied: bool):
    torch.manual_seed(0)
    return _LM(tied).eval(), ((), {"ids": torch.randint(0, 300, (2, 6))})


def _initializers(path) -> dict[str, onnx.TensorProto]:
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def _table_node(path):
    """The Gather reading the embedding table, and the table's initializer."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].dims[0] == 300 and inits[n.input[0]].dims[1] > 1]
    assert len(gathers) == 1, [n.input for n in model.graph.node if n.op_type == "Gather"]
    return gathers[0], inits[gathers[0].input[0]], model


@pytest.mark.parametrize("method,storage", [("quant", onnx.TensorProto.INT8), ("quant4", onnx.TensorProto.UINT8),
                                            ("prune", onnx.TensorProto.FLOAT)])
def test_embedding_is_gathered_from_its_stored_table(method, storage, tmp_path):
    model, inputs = _lm_case(tied=False)
    vm, small, path = _pipeline(model, inputs, CONFIGS[method], tmp_path, ("ids",), include_stem=True)
    assert "embed" in vcon_fx.get_betas(vm)
    gather, table, graph = _table_node(path)
    assert table.data_type == storage
    width = {onnx.TensorProto.UINT8: 16}.get(storage, 32)  # 4-bit: two values per byte
    assert list(table.dims) == [300, width]
    # the Gather reads the stored table itself: no dequantized copy of the whole table is ever made
    assert not [n for n in graph.graph.node if table.name in n.input and n is not gather], table.name
    if method.startswith("quant"):
        plan = vm.meta["vcon"].plans["embed"]
        assert plan.detail["act_bits"] is None and "gathered, then dequantized" in plan.detail["store"]


def test_lowrank_embedding_is_a_narrow_table_and_a_matmul(tmp_path):
    model, inputs = _lm_case(tied=False)
    vm, small, path = _pipeline(model, inputs, LowRankConfig(rank=8), tmp_path, ("ids",), include_stem=True)
    twin = small.get_submodule("embed")
    assert isinstance(twin.down, nn.Embedding) and tuple(twin.down.weight.shape) == (300, 8)
    assert isinstance(twin.up, nn.Linear) and tuple(twin.up.weight.shape) == (32, 8)
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["Gather"] >= 1 and ops["MatMul"] >= 1
    assert vm.meta["vcon"].plans["embed"].flops_after == 2 * 8 * 32 * 12  # the lookup is free; the matmul is not


def test_embedding_with_max_norm_stays_dense_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(50, 16, max_norm=1.0), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    plan = vcon_fx.plan(model, QuantConfig(bits=8), example_inputs=(torch.randint(0, 50, (2, 5)),), include_stem=True)
    assert "max_norm" in plan.plans["0"].skip_reason


# ── tied embeddings ────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_tied_embedding_and_head_share_one_compressed_table(method, tmp_path):
    model, inputs = _lm_case(tied=True)
    vm, small, path = _pipeline(model, inputs, CONFIGS[method], tmp_path, ("ids",), include_stem=True,
                                include_head=True)
    plans = vm.meta["vcon"].plans
    assert plans["head"].detail["tied_to"] == "embed" and not plans["head"].skipped
    assert plans["head"].params_after == 300  # its bias: the table is counted with the embedding
    # one module, two places: the vanished head computes with the embedding's own table
    assert small.get_submodule("head").table is small.get_submodule("embed")
    tables = [n for n, t in list(small.named_parameters()) + list(small.named_buffers()) if t.shape[:1] == (300,)
              and t.dim() == 2]
    assert len(tables) == 1 or method.startswith("lowrank"), tables  # deduplicated: stored once
    # … and so does the ONNX file (tables above the exporter's 8192-value folding limit are never copied)
    big = [i.name for i in _initializers(path).values() if 300 in i.dims and len(i.dims) == 2 and 1 not in i.dims]
    assert len(big) == 1, big


def test_tied_pair_round_trips_through_save_and_load(tmp_path):
    model, inputs = _lm_case(tied=True)
    vm = vcon_fx.transform(model, QuantConfig(bits=4), example_kwargs=inputs[1], seq_inputs=("ids",),
                           include_stem=True, include_head=True)
    vcon_fx.set_beta(vm, 0.3)
    back = vcon_fx.load(vcon_fx.save(vm, tmp_path / "blended"), model=model)
    assert_close_outputs(run(vm, inputs), run(back, inputs), 1e-6, "loaded tied vs saved")
    assert back.get_submodule("head").compressed.table is back.get_submodule("embed").compressed
    vcon_fx.set_beta(vm, 0.0)
    small = vcon_fx.vanish(vm)
    back_small = vcon_fx.load(vcon_fx.save(small, tmp_path / "vanished"), model=model)
    assert_close_outputs(run(small, inputs), run(back_small, inputs), 1e-6, "loaded tied vanished vs saved")
    assert back_small.get_submodule("head").table is back_small.get_submodule("embed")


@pytest.mark.parametrize("options,refused", [
    ({"include_stem": True}, "embed"),  # the head stays dense as the head: the embedding may not go alone
    ({"include_head": True}, "head"),
])
def test_half_a_tie_is_refused_with_the_reason(options, refused):
    model, inputs = _lm_case(tied=True)
    plan = vcon_fx.plan(model, QuantConfig(bits=8), example_kwargs=inputs[1], seq_inputs=("ids",), **options)
    reason = plan.selection.excluded[refused]
    assert reason.startswith("refused") and "tied" in reason and "untie" in reason
    assert [g.name for g in plan.groups] == ["mid"]


def test_a_tie_inside_block_granularity_is_refused():
    model, inputs = _lm_case(tied=True)
    plan = vcon_fx.plan(model, QuantConfig(bits=8), example_kwargs=inputs[1], seq_inputs=("ids",),
                        include_stem=True, include_head=True, granularity="block", blocks=("mid",))
    assert "untie" in plan.selection.excluded["embed"] and "untie" in plan.selection.excluded["head"]


def test_a_tied_head_follows_its_embedding_when_it_stays_dense():
    model, inputs = _lm_case(tied=True)
    plan = vcon_fx.plan(model, LowRankConfig(rank=31), example_kwargs=inputs[1], seq_inputs=("ids",),
                        include_stem=True, include_head=True)
    assert plan.plans["embed"].skipped  # rank 31 of a 300×32 table saves nothing
    assert "stays dense" in plan.plans["head"].skip_reason and "still tied" in plan.plans["head"].skip_reason


# ── recurrent layers ───────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_recurrent_kernel_ops_match_the_kernels_and_their_gradients(kind):
    torch.manual_seed(0)
    layer = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](6, 5, num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 6, requires_grad=True)
    states = [torch.randn(4, 3, 5) for _ in range(2 if kind == "lstm" else 1)]
    weights = [w.detach().clone().requires_grad_() for w in layer._flat_weights]
    flags, kernel_flags = (True, 2, True, False), (True, 2, 0.0, False, True, False)
    if kind == "lstm":
        got = recurrent_kernels.lstm(x, *states, weights, *flags)
        want = torch._VF.lstm(x, tuple(states), weights, *kernel_flags)
    elif kind == "gru":
        got = recurrent_kernels.gru(x, *states, weights, *flags)
        want = torch._VF.gru(x, *states, weights, *kernel_flags)
    else:
        got = recurrent_kernels.rnn(x, *states, weights, *flags, False)
        want = torch._VF.rnn_tanh(x, *states, weights, *kernel_flags)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    grads = torch.autograd.grad(sum(t.sum() for t in got), [x, *weights])
    want_grads = torch.autograd.grad(sum(t.sum() for t in want), [x, *weights])
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(40, 8), nn.LSTM(8, 12, batch_first=True), nn.Linear(12, 3)

    def forward(self, ids):
        return self.head(self.lstm(self.embed(ids))[0])


def test_a_recurrent_twin_trains_and_refuses_packed_sequences():
    torch.manual_seed(0)
    net, ids = _Tagger().eval(), torch.randint(0, 40, (3, 5))
    vm = vcon_fx.transform(net, LowRankConfig(rank=4), example_inputs=(ids,))
    blend = vm.get_submodule("lstm")
    vcon_fx.set_beta(vm, 0.5)
    vm.train()
    vm(ids).sum().backward()  # train mode: the kernels themselves, gradients to every factor
    assert all(p.grad is not None for p in blend.compressed.parameters())
    vm.eval()
    vm(ids).sum().backward()  # eval mode: the ops of recurrent_kernels.py, with their backward
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 5, 8), [5, 4, 2], batch_first=True)
    with pytest.raises(vcon_fx.errors.ConfigError, match="PackedSequence"):
        blend.compressed(packed)


def test_an_unbatched_sequence_runs_through_the_recurrent_twin():
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 12, num_layers=2).eval()
    vm = vcon_fx.transform(nn.Sequential(lstm), QuantConfig(bits=8), example_inputs=(torch.randn(5, 2, 8),),
                           include_stem=True, include_head=True)
    twin = vm.get_submodule("0").compressed
    x = torch.randn(5, 8)  # (seq, features): no batch dim
    out, (h, c) = twin(x)
    ref, (ref_h, ref_c) = vm.get_submodule("0").dense(x)
    assert out.shape == ref.shape and h.shape == ref_h.shape and c.shape == ref_c.shape
    torch.testing.assert_close(out, ref, atol=0.05, rtol=0.05)
