"""Greedy text generation with a KV-cache decoder ONNX file in onnxruntime (`vcon-fx generate`).

The prompt is tokenized with the model's tokenizer (the folder recorded in the file at export, or
one given), run once from an empty cache, then one token a step with the cache until
`max_new_tokens` or an end-of-text token. An encoder-decoder file (`seq2seq_run.py`) encodes the
prompt once and writes its text from the decoder's start token; a decoder continues the prompt.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LoadError, UsageError, first_line
from .check import _session
from .decoder_run import CachedDecoder, layout_of_session
from .seq2seq_run import open_seq2seq, seq2seq_layout_of_session

__all__ = ["generate_text", "Generation"]


@dataclass(frozen=True)
class Generation:
    """What `generate_text` produced: the new text and tokens, and how fast.

    Attributes:
        text: the generated text (the prompt not included).
        tokens: the new token ids.
        prompt_tokens: how many tokens the prompt became.
        prefill_ms: the prompt's one call, from an empty cache.
        decode_tokens_per_s: new tokens after the first, per second.
        tokenizer: the tokenizer folder used.
        continues_prompt: the text continues the prompt (a decoder); False: an encoder-decoder
            model's own text for it.
    """

    text: str
    tokens: tuple[int, ...]
    prompt_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float
    tokenizer: str
    continues_prompt: bool = True


def generate_text(onnx_path: str | os.PathLike, prompt: str, *, max_new_tokens: int = 32,
                  tokenizer: str | os.PathLike | None = None, threads: int | None = None) -> Generation:
    """Generate greedily after `prompt` with a KV-cache decoder file (pure: files are only read).

    Args:
        onnx_path: a file written by `export_onnx` for a decoder language model (or the decoder file of an
            encoder-decoder one, its encoder beside it).
        prompt: the text to continue (an encoder-decoder model's input).
        max_new_tokens: the most tokens to add (fewer when the model ends the text).
        tokenizer: a folder holding the model's tokenizer; None takes the one recorded in the file.
        threads: onnxruntime intra-op threads; None uses every core.

    Raises:
        UsageError: `max_new_tokens` < 1, the file has no KV cache, or no tokenizer is known.
        LoadError: the file, its encoder file or the tokenizer cannot be read.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {max_new_tokens!r}")
    session = _session(onnx_path, threads)
    seq2seq = seq2seq_layout_of_session(session)
    layout = seq2seq or layout_of_session(session)
    if layout is None:
        raise UsageError(f"{onnx_path} takes no past key/values, so it cannot generate with a KV cache: export the "
                         "decoder (or encoder-decoder) language model with `vcon-fx export` (without --no-kv-cache)")
    folder = tokenizer or layout.tokenizer
    if folder is None:
        raise UsageError(f"{onnx_path} records no tokenizer (its source folder had none): pass --tokenizer FOLDER, "
                         "the folder holding the model's tokenizer.json or vocab files")
    tok = _tokenizer(Path(folder))
    ids = np.asarray([tok(prompt)["input_ids"]], dtype=np.int64)
    if ids.shape[1] == 0:
        raise UsageError("the prompt is empty after tokenization: give some text with --prompt")
    # an encoder-decoder model writes a new text for the prompt; a decoder continues the prompt's
    runner = open_seq2seq(onnx_path, session, seq2seq, threads) if seq2seq else CachedDecoder(session, layout)
    greedy = runner.greedy(ids, max_new_tokens, stop_at_eos=True)
    new = [int(t) for t in greedy.tokens[0]]
    if layout.eos_token_ids and new[-1] in layout.eos_token_ids:
        new = new[:-1]
    text = tok.decode(new, skip_special_tokens=True) if seq2seq else _continuation(tok, list(ids[0]), new)
    return Generation(text=text, tokens=tuple(new), prompt_tokens=ids.shape[1],
                      prefill_ms=greedy.prefill_s * 1e3, decode_tokens_per_s=greedy.decode_tokens_per_s,
                      tokenizer=str(folder), continues_prompt=seq2seq is None)


def _continuation(tok, prompt: list[int], new: list[int]) -> str:
    """The text the new tokens add to the prompt's, with the space between them that the tokenizer puts there."""
    head = tok.decode(prompt, skip_special_tokens=True)
    full = tok.decode(prompt + new, skip_special_tokens=True)
    return full[len(head):] if full.startswith(head) else " " + tok.decode(new, skip_special_tokens=True)


def _tokenizer(folder: Path):
    if not folder.is_dir():
        raise LoadError(f"tokenizer folder {folder} does not exist: pass --tokenizer with the model's folder")
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # transformers raises OSError, ValueError, … for a folder without a tokenizer
        raise LoadError(f"{folder} holds no tokenizer transformers can read ({first_line(exc)}): "
                        "pass --tokenizer with the folder holding tokenizer.json or the vocab files") from None
