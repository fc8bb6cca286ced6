"""The onnxruntime check of an encoder-decoder ONNX pair against the PyTorch model without a cache.

PyTorch generates greedily for the example prompt from the decoder's start token, each step a
whole forward (encoder and decoder) without a cache. The files then run as they are deployed:
the encoder once, the first decoder step from an empty cache (its logits must match PyTorch's
first step), then one token a step with the cache, fed PyTorch's tokens. The rows and the
near-tie rule are those of the decoder check (`decoder_check.py`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..bench.worker import time_runs
from ..errors import UsageError
from ..graph.modes import eval_mode
from .check import _WARMUP, CheckReport, _compare, _session
from .decoder import logits_of
from .decoder_check import GREEDY_TOKENS, step_report, token_parity
from .naming import flatten_inputs
from .seq2seq import Seq2SeqLayout
from .seq2seq_run import CachedSeq2Seq, open_seq2seq, seq2seq_layout_of_session

__all__ = ["check_seq2seq"]


def check_seq2seq(model: nn.Module, session, onnx_path, args: tuple, kwargs: dict, *, rtol: float, atol: float,
                  reference_onnx=None, runs: int = 20, threads: int | None = None) -> CheckReport:
    """Compare an encoder-decoder pair (`onnx_path`, its encoder beside it) with `model` without a cache (pure).

    Args:
        model: the PyTorch model (dense Hugging Face encoder-decoder LM or vanished vcon model).
        session: an onnxruntime session of the decoder file `onnx_path`.
        onnx_path: the decoder file.
        args / kwargs: the model's example inputs: their `input_ids` are the prompt.
        rtol / atol: as `check_onnx`.
        reference_onnx: the dense model exported the same way, timed on the same step.
        runs: timed runs of the cached step.
        threads: onnxruntime intra-op threads.

    Raises:
        UsageError: the example inputs hold no `input_ids`.
        LoadError: the encoder file is missing.
    """
    prompt = dict(flatten_inputs(model, args, kwargs)).get("input_ids")
    if prompt is None:
        raise UsageError(f"checking the encoder-decoder file {onnx_path} needs the model's input_ids as the prompt; "
                         "the example inputs have none")
    layout = seq2seq_layout_of_session(session)
    tokens, step_logits = _torch_greedy(model, prompt, GREEDY_TOKENS, layout)
    runner = open_seq2seq(onnx_path, session, layout, threads)
    ids = prompt.numpy()
    first_row = _compare("logits (first step, empty cache)", runner.start(ids), step_logits[:, :1], rtol, atol)
    greedy = runner.greedy(ids, GREEDY_TOKENS, forced=tokens.numpy())
    steps_row = _compare(f"logits ({GREEDY_TOKENS} cached steps)", greedy.logits, step_logits, rtol, atol)
    token_row = token_parity(greedy.tokens, tokens.numpy(), step_logits.numpy(), steps_row.allowed)
    reference = None
    if reference_onnx is not None:
        ref_session = _session(reference_onnx, threads)
        reference = open_seq2seq(reference_onnx, ref_session, seq2seq_layout_of_session(ref_session), threads)
    return step_report(onnx_path, (first_row, steps_row, token_row), runner, reference, reference_onnx,
                       lambda r: _step_latency(r, ids, runs), rtol=rtol, atol=atol, runs=runs, threads=threads,
                       shapes={"input_ids": list(prompt.shape), "new_tokens": [GREEDY_TOKENS]})


def _torch_greedy(model: nn.Module, prompt: torch.Tensor, steps: int, layout: Seq2SeqLayout):
    """(tokens [batch, steps], each step's last logits [batch, steps, vocab]) without a cache."""
    seq = torch.full((prompt.shape[0], 1), layout.decoder_start_token_id, dtype=torch.long)
    tokens, logits = [], []
    with torch.no_grad(), eval_mode(model):
        for _ in range(steps):
            out = logits_of(model(input_ids=prompt, attention_mask=torch.ones_like(prompt), decoder_input_ids=seq))
            logits.append(out.float()[:, -1])
            tokens.append(logits[-1].argmax(-1))
            seq = torch.cat([seq, tokens[-1][:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(logits, 1)


def _step_latency(runner: CachedSeq2Seq, ids: np.ndarray, runs: int) -> float:
    """Median ms of one cached decoder step: the token after the start token."""
    runner.start(ids)
    feeds = runner.feeds(np.zeros(ids.shape[0], np.int64))
    return float(np.median(time_runs(runner.session, feeds, warmup=_WARMUP, runs=runs)))
