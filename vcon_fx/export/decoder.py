"""A decoder language model called with its KV cache as flat tensors, the form its ONNX file takes.

Hugging Face causal LMs keep their past keys and values in a `DynamicCache` object, which no
exporter takes as an input. `flat_cache_forward` gives the model a forward of plain tensors,

    (input_ids, attention_mask[, position_ids], past_key_values.0.key, past_key_values.0.value, …)
        → (logits, present.0.key, present.0.value, …)

with every cache tensor laid out [batch, num_kv_heads, past_seq, head_dim] and named as optimum
and onnxruntime-genai name them; the cache is built inside the forward, so the traced graph is
tensors in, tensors out. `DecoderLayout` is what the rest of the decoder export needs to know.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from ..sources.hf import TOKENIZER_FILES

__all__ = ["DecoderLayout", "decoder_layout", "is_causal_lm", "config_is_causal_lm", "flat_cache_forward",
           "example_with_past", "logits_of", "METADATA_KEY", "EXAMPLE_SIZES"]

# Where the ONNX file records its layout and tokenizer (`generate` reads it back).
METADATA_KEY = "vcon_fx.decoder"
# batch, new tokens, past tokens of the example the export traces: never 0 or 1 (torch.export
# would fix those sizes), and unequal so that no two dims are taken for one.
EXAMPLE_SIZES = (2, 3, 4)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class DecoderLayout:
    """The cache a decoder model reads and writes, and what generation needs besides.

    Attributes:
        num_layers: cache entries (one key and one value each).
        num_kv_heads: dim 1 of every cache tensor.
        head_dim: dim 3 of every cache tensor.
        position_ids: the forward takes `position_ids` (an input of the file then).
        dtype: the cache tensors' dtype name (`float32`).
        eos_token_ids: the tokens that end a generation.
        tokenizer: the folder of the model's tokenizer, when it has one.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    position_ids: bool
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    tokenizer: str | None = None

    @property
    def input_names(self) -> list[str]:
        """The file's inputs, in order."""
        head = ["input_ids", "attention_mask"] + (["position_ids"] if self.position_ids else [])
        return head + [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    @property
    def output_names(self) -> list[str]:
        """The file's outputs, in order."""
        return ["logits"] + [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in ("key", "value")]

    def to_json(self) -> str:
        """The layout as the JSON the ONNX metadata holds (pure)."""
        return json.dumps({**asdict(self), "eos_token_ids": list(self.eos_token_ids)})

    @staticmethod
    def from_json(text: str) -> "DecoderLayout":
        """The layout recorded by `to_json` (pure). Raises ValueError/TypeError/KeyError on other text."""
        data = json.loads(text)
        return DecoderLayout(**{**data, "eos_token_ids": tuple(data.get("eos_token_ids") or ())})


def config_is_causal_lm(config) -> bool:
    """True when a Hugging Face config (object or dict) describes a decoder-only generating model (pure)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    if get("is_encoder_decoder", False):
        return False
    return any(str(a).endswith(_CAUSAL_SUFFIXES) for a in get("architectures", None) or [])


def is_causal_lm(module: nn.Module) -> bool:
    """True when `module` is a Hugging Face decoder-only LM that keeps a KV cache (pure)."""
    config = getattr(module, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False) or not hasattr(config, "use_cache"):
        return False
    can_generate = getattr(module, "can_generate", None)
    try:
        generates = bool(can_generate()) if callable(can_generate) else False
    except Exception:
        generates = False
    return generates and _cache_keyword(module) is not None and "input_ids" in _params(module)


def _params(module: nn.Module):
    return inspect.signature(type(module).forward).parameters


def _cache_keyword(module: nn.Module) -> str | None:
    """The forward's name for the cache: `cache` (transformers ≥ 5.2x) or `past_key_values`."""
    return next((k for k in ("cache", "past_key_values") if k in _params(module)), None)


def _cache_out(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def decoder_layout(module: nn.Module) -> DecoderLayout:
    """The cache layout of a causal LM, read from one short forward with `use_cache=True` (pure).

    Reading the cache the model writes (rather than its config's head counts) fits every
    family, however its config names them.
    """
    config = module.config
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad(), _eval(module):
        out = type(module).forward(module, input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    layers = _cache_out(out).layers
    keys = layers[0].keys
    return DecoderLayout(
        num_layers=len(layers), num_kv_heads=int(keys.shape[1]), head_dim=int(keys.shape[3]),
        position_ids="position_ids" in _params(module),
        dtype=str(keys.dtype).removeprefix("torch."), eos_token_ids=_eos_tokens(module),
        tokenizer=_tokenizer_folder(config))


def _eos_tokens(module: nn.Module) -> tuple[int, ...]:
    """The end-of-text tokens of a generating model: its generation config's, else its config's."""
    eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    eos = getattr(module.config, "eos_token_id", None) if eos is None else eos
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return tuple(int(e) for e in eos)


def _tokenizer_folder(config) -> str | None:
    # from_pretrained records the folder it read; a tokenizer saved beside the weights is the model's
    folder = Path(str(getattr(config, "_name_or_path", "") or ""))
    if str(folder) and folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_FILES):
        return str(folder.resolve())
    return None


@contextlib.contextmanager
def _eval(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


@contextlib.contextmanager
def flat_cache_forward(module: nn.Module, layout: DecoderLayout) -> Iterator[nn.Module]:
    """`module` with a forward of flat tensors (see the module docstring) for the block (in place, undone after).

    The forward is set on the instance, so the parameters keep their names (a wrapper module
    would prefix them, and a vcon recipe finds its layers by those names).
    """
    module.forward = types.MethodType(_forward_with_positions if layout.position_ids else _forward_without_positions,
                                      module)
    try:
        yield module
    finally:
        del module.forward


def _forward_with_positions(self, input_ids, attention_mask, position_ids, *past_key_values):
    return _run_with_past(self, past_key_values, input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids)


def _forward_without_positions(self, input_ids, attention_mask, *past_key_values):
    return _run_with_past(self, past_key_values, input_ids=input_ids, attention_mask=attention_mask)


def _run_with_past(model: nn.Module, past: tuple, **inputs) -> tuple:
    """Call the model's own forward with a cache holding `past`; logits and the flat presents."""
    from transformers import DynamicCache

    cache = DynamicCache()
    layer = _past_layer_class()
    cache.layers[:] = [layer(past[i], past[i + 1]) for i in range(0, len(past), 2)]
    out = type(model).forward(model, **inputs, **{_cache_keyword(model): cache}, use_cache=True)
    presents = []
    for layer in _cache_out(out).layers:
        presents += [layer.keys, layer.values]
    return (out.logits, *presents)


@functools.lru_cache(maxsize=None)
def _past_layer_class():
    """The cache layer class, defined on first use (transformers is imported only by decoder exports)."""
    from transformers.cache_utils import DynamicLayer

    class PastLayer(DynamicLayer):
        """A cache layer that starts from given tensors.

        `DynamicLayer` starts from `torch.tensor([])`, which the exporters would keep as a
        constant of the graph (and concatenate on every call).
        """

        def __init__(self, keys: torch.Tensor, values: torch.Tensor):
            super().__init__()
            self.keys, self.values, self.device, self.is_initialized = keys, values, keys.device, True

    return PastLayer


def example_with_past(layout: DecoderLayout, vocab_size: int, sizes: tuple[int, int, int] = EXAMPLE_SIZES) -> tuple:
    """Flat example inputs in `layout.input_names` order: `sizes` = (batch, new tokens, past tokens) (pure)."""
    batch, seq, past = sizes
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, layout.dtype)
    head = [torch.randint(0, vocab_size, (batch, seq), generator=gen), torch.ones(batch, past + seq, dtype=torch.long)]
    if layout.position_ids:
        head.append(torch.arange(past, past + seq).expand(batch, seq).contiguous())
    shape = (batch, layout.num_kv_heads, past, layout.head_dim)
    return (*head, *(torch.randn(shape, generator=gen, dtype=dtype) for _ in range(2 * layout.num_layers)))


def logits_of(output) -> torch.Tensor:
    """The logits of a causal LM's output: a ModelOutput, a dict, a tuple or the tensor itself (pure)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"a causal LM output without logits: {type(output).__name__}")
    return logits
