"""Text files: one example per line (`LABEL<TAB>text` lines are labelled), tokenized with the model's tokenizer.

An encoder-decoder model (it takes `decoder_input_ids`) reads each line on both sides: the
decoder gets the line shifted right behind its start token.

`tokenize_texts` is the one place text becomes token ids; the table readers (rows.py) use it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..errors import DataError
from .registry import ReadRequest, register_reader
from .tensors import TensorData

__all__ = ["TextLines", "TEXT_SUFFIXES", "DEFAULT_SEQ_LEN", "read_text_file", "tokenize_texts"]

TEXT_SUFFIXES = (".txt", ".text", ".lines", ".tsv")
DEFAULT_SEQ_LEN = 128


class TextLines(TensorData):
    """Tokenized lines: dict items with input_ids / attention_mask (and labels when given)."""

    def __init__(self, encoded: Mapping[str, torch.Tensor], labels: torch.Tensor | None, lines: list[str]):
        super().__init__(encoded, labels)
        self.lines = lines


@register_reader("text lines", describes="a text file with one example per line",
                 recognises=lambda path, task: path.suffix.lower() in TEXT_SUFFIXES or task == "text", catch_all=True)
def read_text_file(request: ReadRequest) -> TextLines:
    """One example per line (`LABEL<TAB>text` lines are labelled), tokenized with the model's tokenizer."""
    path = request.path
    if request.tokenizer_path is None:
        raise _no_tokenizer(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text: re-save it as UTF-8, or give a tensor file") from None
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise DataError(f"data {path} holds no examples (no non-empty lines): give one example per line")
    labels = None
    split = [ln.split("\t", 1) for ln in lines]
    if all(len(parts) == 2 and _is_int(parts[0]) for parts in split):
        labels = torch.tensor([int(p[0]) for p in split])
        lines = [p[1] for p in split]
    return TextLines(tokenize_texts(path, lines, request), labels, lines)


def tokenize_texts(path: Path, texts: list[str], request: ReadRequest) -> dict[str, torch.Tensor]:
    """Tokenize `texts` with the model's tokenizer, padded / cut to `request.seq_len` (pure).

    Args:
        path: the data file, for error messages.
        texts: one string per example.
        request: gives the tokenizer folder, `seq_len` (default: the model's example length) and the
            model's keyword inputs (only those are kept).

    Returns:
        {input name: N×seq_len tensor}: input_ids, attention_mask, … as the model takes them.

    Raises:
        DataError: no tokenizer, a bad seq_len, a tokenizer that cannot load or lacks an input the model takes.
    """
    tokenizer_path, seq_len = request.tokenizer_path, request.seq_len
    if tokenizer_path is None:
        raise _no_tokenizer(path)
    kwargs_spec = dict(request.spec.get("kwargs") or {})
    if seq_len is None:
        ids = kwargs_spec.get("input_ids")
        seq_len = ids["shape"][1] if ids and len(ids["shape"]) == 2 else DEFAULT_SEQ_LEN
    if not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive number of tokens, got {seq_len!r}")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise DataError(f"cannot load the tokenizer from {tokenizer_path} ({str(e).splitlines()[0][:160]}): copy the "
                        "model's tokenizer files (tokenizer.json, vocab.txt, …) into that folder") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    keep = set(kwargs_spec) if kwargs_spec else {"input_ids", "attention_mask"}
    encoded = {k: v for k, v in enc.items() if k in keep}
    if "input_ids" not in encoded:
        raise DataError(f"{path} is text but the model takes {sorted(kwargs_spec)}, not input_ids: give a tensor file")
    if "decoder_input_ids" in kwargs_spec and "decoder_input_ids" not in encoded:
        encoded["decoder_input_ids"] = _shifted_right(encoded["input_ids"], _decoder_start(tokenizer_path, tok))
    missing = sorted(set(kwargs_spec) - set(encoded))
    if missing:
        raise DataError(f"the tokenizer at {tokenizer_path} does not produce {missing}, which the model takes: "
                        "give a tensor file with those arrays")
    return encoded


def _decoder_start(folder, tok) -> int:
    """The token an encoder-decoder model's decoder starts from: its config's, else the padding token (T5's rule)."""
    import json

    config = Path(folder) / "config.json"
    data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    for key in ("decoder_start_token_id", "pad_token_id"):
        if isinstance(data.get(key), int):
            return data[key]
    return int(tok.pad_token_id or 0)


def _shifted_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    """The decoder's inputs for reading a line back: the start token, then the line's own tokens but the last (pure).

    Unlabelled lines carry no target text; teacher and twin read the same line on both sides, so
    distillation covers the encoder, the cross-attention and the decoder on real text.
    """
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def _no_tokenizer(path: Path) -> DataError:
    return DataError(f"{path} is text, but the model has no tokenizer (it is not a Hugging Face folder with "
                     "tokenizer files): tokenize it yourself into a tensor file with 'input_ids'")


def _is_int(s: str) -> bool:
    s = s.strip()
    return s.lstrip("-").isdigit()
