"""Recurrent layers (LSTM, GRU, RNN): every gate matrix compressed as a Linear, run as one recurrent op.

An nn.LSTM holds, per layer and direction, W_ih (4h × in), W_hh (4h × h) (and W_hr with a
projection) plus biases. Any method compresses each matrix as it would a Linear of that shape:
low-rank gives W_ih ≈ A·B, pruning masks it, quantization fake-quantizes it per gate row. The
twin (`RecurrentTwin`) holds one compressed module per matrix and runs the recurrence with the
weights they compute, through the same kernel as the dense layer (`torch._VF.lstm` / `gru` /
`rnn_tanh` / `rnn_relu`), so at β = 1 and after vanish nothing about the recurrence changes.

Export: the recurrence stays one op, the ONNX `LSTM` / `GRU` / `RNN` (outside training the twin runs
the `vcon::lstm` / `gru` / `rnn` ops of recurrent_kernels.py, which export/recurrent_ops.py
translates), the fastest form onnxruntime runs and the only one with a dynamic sequence length. That op takes whole gate matrices, so the compressed weights are computed in the graph
in front of it (A·B, DequantizeLinear) from initializers: onnxruntime folds them once when the
session loads when it can. What is gained is storage (file size, parameters); FLOPs stay those of
the dense recurrence, and the plans say so. An unrolled low-rank cell would save FLOPs only at
ranks far below h, at the price of one Loop iteration per time step and a fixed-length graph.
"""

from __future__ import annotations

import math

import torch
from torch import _VF, nn

from ..errors import ConfigError
from . import recurrent_kernels as kernels
from .base import LayerPlan, LayerSite, layer_params
from .layer_types import RECURRENT_TYPES, effective_weight, torch_type

__all__ = ["RecurrentTwin", "plan_recurrent", "build_recurrent", "materialize_recurrent", "gate_matrices",
           "run_recurrent"]

_FLOAT_BYTES = 4
_NOTE = ("runs as one recurrent op (ONNX LSTM/GRU/RNN) that takes whole gate matrices: the compressed ones are "
         "computed in front of it, so storage shrinks and FLOPs stay those of the dense recurrence")
_OPTIONS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def gate_matrices(rnn: nn.Module) -> list[str]:
    """The names of the layer's weight matrices (W_ih, W_hh, W_hr per layer and direction), in order."""
    return [n for n in rnn._flat_weights_names if getattr(rnn, n).dim() == 2]


def _options(rnn: nn.Module) -> dict:
    """The constructor arguments of `rnn` (pure)."""
    options = {k: getattr(rnn, k) for k in _OPTIONS}
    if isinstance(rnn, nn.LSTM):
        options["proj_size"] = rnn.proj_size
    if isinstance(rnn, nn.RNN):
        options["nonlinearity"] = rnn.nonlinearity
    return options


def _view(matrix: torch.Tensor) -> nn.Linear:
    """A Linear (no bias) whose weight IS `matrix` (a Parameter): what each method compresses."""
    view = nn.utils.skip_init(nn.Linear, matrix.shape[1], matrix.shape[0], bias=False, device=matrix.device,
                              dtype=matrix.dtype)
    view.weight = matrix
    return view


def _sub_site(site: LayerSite, name: str, view: nn.Module) -> LayerSite:
    """The site of one gate matrix: applied at every time step of every sequence of the batch."""
    steps = None if not site.out_shape else (math.prod(site.out_shape[:-1]), view.out_features)
    return LayerSite(f"{site.path}.{name}", view, steps, site.calls)


