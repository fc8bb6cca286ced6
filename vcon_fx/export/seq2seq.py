"""An encoder-decoder language model (T5, BART, …) called as two flat forwards, the form its ONNX files take.

The encoder runs once per prompt: `(input_ids, attention_mask) → last_hidden_state`. The decoder
runs once per new token with its cache, as optimum names the tensors:

    (input_ids, encoder_attention_mask, encoder_hidden_states,
     past_key_values.0.decoder.key, past_key_values.0.decoder.value,
     past_key_values.0.encoder.key, past_key_values.0.encoder.value, …)
        → (logits, present.0.decoder.key, …, present.0.encoder.value, …)

every cache tensor laid out [batch, num_heads, length, head_dim]. The cross-attention keys and
values are the model's own projections of `encoder_hidden_states` appended to the encoder past
(the cache's `update` concatenates them), so one file serves every step without a branch: the
first step feeds the encoder output and an empty encoder past, every later step an empty
`encoder_hidden_states` [batch, 0, d_model] and the encoder presents of the first step.
`encoder_attention_mask` always covers the whole encoder sequence.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .decoder import _cache_keyword, _eos_tokens, _eval, _past_layer_class, _tokenizer_folder

__all__ = ["Seq2SeqLayout", "seq2seq_layout", "is_seq2seq_lm", "config_is_seq2seq_lm", "flat_seq2seq_forward",
           "encoder_forward", "encoder_path", "seq2seq_example", "encoder_example", "SEQ2SEQ_METADATA_KEY",
           "ENCODER_INPUTS", "ENCODER_OUTPUTS"]

# Where the decoder file records its layout, tokenizer and encoder file (`generate` reads it back).
SEQ2SEQ_METADATA_KEY = "vcon_fx.seq2seq"
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUTS = ("last_hidden_state",)
# batch, new decoder tokens, decoder past, new encoder states, encoder past of the traced example:
# never 0 or 1 (torch.export would fix those sizes) and unequal so that no two dims are taken for one.
EXAMPLE_SIZES = (2, 3, 4, 5, 6)
_KINDS = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")


@dataclass(frozen=True)
class Seq2SeqLayout:
    """The caches an encoder-decoder model reads and writes, and what generation needs besides.

    Attributes:
        num_layers: decoder layers (four cache tensors each).
        num_heads: dim 1 of every cache tensor.
        head_dim: dim 3 of every cache tensor.
        d_model: the last dim of `encoder_hidden_states`.
        decoder_start_token_id: the decoder's first input token.
        encoder: the encoder file's name, beside the decoder file.
        dtype: the cache tensors' dtype name (`float32`).
        eos_token_ids: the tokens that end a generation.
        tokenizer: the folder of the model's tokenizer, when it has one.
    """

    num_layers: int
    num_heads: int
    head_dim: int
    d_model: int
    decoder_start_token_id: int
    encoder: str = ""
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    tokenizer: str | None = None

    @property
    def input_names(self) -> list[str]:
        """The decoder file's inputs, in order."""
        head = ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
        return head + [f"past_key_values.{i}.{kind}" for i in range(self.num_layers) for kind in _KINDS]

    @property
    def output_names(self) -> list[str]:
        """The decoder file's outputs, in order."""
        return ["logits"] + [f"present.{i}.{kind}" for i in range(self.num_layers) for kind in _KINDS]

    def to_json(self) -> str:
        """The layout as the JSON the ONNX metadata holds (pure)."""
        return json.dumps({**asdict(self), "eos_token_ids": list(self.eos_token_ids)})

    @staticmethod
    def from_json(text: str) -> "Seq2SeqLayout":
        """The layout recorded by `to_json` (pure). Raises ValueError/TypeError/KeyError on other text."""
        data = json.loads(text)
        return Seq2SeqLayout(**{**data, "eos_token_ids": tuple(data.get("eos_token_ids") or ())})


def encoder_path(decoder_file: str | Path) -> Path:
    """The encoder file written beside a decoder file: `x.onnx` → `x.encoder.onnx` (pure)."""
    path = Path(decoder_file)
    return path.with_name(f"{path.stem}.encoder{path.suffix or '.onnx'}")


def config_is_seq2seq_lm(config) -> bool:
    """True when a Hugging Face config (object or dict) describes a generating encoder-decoder model (pure)."""
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    return bool(get("is_encoder_decoder", False)) and any(
        str(a).endswith("ForConditionalGeneration") for a in get("architectures", None) or [])


def is_seq2seq_lm(module: nn.Module) -> bool:
    """True when `module` is a Hugging Face encoder-decoder LM with a cache and an encoder (pure)."""
    config = getattr(module, "config", None)
    if config is None or not getattr(config, "is_encoder_decoder", False) or not hasattr(config, "use_cache"):
        return False
    params = inspect.signature(type(module).forward).parameters
    return (callable(getattr(module, "get_encoder", None)) and _cache_keyword(module) is not None
            and {"decoder_input_ids", "encoder_outputs"} <= set(params))


