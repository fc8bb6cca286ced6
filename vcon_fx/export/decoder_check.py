"""The onnxruntime check of a KV-cache decoder file against the PyTorch model without a cache.

PyTorch generates greedily from the example prompt, each step a whole forward without a cache.
The file then runs the way it is deployed: the prompt from an empty cache (its logits must match
PyTorch's first step, all positions), then one token a step with the cache, fed PyTorch's tokens
(so every step is judged on the same sequence). Three rows come out: the prompt's logits, the
logits of every cached step, and the greedy tokens. A token may differ only where PyTorch's two
best logits are closer than the tolerance allows (a near-tie that rounding may turn). The
latency is that of one cached step (one new token after the prompt).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..bench.worker import model_size_bytes, time_runs
from ..errors import UsageError
from ..graph.modes import eval_mode
from .check import _WARMUP, CheckReport, OutputParity, _compare, _session
from .decoder import logits_of
from .decoder_run import CachedDecoder, layout_of_session
from .naming import flatten_inputs

__all__ = ["check_decoder", "GREEDY_TOKENS", "step_report", "token_parity"]

GREEDY_TOKENS = 32


def check_decoder(model: nn.Module, session, onnx_path, args: tuple, kwargs: dict, *, rtol: float, atol: float,
                  reference_onnx=None, runs: int = 20, threads: int | None = None) -> CheckReport:
    """Compare a KV-cache decoder file with `model` run without a cache (pure; see the module docstring).

    Args:
        model: the PyTorch model (dense Hugging Face causal LM or vanished vcon model).
        session: an onnxruntime session of `onnx_path`.
        onnx_path: the file.
        args / kwargs: the model's example inputs: their `input_ids` are the prompt.
        rtol / atol: as `check_onnx`.
        reference_onnx: the dense model exported the same way, timed on the same step.
        runs: timed runs of the cached step.
        threads: onnxruntime intra-op threads.

    Raises:
        UsageError: the example inputs hold no `input_ids`.
    """
    prompt = dict(flatten_inputs(model, args, kwargs)).get("input_ids")
    if prompt is None:
        raise UsageError(f"checking the decoder file {onnx_path} needs the model's input_ids as the prompt; "
                         "the example inputs have none")
    steps = min(GREEDY_TOKENS, _room(model, prompt.shape[1]))
    tokens, step_logits, first = _torch_greedy(model, prompt, steps, "attention_mask" in kwargs)
    runner = CachedDecoder(session, layout_of_session(session))
    ids = prompt.numpy()
    prompt_row = _compare("logits (prompt, empty cache)", runner.prefill(ids), first, rtol, atol)
    greedy = runner.greedy(ids, steps, forced=tokens.numpy())
    steps_row = _compare(f"logits ({steps} cached steps)", greedy.logits, step_logits, rtol, atol)
    token_row = token_parity(greedy.tokens, tokens.numpy(), step_logits.numpy(), steps_row.allowed)
    reference = None
    if reference_onnx is not None:
        ref_session = _session(reference_onnx, threads)
        reference = CachedDecoder(ref_session, layout_of_session(ref_session))
    return step_report(onnx_path, (prompt_row, steps_row, token_row), runner, reference, reference_onnx,
                       lambda r: _step_latency(r, ids, runs), rtol=rtol, atol=atol, runs=runs, threads=threads,
                       shapes={"input_ids": list(prompt.shape), "new_tokens": [steps]})


def step_report(onnx_path, rows: tuple, runner, reference, reference_onnx, latency_of, *, rtol: float, atol: float,
                runs: int, threads: int | None, shapes: dict) -> CheckReport:
    """The check's report: `rows`, `runner`'s step latency, and size / latency against `reference` when given (pure)."""
    latency = latency_of(runner)
    report = dict(onnx_path=str(onnx_path), outputs=rows, rtol=rtol, atol=atol, size_bytes=model_size_bytes(onnx_path),
                  latency_ms=latency, runs=runs, threads=threads, input_shapes=shapes)
    if reference is not None:
        ref_latency = latency_of(reference)
        ref_size = model_size_bytes(reference_onnx)
        report.update(reference_path=str(reference_onnx), reference_size_bytes=ref_size,
                      reference_latency_ms=ref_latency, size_ratio=report["size_bytes"] / ref_size,
                      latency_ratio=latency / ref_latency if ref_latency > 0 else None)
    return CheckReport(**report)


def _room(model: nn.Module, prompt_length: int) -> int:
    """New tokens the model's positions leave after the prompt (at least 1)."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return max(1, limit - prompt_length) if limit else GREEDY_TOKENS


def _torch_greedy(model: nn.Module, prompt: torch.Tensor, steps: int, masked: bool):
    """(tokens [batch, steps], each step's last logits [batch, steps, vocab], the first step's logits [batch, prompt, vocab])."""
    seq, tokens, logits, first = prompt, [], [], None
    with torch.no_grad(), eval_mode(model):
        for _ in range(steps):
            inputs = {"input_ids": seq, **({"attention_mask": torch.ones_like(seq)} if masked else {})}
            out = logits_of(model(**inputs)).float()
            first = out if first is None else first
            logits.append(out[:, -1])
            tokens.append(out[:, -1].argmax(-1))
            seq = torch.cat([seq, tokens[-1][:, None]], 1)
    return torch.stack(tokens, 1), torch.stack(logits, 1), first


def token_parity(got: np.ndarray, want: np.ndarray, logits: np.ndarray, allowed: float) -> OutputParity:
    """The greedy tokens row: mismatches count, except where PyTorch's best two logits are within 2·allowed."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    near_tie = (top2[..., 1] - top2[..., 0]) <= 2 * allowed
    differ = got != want
    bad = differ & ~near_tie
    ties = int((differ & near_tie).sum())
    name = f"greedy tokens ({want.shape[1]} steps{f'; {ties} near-tie(s)' if ties else ''})"
    problem = None
    if bad.any():
        row, step = (int(i) for i in np.argwhere(bad)[0])
        problem = (f"{int(bad.sum())} token(s) differ, first at step {step} of row {row}: ONNX {int(got[row, step])}, "
                   f"PyTorch {int(want[row, step])}")
    agree = 1.0 - float(differ.mean()) if differ.size else 1.0
    return OutputParity(name, tuple(want.shape), tuple(got.shape), float(bad.sum()), float(bad.mean()) if bad.size else 0.0,
                        agree, 0.0, not bad.any(), problem)


def _step_latency(runner: CachedDecoder, ids: np.ndarray, runs: int) -> float:
    """Median ms of one cached step: one new token per row after the prompt."""
    runner.prefill(ids)
    feeds = runner.feeds(ids[:, -1:])
    return float(np.median(time_runs(runner.session, feeds, warmup=_WARMUP, runs=runs)))
