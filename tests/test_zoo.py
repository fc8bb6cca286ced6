"""Any architecture, no code changes: Hugging Face families and torchvision models, every method.

    HF folder ──load_model──► transform ─► β = 1 identity ─► fine-tune (β 1 → 0) ─► vanish parity
              ─► ONNX ─► onnxruntime at the export shapes, batch + 1, and another batch AND sequence length

Every registered method runs on every model with its default config from METHOD_CONFIGS (one
place for all test modules: a registered method without an entry fails
`test_every_registered_method_has_a_default_config`).
The invariant checks are those of helpers.py. Also here: train/eval behaviour of traced and
exported graphs, and batch-norm statistics under layer and block blends.

The fast set (`-m "not slow"`) runs BERT through the whole pipeline with low-rank and the
train/eval checks; `make test-zoo` (`-m slow`) runs the rest.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vcon_fx
from vcon_fx import LowRankConfig, MethodConfig
from vcon_fx.sources.load import load_model

from helpers import (
    ONNX_TOL,
    _ort_run,
    _ort_session,
    assert_close_outputs,
    assert_identity_at_beta_one,
    assert_onnx_parity,
    assert_params_promised,
    assert_vanish_parity,
    leaves,
    run,
    stored_values,
)
from zoo import MLP, ConvBNReLU, ResidualNet, ZooCase

# ── the default config of every registered method: one place for every test module ─────

try:  # where it belongs, beside the zoo it configures
    from zoo import METHOD_CONFIGS
except ImportError:  # until then: the invariant tests' matrix (method → model name → config)
    from test_invariants import METHOD_CONFIGS

METHODS = sorted(vcon_fx.registered_methods())


def default_config(method: str, model: str) -> MethodConfig:
    if method not in METHOD_CONFIGS:
        pytest.fail(f"registered method {method!r} has no default config in METHOD_CONFIGS")
    return METHOD_CONFIGS[method](model)


def test_every_registered_method_has_a_default_config():
    missing = sorted(set(vcon_fx.registered_methods()) - set(METHOD_CONFIGS))
    assert not missing, f"registered method(s) {missing} have no default config in METHOD_CONFIGS"
    for name in vcon_fx.registered_methods():
        config = METHOD_CONFIGS[name]("any model")
        assert config.method == name and type(config) is vcon_fx.registered_methods()[name]


# ── Hugging Face: tiny configs, saved and loaded like a user's folder ───────────────────────

SEQ, BATCH = 8, 2
OTHER_SEQ, OTHER_BATCH = 11, 3  # shapes the export never saw


def _hf_model(family: str):
    import transformers as T

    small = dict(num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if family == "bert":
        return T.BertModel(T.BertConfig(hidden_size=32, vocab_size=100, max_position_embeddings=64, **small))
    if family == "vit":
        return T.ViTForImageClassification(T.ViTConfig(hidden_size=32, image_size=32, patch_size=8, num_labels=5, **small))
    if family == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                              bos_token_id=0, eos_token_id=0))
    if family == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_key_value_heads=1, vocab_size=100,
                                                max_position_embeddings=64, **small))
    if family == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                       vocab_size=100, decoder_start_token_id=0))
    if family == "bart":
        return T.BartForConditionalGeneration(T.BartConfig(
            d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100, max_position_embeddings=64))
    raise KeyError(family)


HF_FAMILIES = ("bert", "vit", "gpt2", "llama", "t5", "bart")
HF_FAST = {("lowrank", "bert")}  # the one HF pipeline in the fast set


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """family → a folder written by save_pretrained (built once per session)."""
    folders = {}

    def get(family: str):
        if family not in folders:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"hf_{family}")
            _hf_model(family).save_pretrained(folder)
            folders[family] = folder
        return folders[family]
    return get


def hf_case(folder, family: str) -> ZooCase:
    lm = load_model(folder, seq_len=SEQ, batch_size=BATCH)
    return ZooCase(family, lm.module, tuple(lm.example_args), dict(lm.example_kwargs), tuple(lm.seq_inputs))


def other_shape_inputs(case: ZooCase, batch: int, seq: int):
    """Inputs at another batch and (for text) another sequence length, with some padding."""
    gen = torch.Generator().manual_seed(7)
    vocab = getattr(case.model.config, "vocab_size", 2)

    def like(name: str, t: torch.Tensor) -> torch.Tensor:
        shape = (batch, seq, *t.shape[2:]) if name in case.seq_inputs else (batch, *t.shape[1:])
        if t.is_floating_point():
            return torch.randn(shape, generator=gen)
        if "mask" in name:
            mask = torch.ones(shape, dtype=t.dtype)
            mask[0, seq - 3:] = 0
            return mask
        if "type" in name:
            return torch.zeros(shape, dtype=t.dtype)
        return torch.randint(1, vocab, shape, generator=gen, dtype=t.dtype)

    return tuple(like(f"input_{i}", a) for i, a in enumerate(case.args)), {k: like(k, v) for k, v in case.kwargs.items()}


def main_output(out) -> torch.Tensor:
    """logits when the model has a head, else last_hidden_state (else the first tensor)."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return leaves(out)[0]


