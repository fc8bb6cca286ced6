"""Models handed over the ways users hand them over, written to disk as users write them.

Each maker saves one kind of source into a folder and returns what the CLI is given (a path or
`torchvision:NAME`), the extra flags that kind needs (`--trust-pickle`, `--arch`), and the data
file a user would fine-tune it on: real handwritten digits (scikit-learn), or real English text
(CPython's `pydoc_data.topics`). Nothing is made friendlier than the defaults: a `.pt2` is
exported at batch 1 without `dynamic_shapes`, as `torch.export.export(model, (x,))` does.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from pickles import DigitsMLP

__all__ = ["UserSource", "MAKERS", "digits_npz", "digits_images", "text_lines"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@dataclass
class UserSource:
    """What a user types: `model`, plus `flags`; `data` to fine-tune on; `text` for text models."""

    model: str
    data: Path
    flags: list[str] = field(default_factory=list)
    text: bool = False
    fixed_batch: int | None = None  # the batch a static .pt2's graph computes with


def digits_npz(root: Path) -> Path:
    """Real handwritten digits, 8×8 flattened to 64 features in [0, 1], with their labels."""
    from sklearn.datasets import load_digits

    path = root / "digits.npz"
    if not path.exists():
        digits = load_digits()
        np.savez(path, inputs=(digits.data / 16).astype(np.float32), labels=digits.target.astype(np.int64))
    return path


def digits_images(root: Path, count: int = 120) -> Path:
    """The same digits as PNG files in one folder per class (an image folder)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = root / "digits_images"
    if not folder.exists():
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images[:count], digits.target[:count])):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(folder / str(label) / f"{i}.png")
    return folder


def text_lines(root: Path, count: int = 200) -> Path:
    """Real English sentences, one per line, from CPython's own documentation topics."""
    import pydoc_data.topics

    path = root / "text.txt"
    if not path.exists():
        lines = [ln.strip() for topic in pydoc_data.topics.topics.values() for ln in topic.splitlines()
                 if len(ln.strip()) > 40]
        path.write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    return path


def _tokenizer_into(folder: Path) -> None:
    from vcon_fx.sources.load import minilm_path

    for name in TOKENIZER_FILES:
        if (minilm_path() / name).is_file():
            shutil.copy(minilm_path() / name, folder / name)


def _bert(folder: Path) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    _tokenizer_into(folder)
    return folder


def static_pt2(root: Path) -> UserSource:
    """(a) `torch.export.save(torch.export.export(model, (x,)))` at batch 1, no dynamic_shapes."""
    torch.manual_seed(0)
    torch.export.save(torch.export.export(DigitsMLP().eval(), (torch.rand(1, 64),)), root / "static.pt2")
    return UserSource(str(root / "static.pt2"), digits_npz(root))


def baked_pt2(root: Path) -> UserSource:
    """(a') a static .pt2 whose graph reshapes with its batch (`x.view(x.size(0), -1)`): it stays fixed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Unflatten(1, (8, 8)), FlattenByBatch(), DigitsMLP()).eval()
    torch.export.save(torch.export.export(model, (torch.rand(4, 64),)), root / "baked.pt2")
    return UserSource(str(root / "baked.pt2"), digits_npz(root), fixed_batch=4)


class FlattenByBatch(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def dynamic_pt2(root: Path) -> UserSource:
    """(b) a .pt2 exported with a dynamic batch."""
    torch.manual_seed(0)
    program = torch.export.export(DigitsMLP().eval(), (torch.rand(4, 64),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / "dynamic.pt2")
    return UserSource(str(root / "dynamic.pt2"), digits_npz(root))


def pickled_module(root: Path) -> UserSource:
    """(c) `torch.save(model)`: a pickled nn.Module, loaded only with --trust-pickle."""
    torch.manual_seed(0)
    torch.save(DigitsMLP(), root / "whole.pt")
    return UserSource(str(root / "whole.pt"), digits_npz(root), ["--trust-pickle"])


def state_dict_with_arch(root: Path) -> UserSource:
    """(d) a state dict (.safetensors) with --arch naming a Hugging Face folder."""
    arch = _bert(root / "bert_arch")
    torch.manual_seed(1)
    from transformers import AutoModel

    save_file(AutoModel.from_pretrained(arch).state_dict(), str(root / "bert_weights.safetensors"))
    return UserSource(str(root / "bert_weights.safetensors"), text_lines(root), ["--arch", str(arch)], text=True)


def hf_text_encoder(root: Path) -> UserSource:
    """(e) a BERT folder written by `save_pretrained`, with its tokenizer."""
    return UserSource(str(_bert(root / "bert")), text_lines(root), text=True)


def hf_causal_lm(root: Path) -> UserSource:
    """(f) a Llama causal LM folder written by `save_pretrained`, with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    folder = root / "llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    _tokenizer_into(folder)
    return UserSource(str(folder), text_lines(root), text=True)


def hf_seq2seq_lm(root: Path) -> UserSource:
    """(f2) a T5 encoder-decoder LM folder written by `save_pretrained`, with a tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=30522, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    folder = root / "t5"
    T5ForConditionalGeneration(config).save_pretrained(folder)
    _tokenizer_into(folder)
    return UserSource(str(folder), text_lines(root), text=True)


def hf_vit(root: Path) -> UserSource:
    """(g) a ViT image classifier folder written by `save_pretrained` (grayscale 32 px, 10 classes)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, num_channels=1, hidden_size=32, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=64, num_labels=10)
    ViTForImageClassification(config).save_pretrained(root / "vit")
    return UserSource(str(root / "vit"), digits_images(root))


def torchvision_name(root: Path) -> UserSource:
    """(h) `torchvision:NAME` at its default 224 px input."""
    return UserSource("torchvision:mobilenet_v3_small", digits_images(root))


MAKERS = {
    "static-pt2": static_pt2,
    "baked-pt2": baked_pt2,
    "dynamic-pt2": dynamic_pt2,
    "pickled-module": pickled_module,
    "state-dict-arch": state_dict_with_arch,
    "hf-text-encoder": hf_text_encoder,
    "hf-causal-lm": hf_causal_lm,
    "hf-vit": hf_vit,
    "torchvision": torchvision_name,
}
