"""Calibration statistics: one streaming pass of calibration data through the captured graph.

Forward pre-hooks on the selected layers see every input; per layer they add up, in float64:

- Σ x² per input feature (Linear) or channel (Conv): the RMS of activation-aware low-rank;
- Σ x² per weight column: Wanda's ‖X_j‖ (a Conv's columns are its unfolded (channel, kernel
  position) patches, as `F.unfold` gives them, in the order of `weight.reshape(out, -1)`);
- where a method asks for it, the Gram matrix XᵀX over the weight's columns, over all tokens
  of a Linear and all patches of a Conv. Each chunk of ≤ 4096 rows is multiplied in float32 and
  added to the float64 sum, which keeps the product fast and the sum exact to float64.

The model runs in eval mode under no_grad, in batches, so batch-norm statistics and dropout are
untouched and only one batch's activations are alive at a time. The Gram matrices take
in_features² × 8 bytes per layer (`statistics_bytes`), all held at once. Grouped convolutions
(and layer types other than Linear / Conv1d / Conv2d) get the per-channel sums only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.data import Dataset, default_collate

from ..errors import DataError
from ..methods.calibration import GRAM_BYTES, InputStatistics
from .modes import eval_mode

__all__ = ["gather_statistics", "calibration_batches", "statistics_bytes", "DEFAULT_SAMPLES", "BATCH"]

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 128
BATCH = 16  # samples per forward
_CHUNK = 4096  # rows per float32 Gram product
_LABEL_KEYS = ("labels", "label")


# ── calibration data → model inputs ────────────────────────────────────────────────────────


def calibration_batches(calibration, *, samples: int = DEFAULT_SAMPLES, batch_size: int = BATCH,
                        positional: int = 1, pad: bool = False) -> Iterator[tuple[tuple, dict]]:
    """(args, kwargs) batches of model inputs, `samples` samples at most, labels dropped (lazy).

    Args:
        calibration: a map-style Dataset (e.g. `vcon_fx.load_data`'s; its items are collated in
            batches), a tensor or a dict of tensors (one batch, split here), or an iterable of
            batches (tensors, tuples / lists whose first `positional` tensors are the inputs, dicts).
        samples: how many samples to read at most (a Dataset's first ones).
        batch_size: samples per forward, for a Dataset or a single tensor.
        positional: how many positional inputs the model takes (a tuple batch may carry labels after them).
        pad: the model runs only at `batch_size`: a short last batch is filled with its own samples again.

    Raises:
        DataError: an item of a form the model cannot take, or no sample at all.
    """
    if samples <= 0:
        raise DataError(f"--calibration-samples must be a positive number, got {samples}")
    if isinstance(calibration, Dataset) and hasattr(calibration, "__len__"):
        indices = list(range(min(samples, len(calibration))))
        chunks = (indices[i:i + batch_size] for i in range(0, len(indices), batch_size))
        source = (default_collate([calibration[i] for i in _padded(c, batch_size, pad)]) for c in chunks)
    elif isinstance(calibration, (torch.Tensor, Mapping)):
        source = _split(calibration, batch_size)
    elif isinstance(calibration, Iterable):
        source = iter(calibration)
    else:
        raise DataError(f"calibration= takes a Dataset, a tensor or an iterable of batches, got {type(calibration).__name__}")
    seen = 0
    for batch in source:
        args, kwargs = _model_inputs(batch, positional)
        size = _batch_size(args, kwargs)
        if seen + size > samples and not pad:  # a fixed-batch model takes whole batches only
            args, kwargs = _first(args, samples - seen), _first(kwargs, samples - seen)
            size = samples - seen
        seen += size
        yield args, kwargs
        if seen >= samples:
            break
    if seen == 0:
        raise DataError("the calibration data holds no sample: give a file or batches with at least one")


def _padded(chunk: list[int], size: int, pad: bool) -> list[int]:
    return (chunk * math.ceil(size / len(chunk)))[:size] if pad and len(chunk) < size else chunk


def _split(batch, size: int):
    total = _batch_size(*_model_inputs(batch, 1)) if not isinstance(batch, torch.Tensor) else batch.shape[0]
    for lo in range(0, total, size):
        yield _slice(batch, lo, lo + size)


def _slice(obj, lo: int, hi: int):
    if isinstance(obj, torch.Tensor):
        return obj[lo:hi]
    if isinstance(obj, Mapping):
        return {k: _slice(v, lo, hi) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_slice(v, lo, hi) for v in obj)
    return obj


def _first(obj, n: int):
    return _slice(obj, 0, n)


def _model_inputs(batch, positional: int) -> tuple[tuple, dict]:
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
    if isinstance(batch, (list, tuple)) and batch:
        if isinstance(batch[0], Mapping):
            return _model_inputs(batch[0], positional)
        return tuple(batch[:max(positional, 1)]), {}
    raise DataError(f"a calibration batch must be a tensor, a tuple of tensors or a dict of inputs, "
                    f"got {type(batch).__name__}")


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise DataError("a calibration batch holds no tensor with a batch dimension")


# ── the layers' sums ───────────────────────────────────────────────────────────────────────


def _layout(module: nn.Module) -> tuple[int, int] | None:
    """(channels, weight columns) of a layer whose inputs the statistics cover, or None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.in_channels, module.weight[0].numel() if module.groups == 1 else 0
    return None


def statistics_bytes(modules: Iterable[nn.Module], *, gram: bool) -> int:
    """Bytes the statistics of these layers take, all held at once (Gram: columns² × 8 per layer) (pure)."""
    total = 0
    for module in modules:
        layout = _layout(module)
        if layout is not None:
            channels, columns = layout
            total += GRAM_BYTES * (channels + columns + (columns * columns if gram else 0))
    return total


class _LayerSums:
    """The running float64 sums of one layer's inputs."""

    def __init__(self, module: nn.Module, gram: bool, last: "_LastInput | None" = None):
        channels, columns = _layout(module)
        device = module.weight.device
        self.module, self.rows, self.positions, self.last = module, 0, 0, last or _LastInput()
        self.channels = torch.zeros(channels, dtype=torch.float64, device=device)
        self.columns = torch.zeros(columns, dtype=torch.float64, device=device)
        self.gram = torch.zeros(columns, columns, dtype=torch.float64, device=device) if gram and columns else None
        self.key = ("linear",) if isinstance(module, nn.Linear) else \
            (module.kernel_size, module.stride, module.dilation, module.padding, module.padding_mode, module.groups)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        positions, channels, rows, columns, gram = self.last.sums(x, self.key, lambda: self._sums(x))
        self.positions += positions
        self.channels += channels
        self.rows += rows
        if columns is not None:
            self.columns += columns
        if gram is not None:
            self.gram += gram

    def _sums(self, x: torch.Tensor) -> tuple:
        """(positions, Σx² per channel, rows, Σx² per column, XᵀX) of one input (columns and XᵀX may be None)."""
        x = x.detach().float()
        linear = isinstance(self.module, nn.Linear)
        per_channel = x.reshape(-1, x.shape[-1]).T if linear else x.transpose(0, 1).reshape(x.shape[1], -1)
        if not self.columns.numel():  # a grouped convolution: its columns read different channels per row
            return per_channel.shape[1], per_channel.pow(2).sum(1).double(), 0, None, None
        rows = per_channel.T if linear else _patches(self.module, x)
        gram = None
        if self.gram is not None:
            gram = sum((chunk.T @ chunk).double() for chunk in rows.split(_CHUNK))
            columns = gram.diagonal().clone()
        else:
            columns = rows.pow(2).sum(0).double()
        channels = columns if linear else per_channel.pow(2).sum(1).double()
        return per_channel.shape[1], channels, rows.shape[0], columns, gram

    def result(self) -> InputStatistics:
        return InputStatistics(self.rows, self.channels, self.columns, self.gram, channel_rows=self.positions)


class _LastInput:
    """The sums of the last input seen, for the next layer that reads the very same tensor (Q, K and V).

    It holds that one tensor, so its memory cannot be reused by another while the sums are kept.
    """

    def __init__(self):
        self.tensor, self.key, self.value = None, None, None

    def sums(self, x: torch.Tensor, key: tuple, compute) -> tuple:
        if x is self.tensor and key == self.key:
            return self.value
        self.tensor, self.key, self.value = x, key, compute()
        return self.value

    def clear(self) -> None:
        self.tensor, self.key, self.value = None, None, None


def _patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (positions × samples, channels·kernel) rows a convolution multiplies its weight with.

    Sliding windows as a view (`Tensor.unfold`, what `F.unfold` computes, without its im2col kernel,
    whose threads stall on a busy machine), then one copy into rows.
    """
    kernel, stride, dilation, padding = conv.kernel_size, conv.stride, conv.dilation, conv.padding
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
    else:  # "same" puts the odd pixel on the right / bottom, as torch does
        total = [d * (k - 1) if padding == "same" else 0 for k, d in zip(kernel, dilation)] \
            if isinstance(padding, str) else [2 * p for p in padding]
        x = F.pad(x, [p for t in reversed(total) for p in (t // 2, t - t // 2)])
    windows = x
    for dim, (k, s, d) in enumerate(zip(kernel, stride, dilation), start=2):
        windows = windows.unfold(dim, d * (k - 1) + 1, s)  # appends the window axis
    windows = windows[(Ellipsis, *(slice(None, None, d) for d in dilation))]  # (N, C, *out, *kernel)
    spatial = len(kernel)
    order = (0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial))  # (N, *out, C, *kernel)
    return windows.permute(order).reshape(-1, conv.weight[0].numel())


def gather_statistics(gm: fx.GraphModule, paths: list[str], batches: Iterable[tuple[tuple, dict]], *,
                      gram: bool) -> dict[str, InputStatistics]:
    """Each layer's input statistics over every batch (the graph runs, nothing in it changes).

    A layer called several times pools every call; a layer of a type the statistics do not cover
    gets none.

    Args:
        gm: the captured graph (before duplicate).
        paths: the layers to measure.
        batches: (args, kwargs) model inputs, e.g. from `calibration_batches`.
        gram: also accumulate XᵀX (the methods whose `needs_gram` is set).
    """
    last = _LastInput()
    sums = {p: _LayerSums(gm.get_submodule(p), gram, last) for p in paths if _layout(gm.get_submodule(p)) is not None}
    handles = [sums[p].module.register_forward_pre_hook(
        lambda _m, args, acc=sums[p]: acc.add(args[0]) if args and isinstance(args[0], torch.Tensor) else None)
        for p in sums]
    device = next((t.device for t in gm.parameters()), torch.device("cpu"))
    count = 0
    try:
        with eval_mode(gm), torch.no_grad():
            for args, kwargs in batches:
                gm(*_to(args, device), **_to(kwargs, device))
                count += 1
                last.clear()
    finally:
        last.clear()
        for handle in handles:
            handle.remove()
    log.info("gathered input statistics of %d layer(s) over %d batch(es)", len(sums), count)
    return {p: acc.result() for p, acc in sums.items()}


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
