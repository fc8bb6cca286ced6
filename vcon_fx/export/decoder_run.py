"""Run a KV-cache decoder ONNX file in onnxruntime: prefill, then one token a step, the past kept between calls.

`generate` and the decoder check both drive the file through `CachedDecoder`. Its layout is read
from the file's inputs (so a file exported elsewhere with the same names runs too); the
metadata vcon-fx records adds the end-of-text tokens and the tokenizer folder.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .decoder import METADATA_KEY, DecoderLayout

__all__ = ["CachedDecoder", "layout_of_session", "Greedy", "run_greedy"]

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}


def layout_of_session(session) -> DecoderLayout | None:
    """The cache layout of an onnxruntime session's file; None when it takes no past key/values (pure)."""
    inputs = {i.name: i for i in session.get_inputs()}
    pasts = [i for name, i in inputs.items() if _PAST.match(name)]
    if not pasts or "input_ids" not in inputs:
        return None
    first = inputs.get("past_key_values.0.key", pasts[0])
    heads, head_dim = first.shape[1], first.shape[3]
    recorded = _recorded(session)
    return DecoderLayout(
        num_layers=len(pasts) // 2, num_kv_heads=heads if isinstance(heads, int) else 0,
        head_dim=head_dim if isinstance(head_dim, int) else 0, position_ids="position_ids" in inputs,
        dtype=_NP_FLOATS.get(first.type, "float32"),
        eos_token_ids=recorded.eos_token_ids if recorded else (), tokenizer=recorded.tokenizer if recorded else None)


def _recorded(session) -> DecoderLayout | None:
    text = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        return DecoderLayout.from_json(text) if text else None
    except (ValueError, TypeError, KeyError):
        return None  # metadata of another version: the inputs still say everything but eos and tokenizer


@dataclass
class Greedy:
    """A greedy generation: the new tokens [batch, n], each step's last logits [batch, n, vocab], timings."""

    tokens: np.ndarray
    logits: np.ndarray
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (0 when there were none)."""
        steps = self.tokens.shape[1] - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0


class CachedDecoder:
    """A decoder file and its past: `prefill(prompt)` starts from an empty cache, `step(tokens)` adds one token.

    Attributes:
        layout: read from the file (`layout_of_session`).
        past_length: tokens the cache holds now.
    """

    def __init__(self, session, layout: DecoderLayout):
        self.session, self.layout = session, layout
        self._outputs = [o.name for o in session.get_outputs()]
        self._past: list[np.ndarray] = []
        self.past_length = 0

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [batch, prompt, vocab] of a prompt [batch, prompt], from an empty cache (in place: the cache)."""
        batch = input_ids.shape[0]
        shape = (batch, self.layout.num_kv_heads, 0, self.layout.head_dim)
        self._past = [np.zeros(shape, self.layout.dtype) for _ in range(2 * self.layout.num_layers)]
        self.past_length = 0
        return self._run(input_ids)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [batch, 1, vocab] of one new token per row [batch] (in place: the cache grows by one)."""
        return self._run(np.asarray(tokens, dtype=np.int64).reshape(-1, 1))

    def feeds(self, input_ids: np.ndarray) -> dict[str, np.ndarray]:
        """The inputs of one call on `input_ids` with the current cache (pure)."""
        batch, seq = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64),
                 "attention_mask": np.ones((batch, self.past_length + seq), np.int64)}
        if self.layout.position_ids:
            positions = np.arange(self.past_length, self.past_length + seq, dtype=np.int64)
            feeds["position_ids"] = np.broadcast_to(positions, (batch, seq)).copy()
        names = self.layout.input_names[len(feeds):]
        feeds.update(zip(names, self._past))
        return feeds

    def _run(self, input_ids: np.ndarray) -> np.ndarray:
        got = dict(zip(self._outputs, self.session.run(None, self.feeds(input_ids))))
        self._past = [got[name] for name in self.layout.output_names[1:]]
        self.past_length += input_ids.shape[1]
        return got["logits"]

    def greedy(self, input_ids: np.ndarray, max_new_tokens: int, *, forced: np.ndarray | None = None,
               stop_at_eos: bool = False) -> Greedy:
        """Generate up to `max_new_tokens` greedily after the prompt (in place: the cache).

        Args:
            input_ids: the prompt [batch, prompt].
            max_new_tokens: tokens to generate.
            forced: [batch, n] tokens to feed back instead of the file's own choices (teacher
                forcing: each step is then judged on the same sequence as a reference's).
            stop_at_eos: stop once every row has produced an end-of-text token.
        """
        return run_greedy(lambda: self.prefill(input_ids)[:, -1], lambda tokens: self.step(tokens)[:, -1],
                          max_new_tokens, self.layout.eos_token_ids, forced=forced, stop_at_eos=stop_at_eos)


def run_greedy(first: Callable[[], np.ndarray], step: Callable[[np.ndarray], np.ndarray], max_new_tokens: int,
               eos_token_ids: tuple[int, ...], *, forced: np.ndarray | None = None, stop_at_eos: bool = False) -> Greedy:
    """The greedy loop: `first()` gives the first new token's logits [batch, vocab], `step(tokens)` each next one's.

    Args:
        forced / stop_at_eos: as `CachedDecoder.greedy`.
    """
    start = time.perf_counter()
    logits = first()
    prefilled = time.perf_counter()
    tokens, steps = [], []
    done = np.zeros(logits.shape[0], bool)
    for k in range(max_new_tokens):
        if k:
            logits = step(forced[:, k - 1] if forced is not None else tokens[-1])
        steps.append(logits)
        tokens.append(logits.argmax(-1))
        done |= np.isin(tokens[-1], eos_token_ids)
        if stop_at_eos and done.all():
            break
    end = time.perf_counter()
    return Greedy(np.stack(tokens, 1), np.stack(steps, 1), prefilled - start, end - prefilled)