def plan_recurrent(method, site: LayerSite) -> LayerPlan:
    """`method`'s plan of each gate matrix, summed into the recurrent layer's plan (pure)."""
    rnn = site.module
    subs = {n: method.plan(_sub_site(site, n, _view(getattr(rnn, n)))) for n in gate_matrices(rnn)}
    done = [p for p in subs.values() if not p.skipped]
    before = layer_params(rnn)
    flops = sum(p.flops_before for p in subs.values())
    plan = LayerPlan(
        path=site.path, kind=site.kind, shape=tuple(getattr(rnn, gate_matrices(rnn)[0]).shape),
        params_before=before, params_after=before - sum(p.params_before - p.params_after for p in done),
        flops_before=flops, flops_after=flops, bytes_before=before * _FLOAT_BYTES,
        bytes_after=before * _FLOAT_BYTES - sum(p.bytes_before - p.bytes_after for p in done),
    )
    for key in method.summary_keys:  # e.g. the rank, as a Linear's plan shows it
        value = next((p.detail[key] for p in done if key in p.detail), None)
        if value is not None:
            plan.detail[key] = value
    plan.detail.update({"matrices": {n: p.to_dict() for n, p in subs.items()}, "note": _NOTE})
    if not done:
        first = next(iter(subs.values()))
        plan.skip_reason = f"every gate matrix stays dense (e.g. {first.path}: {first.skip_reason})"
    if getattr(rnn, "proj_size", 0):
        plan.params_after, plan.bytes_after = plan.params_before, plan.bytes_before
        plan.skip_reason = (f"an LSTM with proj_size={rnn.proj_size}: the ONNX LSTM op has no projection, so its "
                            "compressed form would not export; it stays dense")
    return plan


def build_recurrent(method, site: LayerSite, plan: LayerPlan, *, init: bool = True) -> "RecurrentTwin":
    """The twin of a recurrent layer: `method`'s twin of each planned gate matrix (pure on the layer)."""
    rnn = site.module
    share = method.share_dense_weights()
    mats: dict[str, nn.Module] = {}
    for name in gate_matrices(rnn):
        matrix = getattr(rnn, name)
        sub = LayerPlan.from_dict(plan.detail["matrices"][name])
        if sub.skipped:
            mats[name] = _view(matrix if share else _own(matrix, init))
        else:
            mats[name] = method.build(_sub_site(site, name, _view(matrix)), sub, init=init)
    for module in mats.values():  # the recurrence feeds the gates float inputs: no input quantization
        for inner in module.modules():
            if getattr(inner, "act_bits", None) is not None:
                inner.act_bits = None
    return RecurrentTwin(rnn, mats, share=share, init=init)


def _own(t: torch.Tensor, init: bool) -> nn.Parameter:
    return nn.Parameter(t.detach().clone() if init else torch.empty_like(t), requires_grad=t.requires_grad)


class RecurrentTwin(nn.Module):
    """A recurrent layer whose gate matrices come from compressed modules (`mats`), biases as they are.

    With `share` the biases ARE the dense layer's Parameters; else they are copies.
    """

    def __init__(self, rnn: nn.Module, mats: dict[str, nn.Module], *, share: bool, init: bool = True):
        super().__init__()
        if not isinstance(rnn, RECURRENT_TYPES):
            raise ConfigError(f"{type(rnn).__name__} is not one of {[c.__name__ for c in RECURRENT_TYPES]}")
        self.layer_type = torch_type(rnn)
        self.options = _options(rnn)
        self.flat_names = list(rnn._flat_weights_names)
        self.mats = nn.ModuleDict(mats)
        for name in self.flat_names:
            if name not in mats:
                bias = getattr(rnn, name)
                self.register_parameter(name, bias if share else _own(bias, init))
        self.train(rnn.training)

    def flat_weights(self) -> list[torch.Tensor]:
        """Every weight in the order the recurrent kernel reads them."""
        return [effective_weight(self.mats[n]) if n in self.mats else getattr(self, n) for n in self.flat_names]

    def forward(self, input, hx=None):
        return run_recurrent(self.layer_type, self.options, self.flat_weights(), input, hx, self.training)

    @torch.no_grad()
    def plain(self) -> nn.Module:
        """An ordinary layer of the dense type (own Parameters) holding the current weights."""
        weights = self.flat_weights()
        # nn.LSTM's signature hides `device` in *args: build on the meta device, then fill
        rnn = self.layer_type(**self.options, device="meta", dtype=weights[0].dtype)
        rnn = rnn.to_empty(device=weights[0].device)
        for name, value in zip(self.flat_names, weights):
            getattr(rnn, name).copy_(value)
            getattr(rnn, name).requires_grad_(value.requires_grad)
        return rnn.train(self.training)

    def extra_repr(self) -> str:
        return f"{self.layer_type.__name__}, {self.options}"


