"""Load a Hugging Face model folder (config.json + weights), offline, with example inputs.

The class is the Auto class whose mapping names the config's `architectures[0]` (AutoModel
otherwise). Attention is forced to "eager": the fused kernels do not trace or export cleanly.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import LoadError, UsageError, first_line
from .base import LoadedModel, example_generator, seeded, unsafe_error
from .pickle_scan import unsafe_globals
from .registry import SourceKind, register_source
from .request import SourceRequest

__all__ = ["is_hf_folder", "weight_files", "config_files", "build_hf", "TOKENIZER_FILES", "HfSource"]

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model")
DEFAULT_SEQ_LEN = 16


def is_hf_folder(path: Path) -> bool:
    """True when `path` is a folder with a config.json."""
    return path.is_dir() and (path / "config.json").is_file()


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files a folder holds, preferring safetensors; and whether they are pickles (.bin)."""
    for index, pickled in (("model.safetensors.index.json", False), ("pytorch_model.bin.index.json", True)):
        if (folder / index).is_file():
            try:
                shards = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise LoadError(f"{folder / index} is not a valid shard index ({first_line(e)}): re-save the model") from e
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise LoadError(f"{folder} is missing weight shards {missing[:3]} listed in {index}: copy the whole folder")
            return [folder / index] + [folder / s for s in shards], pickled
    for name, pickled in (("model.safetensors", False), ("pytorch_model.bin", True)):
        if (folder / name).is_file():
            return [folder / name], pickled
    return [], False


def config_files(folder: Path) -> list[Path]:
    """The files that fix the architecture (hashed to detect a changed folder)."""
    return [folder / "config.json"]


def build_hf(folder: Path, *, load_weights: bool = True, trust_pickle: bool = False,
             input_shape: tuple[int, ...] | None = None, seq_len: int | None = None,
             batch_size: int = 2, dtype: torch.dtype | None = None) -> LoadedModel:
    """Build the model a Hugging Face folder describes, offline.

    Args:
        folder: holds config.json and, usually, model.safetensors.
        load_weights: load the folder's weights; False gives a seeded random init (for --arch).
        trust_pickle: pass weights_only=False when reading pytorch_model.bin.
        input_shape: text: (batch, seq); vision: (batch, channels, height, width).
        seq_len: the example sequence length for text models (default 16).
        batch_size: the example batch size.
        dtype: the floating dtype weights are read into (default float32): never a float32 copy first.

    Returns:
        A LoadedModel in eval mode; inputs are keyword arguments.

    Raises:
        LoadError: unreadable config, unknown model type, weights that do not load.
        UnsafeFileError: pytorch_model.bin holds pickled objects and `trust_pickle` is false.
        UsageError: seq_len beyond the model's positions, or an input_shape of the wrong rank.
    """
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as e:
        raise LoadError(f"{folder / 'config.json'} is not a config transformers can read ({first_line(e)})") from e
    if getattr(config, "use_cache", False):
        # A KV cache adds past_key_values outputs that break tracing and export.
        config.use_cache = False
        if _is_decoder(config):
            log.info("%s: set use_cache=False (no KV cache during capture and export)", folder)
    arch = (getattr(config, "architectures", None) or [None])[0]
    auto = _auto_class(transformers, config.model_type, arch)
    files, pickled = weight_files(folder) if load_weights else ([], False)
    # trust_remote_code=False, not unset: unset, transformers asks on stdin and "y" runs the folder's code.
    common = {"attn_implementation": "eager", "dtype": dtype or torch.float32, "trust_remote_code": False}
    try:
        with seeded(), _no_progress_bars():
            if files:
                module, info = auto.from_pretrained(str(folder), config=config, local_files_only=True,
                                                    weights_only=not trust_pickle, output_loading_info=True,
                                                    **common)
                _log_loading_info(folder, info)
            else:
                if load_weights:
                    log.warning("%s has no model.safetensors or pytorch_model.bin: random initialisation "
                                "from config.json", folder)
                module = auto.from_config(config, **common)
    except Exception as e:
        names = unsafe_globals(e, files[-1] if files else None) or unsafe_globals(e.__cause__ or e)
        if names is not None:
            raise unsafe_error(files[-1], names) from None
        raise LoadError(f"transformers could not build {arch or config.model_type} from {folder} ({first_line(e)})") from e
    module.eval()
    kwargs, seq_inputs, task = _example_inputs(module, config, folder, input_shape, seq_len, batch_size)
    has_tok = any((folder / f).is_file() for f in TOKENIZER_FILES)
    if pickled and files:
        log.info("%s: read %s with weights_only=%s", folder, files[-1].name, not trust_pickle)
    return LoadedModel(module=module, example_kwargs=kwargs, seq_inputs=seq_inputs, task=task,
                       tokenizer_path=str(folder) if has_tok else None)


