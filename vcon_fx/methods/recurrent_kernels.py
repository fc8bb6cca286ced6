"""`vcon::lstm`, `vcon::gru`, `vcon::rnn`: the recurrent kernels as ops whose output shapes follow their input.

torch computes the output shapes of `aten.lstm` / `aten.gru` / `aten.rnn_tanh` under torch.export
by running their decompositions, Python loops over the time steps, which can fix the sequence
length of the exported graph. A compressed recurrent layer runs these ops instead outside
training: the same kernels (`torch._VF.lstm`, …), shape functions that keep every dim symbolic,
a backward by recomputation, and ONNX translations to the `LSTM` / `GRU` / `RNN` ops
(export/recurrent_ops.py). In training mode the twin calls the kernels directly (dropout between
layers needs its random stream).
"""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import Tensor, _VF

__all__ = ["lstm", "gru", "rnn", "quiet_flat_weights"]


@contextlib.contextmanager
def quiet_flat_weights():
    """Computed gate matrices never form one flat cuDNN buffer, so cuDNN would warn at every call:
    the warning is left out (docs/methods.md says what it costs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RNN module weights are not part of single contiguous chunk")
        yield


# The kernels run with train=True and dropout 0: the same arithmetic as eval mode, and cuDNN
# computes a backward only for a forward in training mode (the backward recomputes through them).
def _lstm(input, state, weights, has_biases, num_layers, bidirectional, batch_first):
    out, h_n, c_n = _VF.lstm(input, state, weights, has_biases, num_layers, 0.0, True, bidirectional, batch_first)
    return out, h_n, c_n


def _gru(input, state, weights, has_biases, num_layers, bidirectional, batch_first):
    return _VF.gru(input, state[0], weights, has_biases, num_layers, 0.0, True, bidirectional, batch_first)


def _rnn(input, state, weights, has_biases, num_layers, bidirectional, batch_first, relu):
    kernel = _VF.rnn_relu if relu else _VF.rnn_tanh
    return kernel(input, state[0], weights, has_biases, num_layers, 0.0, True, bidirectional, batch_first)


@torch.library.custom_op("vcon::lstm", mutates_args=())
def lstm(input: Tensor, h0: Tensor, c0: Tensor, weights: list[Tensor], has_biases: bool, num_layers: int,
         bidirectional: bool, batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(output, h_n, c_n) of a multi-layer LSTM in eval mode."""
    return tuple(t.clone() for t in _lstm(input, (h0, c0), weights, has_biases, num_layers, bidirectional,
                                          batch_first))


@torch.library.custom_op("vcon::gru", mutates_args=())
def gru(input: Tensor, h0: Tensor, weights: list[Tensor], has_biases: bool, num_layers: int, bidirectional: bool,
        batch_first: bool) -> tuple[Tensor, Tensor]:
    """(output, h_n) of a multi-layer GRU in eval mode."""
    return tuple(t.clone() for t in _gru(input, (h0,), weights, has_biases, num_layers, bidirectional, batch_first))


@torch.library.custom_op("vcon::rnn", mutates_args=())
def rnn(input: Tensor, h0: Tensor, weights: list[Tensor], has_biases: bool, num_layers: int, bidirectional: bool,
        batch_first: bool, relu: bool) -> tuple[Tensor, Tensor]:
    """(output, h_n) of a multi-layer Elman RNN (tanh, or ReLU) in eval mode."""
    return tuple(t.clone() for t in _rnn(input, (h0,), weights, has_biases, num_layers, bidirectional, batch_first,
                                         relu))


def _output(input, state, bidirectional):
    dirs = 2 if bidirectional else 1
    return input.new_empty([*input.shape[:-1], dirs * state.shape[-1]])


@lstm.register_fake
def _(input, h0, c0, weights, has_biases, num_layers, bidirectional, batch_first):
    return _output(input, h0, bidirectional), h0.new_empty(h0.shape), c0.new_empty(c0.shape)


@gru.register_fake
def _(input, h0, weights, has_biases, num_layers, bidirectional, batch_first):
    return _output(input, h0, bidirectional), h0.new_empty(h0.shape)


@rnn.register_fake
def _(input, h0, weights, has_biases, num_layers, bidirectional, batch_first, relu):
    return _output(input, h0, bidirectional), h0.new_empty(h0.shape)


def _autograd(op, kernel, states: int):
    """Backward of `op` by recomputing `kernel` with autograd on (inputs: input, `states` states, weights, flags)."""
    def setup(ctx, inputs, output):
        ctx.flags = inputs[states + 2:]
        ctx.save_for_backward(*inputs[:states + 1], *inputs[states + 1])

    def backward(ctx, *grads):
        saved = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        input, state, weights = saved[0], saved[1:states + 1], saved[states + 1:]
        with torch.enable_grad(), quiet_flat_weights():
            outs = kernel(input, tuple(state), weights, *ctx.flags)
            wanted = [t for t in saved if t.requires_grad]
            found = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        per = [next(found) if t.requires_grad else None for t in saved]
        return (per[0], *per[1:states + 1], per[states + 1:], *([None] * len(ctx.flags)))

    op.register_autograd(backward, setup_context=setup)


_autograd(lstm, _lstm, 2)
_autograd(gru, _gru, 1)
_autograd(rnn, _rnn, 1)
