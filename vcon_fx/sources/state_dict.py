"""A state dict (.safetensors, .pt, .pth, .bin, .ckpt) plus `arch`: torchvision:NAME or a Hugging Face folder.

The architecture is built with a seeded random init, then the weights are loaded strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import LoadError
from .base import ARCH_HINT, STATE_DICT_SUFFIXES, LoadedModel, is_state_dict, load_weights_into
from .hf import build_hf, config_files, is_hf_folder
from .registry import SourceKind, register_source
from .request import SourceRequest
from .tv import TV_PREFIX, build_torchvision

__all__ = ["StateDictSource"]


@register_source
class StateDictSource(SourceKind):
    """Weights only: the architecture comes from `arch`."""

    name, form, suffixes = "state_dict", "file", (".safetensors", *STATE_DICT_SUFFIXES)
    keys, required = ("path", "sha256", "arch", "arch_sha256"), ("path", "arch")

    def recognises(self, request: SourceRequest) -> bool:
        return is_state_dict(request.content)

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        path, state = request.path, request.content
        if request.arch is None:
            raise LoadError(f"{path} is a state dict (weights only, {len(state)} tensors) with no architecture: "
                            f"{ARCH_HINT}")
        lm, arch_spec = _build_arch(request)
        load_weights_into(lm.module, state, f"{path} into {request.arch}")
        return lm, {"path": str(path), "sha256": request.hash(path), **arch_spec}

    def recorded_files(self, spec: Mapping[str, Any]) -> list[tuple[str, str | None]]:
        arch = spec.get("arch")
        named = not arch or str(arch).startswith(TV_PREFIX)
        return super().recorded_files(spec) + ([] if named else [(arch, None)])


def _build_arch(request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
    """A randomly initialised architecture for a state dict, and the spec keys naming it."""
    arch = request.arch
    if arch.startswith(TV_PREFIX):
        lm = build_torchvision(arch[len(TV_PREFIX):], input_shape=request.input_shape, batch_size=request.batch_size)
        return lm, {"arch": arch, "arch_sha256": None}
    folder = Path(arch).expanduser()
    if not is_hf_folder(folder):
        raise LoadError(f"--arch {arch!r} is neither torchvision:NAME nor a Hugging Face folder with config.json: "
                        f"{ARCH_HINT}")
    folder = folder.resolve()
    lm = build_hf(folder, load_weights=False, trust_pickle=request.trust_pickle, **request.inputs)
    return lm, {"arch": str(folder), "arch_sha256": request.hash_many(config_files(folder))}
