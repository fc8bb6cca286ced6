"""Compressed recurrent layers as the ONNX `LSTM` / `GRU` / `RNN` ops, with a dynamic sequence length.

Outside training a compressed recurrent layer runs `vcon::lstm` / `vcon::gru` / `vcon::rnn`
(methods/recurrent_kernels.py); these translations turn them into the ONNX ops: LSTM and GRU
through torch.onnx's own translations of `aten.lstm` / `aten.gru` (gates reordered), RNN here
(torch.onnx has none): each layer one ONNX `RNN` (Tanh or Relu, per direction). Weights: W
(dirs, h, in), R (dirs, h, h), B (dirs, 2h) = [b_ih, b_hh], PyTorch's own layout (one gate: no
reordering). A dense recurrent layer left in a model keeps torch's export.
"""

# No `from __future__ import annotations`: torch.onnx reads the translations' annotations, and
# their types (TFloat) are imported inside `recurrent_translations`.
from typing import Sequence

from ..methods import recurrent_kernels

__all__ = ["recurrent_translations"]


def recurrent_translations() -> dict:
    """{op: onnxscript function} for `torch.onnx.export(custom_translation_table=...)`."""
    from onnxscript import opset18 as op
    from onnxscript.function_libs.torch_lib.ops.core import aten_gru, aten_lstm
    from onnxscript.function_libs.torch_lib.tensor_typing import TFloat
    def rnn(input: TFloat, hx: TFloat, params: Sequence[TFloat], has_biases: bool, num_layers: int, dropout: float,
            train: bool, bidirectional: bool, batch_first: bool, activation: str):
        dirs = 2 if bidirectional else 1
        x = op.Transpose(input, perm=[1, 0, 2]) if batch_first else input
        per_dir = 4 if has_biases else 2
        states = []
        for layer in range(num_layers):
            h0 = op.Slice(hx, [layer * dirs], [(layer + 1) * dirs], axes=[0])
            first = layer * per_dir * dirs
            chunks = [params[first + d * per_dir: first + (d + 1) * per_dir] for d in range(dirs)]
            w = op.Concat(*[op.Unsqueeze(c[0], [0]) for c in chunks], axis=0)
            r = op.Concat(*[op.Unsqueeze(c[1], [0]) for c in chunks], axis=0)
            hidden = hx.shape[2]
            kwargs = dict(initial_h=h0, direction="bidirectional" if bidirectional else "forward",
                          hidden_size=hidden, activations=[activation] * dirs)
            if has_biases:
                b = op.Concat(*[op.Unsqueeze(op.Concat(c[2], c[3], axis=0), [0]) for c in chunks], axis=0)
                y, y_h = op.RNN(x, w, r, b, **kwargs)
            else:
                y, y_h = op.RNN(x, w, r, **kwargs)
            y = op.Transpose(y, perm=[0, 2, 1, 3])  # (seq, batch, dirs, h) → (seq, batch, dirs·h)
            x = op.Reshape(y, op.Constant(value_ints=[0, 0, -1]))
            if layer < num_layers - 1 and dropout > 0.0 and train:
                x, _ = op.Dropout(x, dropout, train)
            states.append(y_h)
        h_n = states[0] if len(states) == 1 else op.Concat(*states, axis=0)
        return (op.Transpose(x, perm=[1, 0, 2]) if batch_first else x), h_n

    def vcon_lstm(input: TFloat, h0: TFloat, c0: TFloat, weights: Sequence[TFloat], has_biases: bool,
                  num_layers: int, bidirectional: bool, batch_first: bool):
        return aten_lstm(input, [h0, c0], weights, has_biases, num_layers, 0.0, False, bidirectional, batch_first)

    def vcon_gru(input: TFloat, h0: TFloat, weights: Sequence[TFloat], has_biases: bool, num_layers: int,
                 bidirectional: bool, batch_first: bool):
        return aten_gru(input, h0, weights, has_biases, num_layers, 0.0, False, bidirectional, batch_first)

    def vcon_rnn(input: TFloat, h0: TFloat, weights: Sequence[TFloat], has_biases: bool, num_layers: int,
                 bidirectional: bool, batch_first: bool, relu: bool):
        return rnn(input, h0, weights, has_biases, num_layers, 0.0, False, bidirectional, batch_first,
                   "Relu" if relu else "Tanh")

    ops = recurrent_kernels
    return {ops.lstm._opoverload: vcon_lstm, ops.gru._opoverload: vcon_gru, ops.rnn._opoverload: vcon_rnn}
