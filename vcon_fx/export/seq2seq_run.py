"""Run an encoder-decoder ONNX pair in onnxruntime: the encoder once, then the decoder one token a step with its cache.

`generate` and the seq2seq check drive the files through `CachedSeq2Seq`. The decoder file is
the one the user names; its metadata (`vcon_fx.seq2seq`) gives the encoder file beside it, the
decoder's start token, the end-of-text tokens and the tokenizer folder. The step protocol is
described in `seq2seq.py`: the first step feeds the encoder output and an empty past, later
steps an empty `encoder_hidden_states` and the presents.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import LoadError
from .decoder_run import Greedy, run_greedy
from .seq2seq import SEQ2SEQ_METADATA_KEY, Seq2SeqLayout

__all__ = ["CachedSeq2Seq", "seq2seq_layout_of_session", "open_seq2seq"]


def seq2seq_layout_of_session(session) -> Seq2SeqLayout | None:
    """The layout recorded in a decoder file exported by vcon-fx; None for any other file (pure)."""
    names = {i.name for i in session.get_inputs()}
    if not {"input_ids", "encoder_hidden_states", "past_key_values.0.encoder.key"} <= names:
        return None
    text = session.get_modelmeta().custom_metadata_map.get(SEQ2SEQ_METADATA_KEY)
    try:
        return Seq2SeqLayout.from_json(text) if text else None
    except (ValueError, TypeError, KeyError):
        return None


def open_seq2seq(decoder_path: str | os.PathLike, decoder_session, layout: Seq2SeqLayout, threads: int | None = None):
    """A `CachedSeq2Seq` on a decoder session and the encoder file its layout names, beside it (pure).

    Raises:
        LoadError: the encoder file is missing or onnxruntime cannot load it.
    """
    from .check import _session

    encoder = Path(decoder_path).with_name(layout.encoder)
    if not layout.encoder or not encoder.is_file():
        raise LoadError(f"the encoder file {encoder} of {decoder_path} is missing: export the model again with "
                        "`vcon-fx export`, which writes it beside the decoder file")
    return CachedSeq2Seq(_session(encoder, threads), decoder_session, layout)


class CachedSeq2Seq:
    """An encoder session, a decoder session and the decoder's past between calls.

    `start(input_ids)` encodes a prompt and runs the first decoder step (the start token) from
    an empty cache; `step(tokens)` adds one token.

    Attributes:
        layout: the decoder file's recorded layout.
        past_length: decoder tokens the cache holds now.
    """

    def __init__(self, encoder_session, decoder_session, layout: Seq2SeqLayout):
        self.encoder, self.session, self.layout = encoder_session, decoder_session, layout
        self._outputs = [o.name for o in decoder_session.get_outputs()]
        self._past: list[np.ndarray] = []
        self._states = self._mask = np.zeros((0, 0), np.float32)
        self.past_length = 0

    def encode(self, input_ids: np.ndarray) -> np.ndarray:
        """The encoder output [batch, prompt, d_model] of a prompt, kept for the decoder (in place: resets the cache)."""
        ids = np.asarray(input_ids, np.int64)
        self._mask = np.ones_like(ids)
        self._states = self.encoder.run(None, {"input_ids": ids, "attention_mask": self._mask})[0]
        self._past = [np.zeros((ids.shape[0], self.layout.num_heads, 0, self.layout.head_dim), self.layout.dtype)
                      for _ in range(4 * self.layout.num_layers)]
        self.past_length = 0
        return self._states

    def start(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, 1, vocab] of the start token after encoding `input_ids` [batch, prompt] (in place)."""
        self.encode(input_ids)
        return self.step(np.full(input_ids.shape[0], self.layout.decoder_start_token_id, np.int64))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [batch, 1, vocab] of one new decoder token per row [batch] (in place: the cache grows by one)."""
        got = dict(zip(self._outputs, self.session.run(None, self.feeds(tokens))))
        self._past = [got[name] for name in self.layout.output_names[1:]]
        self.past_length += 1
        return got["logits"]

    def feeds(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder inputs of one step on `tokens` [batch] with the current cache (pure)."""
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)
        # the encoder states are projected once, at the first step; later steps read them from the past
        states = self._states if self.past_length == 0 else self._states[:, :0]
        feeds = {"input_ids": ids, "encoder_attention_mask": self._mask, "encoder_hidden_states": states}
        feeds.update(zip(self.layout.input_names[3:], self._past))
        return feeds

    def greedy(self, input_ids: np.ndarray, max_new_tokens: int, *, forced: np.ndarray | None = None,
               stop_at_eos: bool = False) -> Greedy:
        """Generate up to `max_new_tokens` greedily from the start token for the prompt (in place: the cache).

        Args:
            input_ids: the prompt [batch, prompt] (the encoder's input).
            max_new_tokens: tokens to generate.
            forced / stop_at_eos: as `CachedDecoder.greedy`.
        """
        return run_greedy(lambda: self.start(input_ids)[:, -1], lambda tokens: self.step(tokens)[:, -1],
                          max_new_tokens, self.layout.eos_token_ids, forced=forced, stop_at_eos=stop_at_eos)
