"""Tensor files (.safetensors, .npz): inputs under 'inputs' or the model's input names, plus 'labels'.

Items are `(x, y)`, `x`, or dicts of keyword inputs (plus "labels"), checked once at load:
NaN/Inf inputs, shapes the model cannot take, labels that are not whole class numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .registry import ReadRequest, register_reader
from .spec import is_float

__all__ = ["TensorData", "TENSOR_SUFFIXES", "read_tensor_file", "check_input"]

log = logging.getLogger(__name__)

TENSOR_SUFFIXES = (".safetensors", ".npz")


class TensorData(Dataset):
    """Samples held in memory: `inputs` (a tensor, or a dict of tensors for keyword inputs) and optional labels."""

    def __init__(self, inputs: torch.Tensor | Mapping[str, torch.Tensor], labels: torch.Tensor | None = None):
        self.inputs = inputs if isinstance(inputs, torch.Tensor) else dict(inputs)
        self.labels = labels

    def __len__(self) -> int:
        first = self.inputs if isinstance(self.inputs, torch.Tensor) else next(iter(self.inputs.values()))
        return int(first.shape[0])

    def __getitem__(self, i: int):
        if isinstance(self.inputs, torch.Tensor):
            return self.inputs[i] if self.labels is None else (self.inputs[i], self.labels[i])
        item = {k: v[i] for k, v in self.inputs.items()}
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        import numpy as np

        with np.load(str(path), allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DataError(f"{path} holds Python objects (needs unpickling): save plain numeric arrays with "
                            "numpy.savez") from None
        raise DataError(f"{path} is not a readable {path.suffix} file ({str(e).splitlines()[0][:160]}): re-write it") from None
    except Exception as e:
        raise DataError(f"{path} is not a readable {path.suffix} file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}): re-write it") from None


@register_reader("tensors", describes="a .safetensors or .npz file (key 'inputs', optional 'labels')",
                 recognises=lambda path, task: not path.is_dir() and path.suffix.lower() in TENSOR_SUFFIXES)
def read_tensor_file(request: ReadRequest) -> TensorData:
    """A .safetensors / .npz file: 'inputs' (or one array per model input name) and optional 'labels'."""
    path, spec = request.path, request.spec
    tensors = _read_tensors(path)
    labels = tensors.pop("labels", None)
    spec_kwargs = dict(spec.get("kwargs") or {})
    spec_args = list(spec.get("args") or [])
    if "inputs" in tensors:
        extra = sorted(set(tensors) - {"inputs"})
        if extra:
            log.warning("%s: ignoring keys %s (only 'inputs' and 'labels' are read)", path, extra)
        x = tensors["inputs"]
        if spec_kwargs and not spec_args:
            if len(spec_kwargs) != 1:
                raise DataError(f"{path} has one 'inputs' array but the model takes {sorted(spec_kwargs)}: "
                                f"store one array per input name instead of 'inputs'")
            name = next(iter(spec_kwargs))
            inputs: torch.Tensor | dict = {name: check_input(path, name, x, spec_kwargs[name])}
        else:
            if len(spec_args) > 1:
                raise DataError(f"{path} has one 'inputs' array but the model takes {len(spec_args)} positional "
                                "inputs: it cannot be fine-tuned from a tensor file")
            inputs = check_input(path, "inputs", x, spec_args[0] if spec_args else None)
    else:
        named = {k: v for k, v in tensors.items() if not spec_kwargs or k in spec_kwargs}
        if not named or not spec_kwargs:
            raise DataError(f"{path} has no 'inputs' array (found {sorted(tensors) or 'nothing'}): save the inputs "
                            "under the key 'inputs' (and class labels under 'labels')")
        missing = [k for k in spec_kwargs if k not in named and k != "attention_mask"]
        if missing:
            raise DataError(f"{path} lacks the model input(s) {missing} (found {sorted(tensors)}): store one array "
                            "per input name")
        inputs = {k: check_input(path, k, v, spec_kwargs.get(k)) for k, v in named.items()}
        if "attention_mask" in spec_kwargs and "attention_mask" not in inputs and "input_ids" in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])  # no padding recorded: attend to all
    firsts = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs.values())
    n = int(firsts[0].shape[0]) if firsts[0].dim() else 0
    if firsts[0].dim() == 0:
        raise DataError(f"{path}: inputs are a single number; store them with the examples along the first axis")
    if any(t.shape[0] != n for t in firsts):
        raise DataError(f"{path}: the input arrays hold different numbers of examples "
                        f"({[int(t.shape[0]) for t in firsts]}): give each the same first dimension")
    if labels is not None:
        labels = _as_labels(path, labels)
        if labels.shape[0] != n:
            raise DataError(f"{path}: {n} inputs but {labels.shape[0]} labels: give one label per example")
    return TensorData(inputs, labels)


def check_input(path: Path | str, name: str, x: torch.Tensor, spec: Mapping[str, Any] | None) -> torch.Tensor:
    """`x` (examples along dim 0) in the dtype the model takes, checked against its spec (pure).

    Raises:
        DataError: NaN/Inf values, fractions for an integer input, or a shape the model cannot take;
            the message names `path` and the input (or column) `name`.
    """
    if x.is_floating_point() or x.is_complex():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise DataError(f"{path}: '{name}' holds {int(bad.sum())} NaN/Inf value(s) (first at index {first}): "
                            "clean or drop those examples")
    if x.dtype == torch.bool:
        x = x.long()
    if spec is None:
        return x.float() if x.dtype == torch.float64 else x
    want_float = is_float(spec["dtype"])
    if want_float:
        x = x.to(getattr(torch, spec["dtype"]))  # integers (e.g. uint8 pixels) become floats
    elif x.is_floating_point():
        if not bool((x == x.round()).all()):
            raise DataError(f"{path}: '{name}' holds fractions but the model takes integers ({spec['dtype']}), "
                            "e.g. token ids: store whole numbers")
        x = x.to(getattr(torch, spec["dtype"]))
    else:
        x = x.to(getattr(torch, spec["dtype"]))
    want = list(spec["shape"])
    got = list(x.shape)
    # dim 0 is the batch; dim 1 of integer inputs (token ids) is a sequence that may differ
    seq_ok = not want_float and len(want) == 2
    if len(got) != len(want) or (got[1:] != want[1:] and not seq_ok):
        expect = "N×" + "×".join(map(str, want[1:])) if len(want) > 1 else "N"
        raise DataError(f"{path}: '{name}' has shape {'×'.join(map(str, got))} but the model takes {expect} "
                        "(examples along the first axis): reshape or resize the data")
    return x


def _as_labels(path: Path, labels: torch.Tensor) -> torch.Tensor:
    if labels.dim() != 1:
        raise DataError(f"{path}: labels have shape {tuple(labels.shape)}; give one integer class per example (N,)")
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise DataError(f"{path}: labels must be whole class numbers 0…C−1, found fractional or NaN values: "
                            "store class indices, not probabilities")
    elif labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"{path}: labels have dtype {labels.dtype}; store integer class indices 0…C−1")
    return labels.long()