def distill(vm: nn.Module, inputs, steps: int = 4, lr: float = 1e-3) -> list[float]:
    """A few steps of the plain VCON loop: Adam, MSE to the β = 1 outputs, β linear 1 → 0 (in place)."""
    target = main_output(run(vm, inputs)).detach()  # β = 1: the original model is its own teacher
    params = [p for p in vm.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = vcon_fx.BetaSchedule(vm, "linear", transition=steps - 1)
    args, kwargs = inputs
    losses = []
    vm.train()
    for _ in range(steps):
        loss = F.mse_loss(main_output(vm(*args, **kwargs)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    vm.eval()
    assert sched.done and set(vcon_fx.get_betas(vm).values()) == {0.0}
    assert all(torch.isfinite(torch.tensor(losses))), losses
    return losses


def assert_onnx_other_shapes(path, small: nn.Module, inputs) -> None:
    """onnxruntime equals PyTorch on the main output at a batch and sequence length the export never saw."""
    session = _ort_session(path)
    names = [o.name for o in session.get_outputs()]
    ref = run(small, inputs)
    got = dict(zip(names, _ort_run(session, inputs)))
    key = next((k for k in ("logits", "last_hidden_state") if k in got), names[0])
    assert_close_outputs([main_output(ref)], [torch.from_numpy(got[key])], ONNX_TOL,
                         f"onnxruntime vs PyTorch ({key}) at other batch/sequence")


def full_pipeline(case: ZooCase, config: MethodConfig, tmp_path, other_inputs, **options):
    """transform → identity → distill → vanish parity → params → ONNX at three shapes. Returns the recipe."""
    inputs = (case.args, case.kwargs)
    vm = vcon_fx.transform(case.model, config, example_inputs=case.args, example_kwargs=case.kwargs,
                           seq_inputs=case.seq_inputs, **options)
    vm.graph.lint()
    assert_identity_at_beta_one(case.model, vm, inputs)
    # The size promise is checked before training: fine-tuning moves biases that started at zero,
    # which the non-zero count of pruning would read as extra stored values.
    untrained = assert_vanish_parity(copy.deepcopy(vm), inputs)
    recipe = untrained.meta["vcon"]
    assert_params_promised(untrained, case.model, recipe)
    distill(vm, inputs)
    small = assert_vanish_parity(vm, inputs)
    assert stored_values(small) == stored_values(untrained), "fine-tuning changed what the vanished model stores"
    path = assert_onnx_parity(small, inputs, tmp_path, case.seq_inputs)
    assert_onnx_other_shapes(path, small, other_inputs)
    return recipe


def _hf_params():
    out = []
    for method in METHODS:
        for family in HF_FAMILIES:
            marks = [] if (method, family) in HF_FAST else [pytest.mark.slow]
            out.append(pytest.param(method, family, id=f"{method}-{family}", marks=marks))
    return out


@pytest.mark.parametrize("method,family", _hf_params())
def test_hf_family_through_the_pipeline(method, family, hf_folder, tmp_path):
    case = hf_case(hf_folder(family), family)
    other = other_shape_inputs(case, OTHER_BATCH, OTHER_SEQ)
    recipe = full_pipeline(case, default_config(method, family), tmp_path, other)
    assert recipe.capture == "export"  # transformers ≥ 5 have no FX tracer: the fallback is automatic
    assert any(n.startswith("torch.fx failed") for n in recipe.notes), recipe.notes
    if family in ("gpt2", "llama", "t5", "bart"):
        assert any("use_cache=False" in n for n in recipe.notes), recipe.notes
    # every Linear of the transformer blocks is compressed (GPT-2's Conv1D included, lifted to Linear)
    per_block = {"bert": 6, "vit": 6, "gpt2": 4, "llama": 7, "t5": None, "bart": None}[family]
    if per_block:  # beside them only embedding tables (position / token type; the token table is the stem)
        linears = [g.name for g in recipe.groups if recipe.plans[g.layers[0]].kind != "Embedding"]
        assert len(linears) == 2 * per_block, linears


# ── torchvision at small input sizes ─────────────────────────────────────────────────────

# Not in zoo.ZOO (test_invariants covers resnet18, mobilenet_v3_small and vit_b_16 there).
TORCHVISION = {
    "squeezenet1_1": {}, "efficientnet_b0": {}, "regnet_y_400mf": {}, "densenet121": {},
    "convnext_tiny": {}, "swin_t": {}, "vit_b_32": {"image_size": 32},
}


def tv_case(name: str) -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **TORCHVISION[name]).eval()
    size = TORCHVISION[name].get("image_size", 64)
    return ZooCase(name, model, (torch.randn(2, 3, size, size),))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION))
