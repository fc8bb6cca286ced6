"""Fine-tuning data from files: tensors, an image folder, or a text file of lines.

Every dataset yields one of the item forms `finetune` reads:

    (x, y)        a tensor input and its integer label       (tensor files, image folders)
    x             a tensor input alone                        (tensor files without labels)
    {name: x, …}  keyword inputs, plus "labels" when labelled (text files; tensor files keyed by
                  the model's input names, e.g. input_ids / attention_mask)

Checks happen once, at load: missing file, NaN/Inf inputs, shapes the model cannot take, labels
that are not whole numbers or lie outside [0, num_classes), an empty dataset. Each raises a
one-line DataError that names the fix.

Example:
    >>> ds = load_data("train.npz", input_spec=vm.meta["vcon"].inputs)
    >>> x, y = ds[0]
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from ..errors import DataError

__all__ = [
    "load_data",
    "load_data_for",
    "TensorData",
    "TextLines",
    "dataset_labels",
    "check_labels",
    "model_task",
    "TENSOR_SUFFIXES",
    "TEXT_SUFFIXES",
]

log = logging.getLogger(__name__)

TENSOR_SUFFIXES = (".safetensors", ".npz")
TEXT_SUFFIXES = (".txt", ".text", ".lines", ".tsv")
ACCEPTED = ("give a .safetensors or .npz file (key 'inputs', optional 'labels'), an image folder "
            "(one sub-folder per class), or a text file with one example per line")
# torchvision's ImageNet statistics: what torchvision and most Hugging Face vision models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SEQ_LEN = 128
DEFAULT_IMAGE_SIZE = 224


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


class TextLines(TensorData):
    """Tokenized lines: dict items with input_ids / attention_mask (and labels when given)."""

    def __init__(self, encoded: Mapping[str, torch.Tensor], labels: torch.Tensor | None, lines: list[str]):
        super().__init__(encoded, labels)
        self.lines = lines


def load_data(
    path: str | Path,
    *,
    model_task: str | None = None,
    tokenizer_path: str | Path | None = None,
    seq_len: int | None = None,
    input_spec: Mapping[str, Any] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Read a data file or folder into a Dataset, checked against the model (pure: files are only read).

    Args:
        path: a `.safetensors` / `.npz` tensor file (key `inputs`, or the model's input names,
            plus optional `labels`); an image folder (one sub-folder per class, read with
            torchvision's ImageFolder); or a text file, one example per line (`LABEL<TAB>text`
            lines are labelled).
        model_task: "vision", "text" or "generic" (guessed from `input_spec` when omitted).
        tokenizer_path: a Hugging Face folder holding the model's tokenizer (text files).
        seq_len: pad / truncate text to this many tokens (default: the model's example length).
        input_spec: the recipe's example-input spec (`vm.meta["vcon"].inputs`): shapes and dtypes
            to check tensor files against and to resize images to.
        num_classes: labels must lie in [0, num_classes).

    Returns:
        A Dataset whose items are `(x, y)`, `x`, or dicts of keyword inputs (see the module doc).

    Raises:
        DataError: missing or unreadable data, NaN/Inf inputs, a shape the model cannot take,
            labels that are not whole numbers or are out of range, an empty dataset.

    Example:
        >>> ds = load_data("train.safetensors", input_spec={"args": [{"shape": [1, 16], "dtype": "float32"}]})
        >>> len(ds)
        256
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path} does not exist: {ACCEPTED}")
    spec = dict(input_spec or {})
    task = model_task or model_task_from_spec(spec)
    if path.is_dir():
        ds = _image_folder(path, spec)
    elif path.suffix.lower() in TENSOR_SUFFIXES:
        ds = _tensor_file(path, spec)
    elif path.suffix.lower() in TEXT_SUFFIXES or task == "text":
        ds = _text_file(path, tokenizer_path, seq_len, spec)
    else:
        raise DataError(f"data {path} has an unknown format ({path.suffix or 'no suffix'}): {ACCEPTED}")
    if len(ds) == 0:
        raise DataError(f"data {path} holds no examples: give a file or folder with at least one")
    check_labels(path, dataset_labels(ds), num_classes)
    log.info("loaded %d example(s) from %s (%s)", len(ds), path, type(ds).__name__)
    return ds


def load_data_for(model: torch.nn.Module, path: str | Path, *, seq_len: int | None = None,
                  num_classes: int | None = None) -> Dataset:
    """`load_data` with the task, tokenizer and input shapes read from a vcon model's recipe (pure).

    Raises:
        DataError: as `load_data`.
        StageError: `model` is not a vcon model.
    """
    from ..graph.recipe import recipe_of

    recipe = recipe_of(model)
    return load_data(path, model_task=model_task(recipe), tokenizer_path=tokenizer_folder(recipe), seq_len=seq_len,
                     input_spec=recipe.inputs, num_classes=num_classes)


def model_task(recipe) -> str:
    """"vision", "text" or "generic", from a recipe's example inputs (pure)."""
    return model_task_from_spec(recipe.inputs)


def model_task_from_spec(spec: Mapping[str, Any]) -> str:
    kwargs = spec.get("kwargs") or {}
    if "input_ids" in kwargs:
        return "text"
    if "pixel_values" in kwargs:
        return "vision"
    args = spec.get("args") or []
    if len(args) == 1 and len(args[0]["shape"]) == 4 and _is_float(args[0]["dtype"]):
        return "vision"
    if len(args) == 1 and len(args[0]["shape"]) == 2 and not _is_float(args[0]["dtype"]):
        return "text"
    return "generic"


