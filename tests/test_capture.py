"""Capture and normalize: which path, what it says, and the layers it lifts.

    capture: fx → export → fx with failing submodules kept whole; --capture forces a path;
             a failure names the module and source line each tracer stopped at.
    normalize: F.linear / aten.linear / addmm (Hugging Face Conv1D) on parameters → real layers,
             one name per weight; tied weights recorded with the reason.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig
from vcon_fx.graph.capture import capture
from vcon_fx.errors import CaptureError, UsageError
from vcon_fx.graph.normalize import normalize
from vcon_fx.graph.select import find_sites, select

from helpers import assert_close_outputs, assert_identity_at_beta_one, assert_vanish_parity
from zoo import MLP, FunctionalLinear, SharedLinear


# ── models that trace, partly trace, or do not trace ───────────────────────────────────────


class Gate(nn.Module):
    """Data-dependent Python control flow: neither tracer can follow it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


class PartlyTraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.gate, self.fc2, self.head = (nn.Linear(8, 32), nn.Linear(32, 32), Gate(),
                                                               nn.Linear(32, 32), nn.Linear(32, 2))

    def forward(self, x):
        return self.head(self.fc2(self.gate(self.fc1(self.stem(x)))))


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = self.fc(x)
        if h.sum().item() > 0:  # the line both tracers stop at
            return h.relu()
        return h


class KeywordModel(nn.Module):
    """Keyword inputs and optional arguments, as Hugging Face models take them."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc, self.drop, self.head = nn.Embedding(50, 16), nn.Linear(16, 16), nn.Dropout(0.5), nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None, labels=None):
        h = self.drop(torch.relu(self.fc(self.emb(input_ids))))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        return self.head(h.mean(1))


class AddmmLinear(nn.Module):
    """Hugging Face's Conv1D: y = addmm(b, x, W) with W stored (in, out)."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx**0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        shape = x.shape[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(shape)


class Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.mid, self.head = nn.Linear(8, 32), AddmmLinear(32, 48), nn.Linear(48, 3)

    def forward(self, x):
        return self.head(torch.relu(self.mid(torch.relu(self.stem(x)))))


class TiedPair(nn.Module):
    """Two Linear modules holding one weight Parameter (tied weights, not one layer called twice)."""

    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.head = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(self.b(torch.relu(self.a(torch.relu(self.stem(x))))))


def _normalized(model, *args, **kwargs):
    return normalize(capture(model, args, kwargs).gm)


def _param_names(module: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


# ── --capture forcing ─────────────────────────────────────────────────────────────────────


def test_auto_prefers_fx_and_each_path_can_be_forced():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16)
    auto, fx_only, export_only = (capture(model, (x,), mode=m) for m in ("auto", "fx", "export"))
    assert (auto.path, fx_only.path, export_only.path) == ("fx", "fx", "export")
    assert auto.notes == [] and not export_only.gm.meta.get("vcon_exported") is None
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in export_only.gm.graph.nodes)
    for c in (auto, fx_only, export_only):
        assert_close_outputs(model(x), c.gm(x), 1e-6, f"{c.path} graph vs model")
    vm = vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_inputs=(x,), capture="export")
    assert vm.meta["vcon"].capture == "export"