@pytest.mark.parametrize("method", METHODS)
def test_torchvision_through_the_pipeline(method, name, tmp_path):
    case = tv_case(name)
    gen = torch.Generator().manual_seed(3)
    other = ((torch.randn(3, *case.args[0].shape[1:], generator=gen),), {})
    full_pipeline(case, default_config(method, name), tmp_path, other)


# ── torchvision video and optical flow ────────────────────────────────────────────────────

# (frames, pixels) of each clip: the smallest every model accepts (MViT and S3D fix 16×224×224)
VIDEO = {"r3d_18": (4, 64), "mc3_18": (4, 64), "r2plus1d_18": (4, 64), "swin3d_t": (4, 64),
         "s3d": (16, 224), "mvit_v1_b": (16, 224), "mvit_v2_s": (16, 224)}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(VIDEO))
def test_torchvision_video_through_the_pipeline(name, tmp_path):
    """Every weight of these models sits in Conv3d (or Linear / attention): all of it is compressible now."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    frames, pixels = VIDEO[name]
    case = ZooCase(name, model, (torch.randn(2, 3, frames, pixels, pixels),))
    config = default_config("lowrank", name)
    vm = vcon_fx.transform(model, config, example_inputs=case.args)
    inputs = (case.args, {})
    assert_identity_at_beta_one(model, vm, inputs)
    small = assert_vanish_parity(vm, inputs)
    recipe = small.meta["vcon"]
    assert_params_promised(small, model, recipe)
    assert stored_values(small) < 0.6 * stored_values(model), "the Conv3d layers were not compressed"
    stems = [p for p, why in recipe.excluded.items() if why.startswith("first layer")]
    assert stems and not any(isinstance(model.get_submodule(p), nn.Linear) for p in stems), stems
    assert_onnx_parity(small, inputs, tmp_path)


@pytest.mark.slow
def test_raft_small_through_the_pipeline(tmp_path):
    """RAFT compresses and vanishes; its ONNX takes fixed shapes: with a dynamic batch the exporter's
    constant folding fails on the dense model too (benchmarks/ZOO.md)."""
    import torchvision

    from vcon_fx.export.onnx import export_onnx

    torch.manual_seed(0)
    model = torchvision.models.optical_flow.raft_small(weights=None).eval()
    frames = tuple(torch.randn(2, 3, 128, 128) for _ in range(2))
    inputs = (frames, {})
    vm = vcon_fx.transform(model, default_config("lowrank", "raft_small"), example_inputs=frames)
    assert_identity_at_beta_one(model, vm, inputs)
    small = assert_vanish_parity(vm, inputs)
    assert_params_promised(small, model, small.meta["vcon"])
    path = export_onnx(small, tmp_path / "raft.onnx", frames, dynamic_batch=False)
    session = _ort_session(path)
    got = _ort_run(session, inputs)
    assert_close_outputs(leaves(run(small, inputs)), [torch.from_numpy(g) for g in got], ONNX_TOL,
                         "onnxruntime vs PyTorch, raft_small at the export shapes")


# ── train / eval ──────────────────────────────────────────────────────────────────────────


def _transform(model, x, **options):
    return vcon_fx.transform(model, LowRankConfig(ratio=0.25), example_inputs=(x,), **options)


def test_fx_graph_keeps_dropout_and_batchnorm_behaviour():
    torch.manual_seed(0)
    model, x = MLP(dropout=0.5).eval(), torch.randn(16, 16)
    vm = _transform(model, x)
    assert vm.meta["vcon"].capture == "fx"
    vm.train()
    assert not torch.equal(vm(x), vm(x)), "dropout is off in train mode"
    vm.eval()
    assert_close_outputs(model(x), vm(x), 1e-6, "eval mode after train mode")

    conv = ConvBNReLU().eval()
    vm = _transform(conv, torch.randn(2, 3, 8, 8))
    bn = vm.get_submodule("body.1")
    before = bn.running_mean.clone()
    vm.train()
    vm(torch.randn(4, 3, 8, 8))
    assert int(bn.num_batches_tracked) == 1 and not torch.equal(bn.running_mean, before)
    vm.eval()
    frozen = bn.running_mean.clone()
    vm(torch.randn(4, 3, 8, 8))
    assert torch.equal(bn.running_mean, frozen)


def test_exported_graph_is_eval_mode_even_when_training():
    """Decided: an exported graph fine-tunes without dropout and with batch-norm statistics frozen."""
    torch.manual_seed(0)
    model, x = MLP(dropout=0.5).eval(), torch.randn(16, 16)
    vm = _transform(model, x, capture="export")
    assert vm.meta["vcon"].capture == "export"
    vm.train()
    assert_close_outputs(model(x), vm(x), 1e-6, "exported graph in train mode vs eval model")

    conv = ConvBNReLU().eval()
    vm = _transform(conv, torch.randn(2, 3, 8, 8), capture="export")
    state = {k: v.clone() for k, v in vm.state_dict().items() if "running" in k or "num_batches" in k}
    assert state, "the exported graph has no batch-norm buffers"
    vm.train()
    vm(torch.randn(4, 3, 8, 8)).sum().backward()
    assert all(torch.equal(vm.state_dict()[k], v) for k, v in state.items()), "BN statistics changed"


def test_layer_blend_batchnorm_sees_the_blended_output_once():
    """conv → Blend → BN: in train mode BN normalizes (and tracks) β·conv(x) + (1−β)·twin(x), once."""
    torch.manual_seed(0)
    model = ConvBNReLU().eval()
    x = torch.randn(4, 3, 8, 8)
    vm = _transform(model, x)
    blend, bn = vm.get_submodule("body.0"), vm.get_submodule("body.1")
    assert isinstance(blend, vcon_fx.Blend) and isinstance(bn, nn.BatchNorm2d)
    seen = []
    bn.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    blend_in = []
    blend.register_forward_pre_hook(lambda _m, inp: blend_in.append(inp[0].detach().clone()))
    vcon_fx.set_beta(vm, 0.5)
    start = bn.running_mean.clone()
    vm.train()
    vm(x)
    assert len(seen) == 1 and int(bn.num_batches_tracked) == 1
    with torch.no_grad():
        expected = 0.5 * blend.dense(blend_in[0]) + 0.5 * blend.compressed(blend_in[0])
    torch.testing.assert_close(seen[0], expected)
    # running_mean ← (1 − m)·running_mean + m·mean(what BN saw)
    torch.testing.assert_close(bn.running_mean, (1 - bn.momentum) * start + bn.momentum * expected.mean(dim=(0, 2, 3)))


def test_layer_blend_at_beta_one_tracks_the_original_statistics():
    torch.manual_seed(0)
    model = ConvBNReLU().eval()
    x = torch.randn(4, 3, 8, 8)
    vm = _transform(model, x)
    reference = copy.deepcopy(model).train()
    vm.train()
    vm(x)
    reference(x)
    for path in ("body.1", "body.4"):
        torch.testing.assert_close(vm.get_submodule(path).running_mean, reference.get_submodule(path).running_mean)
        torch.testing.assert_close(vm.get_submodule(path).running_var, reference.get_submodule(path).running_var)


def test_block_blend_gives_each_branch_its_own_batchnorm():
    """Block granularity: the dense block keeps the original BNs, the twin has copies; each tracks its branch."""
    torch.manual_seed(0)
    model = ResidualNet().eval()
    x = torch.randn(4, 3, 8, 8)
    vm = _transform(model, x, granularity="block", blocks=("layer1.*",))
    blend = vm.get_submodule("layer1.0")
    dense_bns = [m for m in blend.dense.modules() if isinstance(m, nn.BatchNorm2d)]
    comp_bns = [m for m in blend.compressed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(dense_bns) == len(comp_bns) == 2
    assert not {id(b) for m in dense_bns for b in m.buffers()} & {id(b) for m in comp_bns for b in m.buffers()}

    # β = 1: only the dense branch runs, and its statistics are the original model's
    reference = copy.deepcopy(model).train()
    vm.train()
    vm(x)
    reference(x)
    ref_bn = reference.layer1[0].bn1
    torch.testing.assert_close(dense_bns[0].running_mean, ref_bn.running_mean)
    assert [int(m.num_batches_tracked) for m in comp_bns] == [0, 0], "the idle twin's BN was updated"

    # 0 < β < 1: each branch's BN sees its own branch's activations, once per forward
    vcon_fx.set_beta(vm, 0.5)
    vm(x)
    assert [int(m.num_batches_tracked) for m in dense_bns] == [2, 2]
    assert [int(m.num_batches_tracked) for m in comp_bns] == [1, 1]
    assert not torch.allclose(dense_bns[0].running_mean, comp_bns[0].running_mean)