@contextlib.contextmanager
def _no_progress_bars():
    # The library never prints; transformers draws tqdm bars on stderr while loading weights.
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _is_decoder(config) -> bool:
    return bool(getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False)
                or any(a.endswith(("CausalLM", "LMHeadModel", "ConditionalGeneration"))
                       for a in getattr(config, "architectures", None) or []))


def _auto_class(transformers, model_type: str, arch: str | None):
    """The Auto class whose mapping gives `arch` for this model type; AutoModel otherwise."""
    if arch:
        names = ["AutoModel"] + sorted(n for n in dir(transformers) if n.startswith("AutoModelFor"))
        for name in names:
            auto = getattr(transformers, name, None)
            mapping = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", {})
            entry = mapping.get(model_type)
            if entry == arch or (isinstance(entry, (tuple, list)) and arch in entry):
                return auto
        log.warning("no Auto class maps %s to %s: using AutoModel (the bare model, no head)", model_type, arch)
    return transformers.AutoModel


def _log_loading_info(folder: Path, info: dict) -> None:
    missing = info.get("missing_keys") or []
    unexpected = info.get("unexpected_keys") or []
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        log.warning("%s: %d weights were not in the file and are randomly initialised (e.g. %s)",
                    folder, len(missing) + len(mismatched), ", ".join(list(missing)[:3]))
    if unexpected:
        log.info("%s: %d weights in the file were not used (e.g. %s)", folder, len(unexpected),
                 ", ".join(list(unexpected)[:3]))


def _example_inputs(module, config, folder: Path, input_shape, seq_len, batch_size):
    """input_ids/attention_mask (text) or pixel_values (vision), built from the config."""
    params = inspect.signature(module.forward).parameters
    gen = example_generator()
    image_size = getattr(config, "image_size", None)
    if image_size is not None and "pixel_values" in params:
        if input_shape is not None and len(input_shape) != 4:
            raise UsageError(f"--input-shape {input_shape} for {folder}: pixel_values needs 4 dims (batch x channels x height x width)")
        size = image_size if isinstance(image_size, (tuple, list)) else (image_size, image_size)
        shape = input_shape or (batch_size, getattr(config, "num_channels", 3), *size)
        return {"pixel_values": torch.randn(shape, generator=gen)}, (), "vision"
    vocab = getattr(config, "vocab_size", None)
    if vocab is None or "input_ids" not in params:
        raise LoadError(
            f"{folder}: cannot build example inputs for {type(module).__name__}: vcon-fx builds input_ids "
            "(text models with vocab_size) or pixel_values (vision models with image_size)"
        )
    if input_shape is not None:
        if len(input_shape) != 2:
            raise UsageError(f"--input-shape {input_shape} for {folder}: input_ids needs 2 dims (batch x sequence)")
        batch_size, seq_len = input_shape
    seq_len = seq_len or DEFAULT_SEQ_LEN
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_pos is not None and seq_len > max_pos:
        raise UsageError(f"--seq-len {seq_len} exceeds {folder}'s {max_pos} positions: use at most {max_pos}")
    shape = (batch_size, seq_len)
    kwargs = {"input_ids": torch.randint(0, vocab, shape, generator=gen),
              "attention_mask": torch.ones(shape, dtype=torch.long)}
    if "token_type_ids" in params and getattr(config, "type_vocab_size", 0):
        kwargs["token_type_ids"] = torch.zeros(shape, dtype=torch.long)
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        start = getattr(config, "decoder_start_token_id", None)
        start = getattr(config, "pad_token_id", 0) if start is None else start
        dec = torch.randint(0, vocab, shape, generator=gen)
        dec[:, 0] = start or 0
        kwargs["decoder_input_ids"] = dec
    return kwargs, tuple(kwargs), "text"


@register_source
class HfSource(SourceKind):
    """A Hugging Face model folder (config.json + weights), loaded offline."""

    name, form = "hf", "folder"
    keys = ("path", "sha256", "weights", "weights_sha256")

    def recognises(self, request: SourceRequest) -> bool:
        return is_hf_folder(request.path)

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        path = request.path
        request.refuse("arch", "a Hugging Face folder names its architecture in config.json")
        lm = build_hf(path, load_weights=request.weights is None, trust_pickle=request.trust_pickle, dtype=request.dtype,
                      **request.inputs)
        files = config_files(path) + ([] if request.weights is not None else weight_files(path)[0])
        spec = {"path": str(path), "sha256": request.hash_many(files)}
        return lm, {**spec, **request.load_weights(lm, path)}