def tokenizer_folder(recipe) -> str | None:
    """The Hugging Face folder of a recipe's source, where its tokenizer lives (None otherwise)."""
    source = recipe.source or {}
    if source.get("kind") == "hf":
        return source.get("path")
    if source.get("kind") == "state_dict" and source.get("arch") and Path(source["arch"]).is_dir():
        return source["arch"]
    return None


def dataset_labels(ds: Dataset) -> torch.Tensor | None:
    """All labels of a dataset without reading its inputs, when it keeps them apart (None otherwise)."""
    labels = getattr(ds, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    targets = getattr(ds, "targets", None)  # torchvision ImageFolder and friends
    if targets is not None and not isinstance(targets, torch.Tensor):
        try:
            return torch.as_tensor(list(targets))
        except (TypeError, ValueError):
            return None
    return targets if isinstance(targets, torch.Tensor) else None


# ── tensor files ───────────────────────────────────────────────────────────────────────────


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


def _tensor_file(path: Path, spec: Mapping[str, Any]) -> TensorData:
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
            inputs: torch.Tensor | dict = {name: _check_input(path, name, x, spec_kwargs[name])}
        else:
            if len(spec_args) > 1:
                raise DataError(f"{path} has one 'inputs' array but the model takes {len(spec_args)} positional "
                                "inputs: it cannot be fine-tuned from a tensor file")
            inputs = _check_input(path, "inputs", x, spec_args[0] if spec_args else None)
    else:
        named = {k: v for k, v in tensors.items() if not spec_kwargs or k in spec_kwargs}
        if not named or not spec_kwargs:
            raise DataError(f"{path} has no 'inputs' array (found {sorted(tensors) or 'nothing'}): save the inputs "
                            "under the key 'inputs' (and class labels under 'labels')")
        missing = [k for k in spec_kwargs if k not in named and k != "attention_mask"]
        if missing:
            raise DataError(f"{path} lacks the model input(s) {missing} (found {sorted(tensors)}): store one array "
                            "per input name")
        inputs = {k: _check_input(path, k, v, spec_kwargs.get(k)) for k, v in named.items()}
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


def _check_input(path: Path, name: str, x: torch.Tensor, spec: Mapping[str, Any] | None) -> torch.Tensor:
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
    want_float = _is_float(spec["dtype"])
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


def check_labels(path: str | Path, labels: torch.Tensor | None, num_classes: int | None) -> None:
    """Labels must be class indices in [0, num_classes). Raises DataError naming `path` and the fix."""
    if labels is None or not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise DataError(f"{path}: labels must be class indices ≥ 0, found {low}: renumber the classes from 0")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"{path}: label {high} is out of range for a model with {num_classes} outputs "
                        f"(classes 0…{num_classes - 1}): renumber the labels or use a model with more outputs")


# ── image folders ──────────────────────────────────────────────────────────────────────────


def _image_folder(path: Path, spec: Mapping[str, Any]) -> Dataset:
    from torchvision import datasets, transforms

    args = list(spec.get("args") or [])
    pixel = (spec.get("kwargs") or {}).get("pixel_values")
    shape = args[0]["shape"] if len(args) == 1 else pixel["shape"] if pixel else None
    if shape is not None and len(shape) != 4:
        raise DataError(f"{path} is an image folder but the model takes inputs of shape {'×'.join(map(str, shape))}, "
                        "not images (N×C×H×W): give a tensor file instead")
    channels, height, width = (shape[1], shape[2], shape[3]) if shape else (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    if channels not in (1, 3):
        raise DataError(f"{path}: the model takes {channels}-channel images; an image folder gives 1 or 3 channels: "
                        "give a tensor file instead")
    steps = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    if channels == 3:
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    try:
        ds = datasets.ImageFolder(str(path), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path} is a folder without images in class sub-folders ({str(e).splitlines()[0][:120]}): "
                        f"{ACCEPTED}") from None
    if pixel is not None:
        return _Keyword(ds, "pixel_values")
    return ds


class _Keyword(Dataset):
    """Image items handed to the model as a keyword input (Hugging Face vision models)."""

    def __init__(self, ds: Dataset, name: str):
        self.ds, self.name = ds, name
        self.targets = getattr(ds, "targets", None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y = self.ds[i]
        return {self.name: x, "labels": torch.tensor(y)}


# ── text files ─────────────────────────────────────────────────────────────────────────────


def _text_file(path: Path, tokenizer_path, seq_len, spec: Mapping[str, Any]) -> TextLines:
    if tokenizer_path is None:
        raise DataError(f"{path} is text, but the model has no tokenizer (it is not a Hugging Face folder with "
                        "tokenizer files): tokenize it yourself into a tensor file with 'input_ids'")
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
    kwargs_spec = dict(spec.get("kwargs") or {})
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
    enc = tok(lines, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
    keep = set(kwargs_spec) if kwargs_spec else {"input_ids", "attention_mask"}
    encoded = {k: v for k, v in enc.items() if k in keep}
    if "input_ids" not in encoded:
        raise DataError(f"{path} is text but the model takes {sorted(kwargs_spec)}, not input_ids: give a tensor file")
    missing = sorted(set(kwargs_spec) - set(encoded))
    if missing:
        raise DataError(f"the tokenizer at {tokenizer_path} does not produce {missing}, which the model takes: "
                        "give a tensor file with those arrays")
    return TextLines(encoded, labels, lines)


def _is_int(s: str) -> bool:
    s = s.strip()
    return s.lstrip("-").isdigit()


def _is_float(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "complex")) or dtype in ("half", "double")