class _AttentionNet(nn.Module):
    """torch.fx keeps nn.MultiheadAttention whole: its in/out projections are only reachable by export."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.stem, self.fc, self.head = nn.Linear(8, d), nn.Linear(d, d), nn.Linear(d, 3)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.fc(h))).mean(1)


def test_auto_opens_multihead_attention_with_export_and_says_so():
    torch.manual_seed(0)
    model, x = _AttentionNet().eval(), torch.randn(2, 5, 8)
    vm = vcon_fx.transform(model, LowRankConfig(rank=4), example_inputs=(x,))
    recipe = vm.meta["vcon"]
    assert recipe.capture == "export"
    assert any("MultiheadAttention" in n and "torch.export" in n for n in recipe.notes), recipe.notes
    assert any("attn" in p for p in vcon_fx.get_betas(vm))  # the projections are compressed
    assert_identity_at_beta_one(model, vm, ((x,), {}))
    assert_vanish_parity(vm, ((x,), {}))

    fx_vm = vcon_fx.transform(model, LowRankConfig(rank=4), example_inputs=(x,), capture="fx")
    assert fx_vm.meta["vcon"].capture == "fx" and list(vcon_fx.get_betas(fx_vm)) == ["fc"]
    kept = capture(model, (x,), mode="auto", leaf_modules=("attn",))  # asked for: fx keeps it whole
    assert kept.path == "fx"


def test_unknown_capture_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="--capture must be one of"):
        capture(MLP(), (torch.randn(2, 16),), mode="jit")


def test_keyword_inputs_trace_with_fx_and_keep_dropout():
    torch.manual_seed(0)
    model = KeywordModel().eval()
    kwargs = {"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6)}
    captured = capture(model, (), kwargs)
    assert captured.path == "fx", captured.notes
    gm = captured.gm
    gm.train()
    assert not torch.equal(gm(**kwargs), gm(**kwargs)), "dropout should be active in train mode"
    gm.eval()
    assert_close_outputs(model(**kwargs), gm(**kwargs), 1e-6, "keyword-input fx graph")


def test_hugging_face_falls_back_to_export_and_fx_forced_names_the_construct():
    import transformers as T

    torch.manual_seed(0)
    model = T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100, attn_implementation="eager")).eval()
    kwargs = {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    auto = capture(model, (), kwargs, seq_inputs=("input_ids", "attention_mask"))
    assert auto.path == "export"
    assert auto.notes and auto.notes[0].startswith("torch.fx failed (") and "used torch.export" in auto.notes[0]
    with pytest.raises(CaptureError) as info:
        capture(model, (), kwargs, mode="fx")
    message = str(info.value)
    assert "torch.fx failed" in message and "transformers/" in message and ".py:" in message  # file:line of the construct
    assert "--capture export" in message


def test_decoder_is_captured_without_kv_cache_and_says_so():
    import transformers as T

    torch.manual_seed(0)
    config = T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32, bos_token_id=0,
                          eos_token_id=0, use_cache=True)
    model = T.GPT2LMHeadModel(config).eval()
    captured = capture(model, (), {"input_ids": torch.randint(0, 100, (2, 5))}, seq_inputs=("input_ids",))
    assert any("use_cache=False" in n for n in captured.notes), captured.notes
    assert model.config.use_cache is True, "capture must give the config back as it was"
    out = captured.gm(input_ids=torch.randint(0, 100, (3, 9)))
    assert getattr(out, "past_key_values", None) is None


# ── failures: the message names the construct; a partial capture still reports ───────────


def test_capture_failure_names_the_line_and_the_fixes(capsys):
    x = torch.randn(2, 8)
    with pytest.raises(CaptureError) as info:
        capture(Untraceable(), (x,))
    message = str(info.value)
    assert "could not capture Untraceable" in message
    assert "torch.fx failed" in message and "torch.export failed" in message
    assert message.count("if h.sum().item() > 0:") == 2, message  # both tracers point at the line
    assert "test_capture.py:" in message
    assert "leaf module" in message and "--ignore" in message
    with pytest.raises(CaptureError, match="--capture export"):
        capture(Untraceable(), (x,), mode="fx")
    with pytest.raises(CaptureError, match="--capture fx"):
        capture(Untraceable(), (x,), mode="export")
    out = capsys.readouterr()
    assert out.out == "" and out.err == "", "the library printed (torch.export dumps graphs on failure)"


def test_failing_submodule_is_kept_whole_and_the_rest_is_compressed():
    torch.manual_seed(0)
    model, x = PartlyTraceable().eval(), torch.randn(4, 8)
    captured = capture(model, (x,))
    assert captured.path == "fx" and captured.leaves == ["gate"]
    assert any("gate (Gate)" in n and "kept whole" in n for n in captured.notes), captured.notes
    assert any("x.sum() > 0" in n for n in captured.notes)
    assert [n.target for n in captured.gm.graph.nodes if n.op == "call_module"] == ["stem", "fc1", "gate", "fc2", "head"]

    compression_plan = vcon_fx.plan(model, LowRankConfig(ratio=0.25), example_inputs=(x,))
    assert [g.name for g in compression_plan.groups] == ["fc1", "fc2"]
    assert any("kept whole" in n for n in compression_plan.notes)
    vm = vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_inputs=(x,))
    assert_identity_at_beta_one(model, vm, ((x,), {}))
    assert_vanish_parity(vm, ((x,), {}))

    with pytest.raises(CaptureError, match=r"in gate \(Gate\)"):  # forced export: nothing to keep whole
        capture(model, (x,), mode="export")


def test_leaf_modules_are_kept_whole_on_request():
    torch.manual_seed(0)
    model, x = MLP().eval(), torch.randn(4, 16)
    captured = capture(model, (x,), leaf_modules=("fc2",))
    assert captured.path == "fx"
    assert [n.target for n in captured.gm.graph.nodes if n.op == "call_module"][2] == "fc2"


# ── normalize: lifting ─────────────────────────────────────────────────────────────────────


def test_functional_linear_is_lifted_onto_the_same_parameter_with_one_name():
    torch.manual_seed(0)
    model, x = FunctionalLinear().eval(), torch.randn(4, 8)
    gm = _normalized(model, x)
    layers = {n.target: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    lifted = [m for p, m in layers.items() if p not in ("stem", "head")]
    assert len(lifted) == 1 and type(lifted[0]) is nn.Linear
    assert lifted[0].weight is model.weight and lifted[0].bias is model.bias  # nothing copied
    assert all(len(names) == 1 for names in _param_names(gm).values()), _param_names(gm)
    assert_close_outputs(model(x), gm(x), 1e-6, "lifted F.linear")
    gm.graph.lint()
    sites = find_sites(gm, (x,))
    selection = select(gm, sites)
    assert [g.name for g in selection.groups] == [p for p in layers if p not in ("stem", "head")]


@pytest.mark.parametrize("mode", ["fx", "export"])
def test_addmm_conv1d_is_lifted_to_a_transposed_linear(mode):
    torch.manual_seed(0)
    model, x = Conv1DNet().eval(), torch.randn(4, 8)
    gm = normalize(capture(model, (x,), mode=mode).gm)
    mid = gm.get_submodule("mid")
    assert type(mid) is nn.Linear and mid.weight.shape == (48, 32)
    torch.testing.assert_close(mid.weight, model.mid.weight.t(), rtol=0, atol=0)
    assert mid.bias is model.mid.bias
    assert not any(n.op == "call_function" and "addmm" in str(n.target) for n in gm.graph.nodes)
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())
    assert_close_outputs(model(x), gm(x), 1e-6, f"lifted addmm ({mode})")
    vm = vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_inputs=(x,), capture=mode)
    assert [g.name for g in vm.meta["vcon"].groups] == ["mid"]


def test_addmm_on_a_weight_read_elsewhere_is_left_alone():
    """A transposed copy would untie the weight from its other reader: normalize leaves it functional."""

    class Shared(Conv1DNet):
        def forward(self, x):
            h = torch.relu(self.mid(torch.relu(self.stem(x))))
            return self.head(h) + self.mid.weight.sum()

    torch.manual_seed(0)
    model, x = Shared().eval(), torch.randn(4, 8)
    gm = _normalized(model, x)
    assert any(n.op == "call_function" and "addmm" in str(n.target) for n in gm.graph.nodes)
    assert_close_outputs(model(x), gm(x), 1e-6, "untouched addmm")


# ── tied and shared weights ────────────────────────────────────────────────────────────────


def test_layer_called_twice_is_one_group_and_stays_one_layer():
    torch.manual_seed(0)
    case_model, x = SharedLinear().eval(), torch.randn(4, 8)
    vm = vcon_fx.transform(case_model, LowRankConfig(ratio=0.25), example_inputs=(x,))
    assert [g.name for g in vm.meta["vcon"].groups] == ["shared"]
    assert [n.target for n in vm.graph.nodes if n.op == "call_module"].count("shared") == 2
    small = assert_vanish_parity(vm, ((x,), {}))
    assert [n.target for n in small.graph.nodes if n.op == "call_module"].count("shared") == 2  # one twin, two calls


def test_tied_modules_are_refused_with_the_reason():
    torch.manual_seed(0)
    model, x = TiedPair().eval(), torch.randn(4, 8)
    compression_plan = vcon_fx.plan(model, LowRankConfig(ratio=0.5), example_inputs=(x,), include_stem=True)
    excluded = compression_plan.selection.excluded
    assert "a" in excluded and "b" in excluded
    assert "tied" in excluded["a"] and "b.weight" in excluded["a"]
    assert [g.name for g in compression_plan.groups] == ["stem"]


def test_gpt2_tied_lm_head_is_refused_even_with_include_head():
    import transformers as T

    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32,
                                           bos_token_id=0, eos_token_id=0)).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    kwargs = {"input_ids": torch.randint(0, 100, (2, 6))}
    compression_plan = vcon_fx.plan(model, LowRankConfig(ratio=0.25), example_kwargs=kwargs,
                                    seq_inputs=("input_ids",), include_head=True)
    assert compression_plan.capture == "export"
    reason = compression_plan.selection.excluded["lm_head"]
    # the exported lookup is lifted into the stem transformer.wte (dense by default): half a tie is refused
    assert reason.startswith("refused:") and "tied to transformer.wte" in reason and "--include-stem" in reason, reason
    # the Conv1D layers (addmm) are lifted and compressed: four per block, and the position table
    assert sorted(g.name for g in compression_plan.groups) == sorted(
        ["transformer.wpe"] + [f"transformer.h.0.{p}" for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])
    vm = vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_kwargs=kwargs, seq_inputs=("input_ids",),
                           include_head=True)
    gm_names = _param_names(vm)
    wte = vm.get_submodule("lm_head").weight
    assert len(gm_names[id(wte)]) == 2, "embedding and lm_head must still share one tensor"
    assert_identity_at_beta_one(model, vm, ((), kwargs))