def run_recurrent(kind: type, options: dict, weights: list[torch.Tensor], input, hx, training: bool):
    """What `kind(**options)` computes on `input` with these weights (nn.RNNBase.forward, for tensors)."""
    if isinstance(input, nn.utils.rnn.PackedSequence):
        raise ConfigError(f"a compressed {kind.__name__} takes padded tensors, not a PackedSequence: pad the batch "
                          "(or --ignore the layer)")
    batched = input.dim() == 3
    batch_dim = 0 if options["batch_first"] else 1
    if not batched:
        input = input.unsqueeze(batch_dim)
        hx = None if hx is None else tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    if hx is None:
        hx = _zero_state(kind, options, input, input.shape[batch_dim])
    args = (weights, options["bias"], options["num_layers"], float(options["dropout"]), training,
            options["bidirectional"], options["batch_first"])
    with kernels.quiet_flat_weights():
        out, state = _run(kind, options, weights, input, hx, training, args)
    if not batched:
        out = out.squeeze(batch_dim)
        state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
    return out, state


def _run(kind, options, weights, input, hx, training, args):
    if training:  # dropout between layers draws from the random stream: the kernels themselves
        if issubclass(kind, nn.LSTM):
            out, h, c = _VF.lstm(input, hx, *args)
            state = (h, c)
        elif issubclass(kind, nn.GRU):
            out, state = _VF.gru(input, hx, *args)
        else:
            run = _VF.rnn_tanh if options["nonlinearity"] == "tanh" else _VF.rnn_relu
            out, state = run(input, hx, *args)
    else:  # the same kernels as ops whose shapes follow a dynamic sequence length (recurrent_kernels.py)
        flags = (options["bias"], options["num_layers"], options["bidirectional"], options["batch_first"])
        if issubclass(kind, nn.LSTM):
            out, h, c = kernels.lstm(input, hx[0], hx[1], weights, *flags)
            state = (h, c)
        elif issubclass(kind, nn.GRU):
            out, state = kernels.gru(input, hx, weights, *flags)
        else:
            out, state = kernels.rnn(input, hx, weights, *flags, options["nonlinearity"] == "relu")
    return out, state


def _zero_state(kind: type, options: dict, input: torch.Tensor, batch) -> torch.Tensor | tuple:
    layers = options["num_layers"] * (2 if options["bidirectional"] else 1)
    hidden = options["hidden_size"]

    def zeros(size):
        return torch.zeros(layers, batch, size, dtype=input.dtype, device=input.device)

    if issubclass(kind, nn.LSTM):
        return zeros(options["proj_size"] or hidden), zeros(hidden)
    return zeros(hidden)


def materialize_recurrent(method, compressed: nn.Module) -> nn.Module:
    """The deployable form of a recurrent twin, in place (`compressed` itself when it is none): each
    matrix's module materialized. It stays a twin, whose eval-mode ops keep the exported sequence
    length dynamic (recurrent_kernels.py); `RecurrentTwin.plain` gives an ordinary layer."""
    if not isinstance(compressed, RecurrentTwin):
        return compressed
    for name, module in list(compressed.mats.items()):
        compressed.mats[name] = _materialize_all(method, module)
    return compressed


def _materialize_all(method, module: nn.Module) -> nn.Module:
    done = method.materialize(module)
    if done is not module:
        return done
    for path, inner in list(module.named_modules()):
        if path and (new := method.materialize(inner)) is not inner:
            module.set_submodule(path, new)
    return module