def seq2seq_layout(module: nn.Module) -> Seq2SeqLayout:
    """The cache layout of an encoder-decoder LM, read from one short forward with `use_cache=True` (pure)."""
    config = module.config
    ids = torch.zeros(1, 2, dtype=torch.long)
    start = _decoder_start(module)
    with torch.no_grad(), _eval(module):
        out = type(module).forward(module, input_ids=ids, attention_mask=torch.ones_like(ids),
                                   decoder_input_ids=torch.full((1, 1), start), use_cache=True)
    keys = _cache_of(out).self_attention_cache.layers[0].keys
    return Seq2SeqLayout(
        num_layers=len(_cache_of(out).self_attention_cache.layers), num_heads=int(keys.shape[1]),
        head_dim=int(keys.shape[3]), d_model=int(out.encoder_last_hidden_state.shape[-1]),
        decoder_start_token_id=start, dtype=str(keys.dtype).removeprefix("torch."),
        eos_token_ids=_eos_tokens(module), tokenizer=_tokenizer_folder(config))


def _decoder_start(module: nn.Module) -> int:
    """The decoder's first token: the generation config's, else the config's, else its padding token (T5's 0)."""
    for holder, key in ((getattr(module, "generation_config", None), "decoder_start_token_id"),
                        (module.config, "decoder_start_token_id"), (module.config, "pad_token_id")):
        value = getattr(holder, key, None)
        if value is not None:
            return int(value)
    return 0


def _cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


@contextlib.contextmanager
def flat_seq2seq_forward(module: nn.Module, layout: Seq2SeqLayout) -> Iterator[nn.Module]:
    """`module` with the decoder's flat forward (see the module docstring) for the block (in place, undone after).

    The forward is set on the instance so that the parameters keep their names (a vcon recipe
    finds its layers by them).
    """
    module.forward = types.MethodType(_decoder_step, module)
    try:
        yield module
    finally:
        del module.forward


@contextlib.contextmanager
def encoder_forward(module: nn.Module) -> Iterator[nn.Module]:
    """`module` with the forward `(input_ids, attention_mask) → last_hidden_state` for the block (in place, undone after)."""
    module.forward = types.MethodType(_encode, module)
    try:
        yield module
    finally:
        del module.forward


def _encode(self, input_ids, attention_mask):
    return self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _decoder_step(self, input_ids, encoder_attention_mask, encoder_hidden_states, *past):
    """Logits and the flat presents of the decoder on `input_ids`, after the past (see the module docstring)."""
    from transformers import DynamicCache, EncoderDecoderCache
    from transformers.modeling_outputs import BaseModelOutput

    layer = _past_layer_class()
    own, cross = DynamicCache(), DynamicCache()
    own.layers[:] = [layer(past[i], past[i + 1]) for i in range(0, len(past), 4)]
    cross.layers[:] = [layer(past[i + 2], past[i + 3]) for i in range(0, len(past), 4)]
    cache = EncoderDecoderCache(own, cross)
    # "not updated": each cross-attention projects the new encoder states and appends them to its past
    cache.is_updated = {i: False for i in range(len(own.layers))}
    out = type(self).forward(self, attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                             encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states),
                             **{_cache_keyword(self): cache}, use_cache=True)
    cache = _cache_of(out)
    presents = []
    for mine, theirs in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
        presents += [mine.keys, mine.values, theirs.keys, theirs.values]
    return (out.logits, *presents)


def seq2seq_example(layout: Seq2SeqLayout, vocab_size: int, sizes: tuple[int, ...] = EXAMPLE_SIZES) -> tuple:
    """Flat decoder example inputs in `layout.input_names` order (pure); `sizes` as EXAMPLE_SIZES."""
    batch, seq, past, new_states, encoder_past = sizes
    gen = torch.Generator().manual_seed(0)
    dtype = getattr(torch, layout.dtype)
    head = [torch.randint(0, vocab_size, (batch, seq), generator=gen),
            torch.ones(batch, encoder_past + new_states, dtype=torch.long),
            torch.randn(batch, new_states, layout.d_model, generator=gen, dtype=dtype)]
    pasts = []
    for _ in range(layout.num_layers):
        for length in (past, past, encoder_past, encoder_past):
            pasts.append(torch.randn(batch, layout.num_heads, length, layout.head_dim, generator=gen, dtype=dtype))
    return (*head, *pasts)


def encoder_example(vocab_size: int, sizes: tuple[int, ...] = EXAMPLE_SIZES) -> tuple:
    """Encoder example inputs (input_ids, attention_mask) of batch and length from `sizes` (pure)."""
    batch, length = sizes[0], sizes[3]
    ids = torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)
