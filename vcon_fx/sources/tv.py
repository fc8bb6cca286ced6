"""Build a torchvision model by name (`torchvision:resnet18`), randomly initialised, never downloaded.

Weights, when wanted, come from a local state dict (`weights=`), loaded by the caller.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from typing import Any, Mapping

import torch

from ..errors import LoadError, UsageError
from .base import LoadedModel, example_generator, seeded
from .registry import SourceKind, register_source
from .request import SourceRequest

__all__ = ["build_torchvision", "torchvision_names", "TorchvisionSource", "TV_PREFIX"]

TV_PREFIX = "torchvision:"

log = logging.getLogger(__name__)

# Per-model input sizes (C, H, W) or (C, T, H, W) where 224×224 images do not fit.
_IMAGE_SIZE = {"inception_v3": 299}
_VIDEO_SHAPE = {"mvit_v1_b": (3, 16, 224, 224), "mvit_v2_s": (3, 16, 224, 224), "s3d": (3, 16, 224, 224)}
_VIDEO_DEFAULT = (3, 16, 112, 112)


def torchvision_names() -> dict[str, str]:
    """Map every torchvision model name to its family (classification, segmentation, ...)."""
    from torchvision import models

    families = {
        "classification": models,
        "segmentation": models.segmentation,
        "video": models.video,
        "detection": models.detection,
        "optical_flow": models.optical_flow,
        "quantization": models.quantization,
    }
    out: dict[str, str] = {}
    for family, mod in families.items():
        for name in models.list_models(module=mod):
            out.setdefault(name, family)
    return out


def build_torchvision(name: str, *, input_shape: tuple[int, ...] | None = None, batch_size: int = 2) -> LoadedModel:
    """Build `torchvision.models.get_model(name, weights=None)` with a seeded random init.

    Args:
        name: a torchvision model name, e.g. "resnet18".
        input_shape: the full example input shape (batch first); default from the model.
        batch_size: the batch of the default example input.

    Returns:
        A LoadedModel in eval mode with one positional image (or video) input.

    Raises:
        LoadError: the name is unknown, or names a family vcon-fx does not handle.
    """
    from torchvision import models

    names = torchvision_names()
    family = names.get(name)
    if family is None:
        close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models.list_models()"
        raise LoadError(f"torchvision has no model named {name!r}: {hint}")
    if family in ("detection", "optical_flow", "quantization"):
        raise LoadError(
            f"torchvision:{name} is a {family} model, which vcon-fx does not handle (it takes lists of "
            "images or is already quantized): use a classification, segmentation or video model"
        )
    # weights=None is random init; segmentation builders would still download an ImageNet
    # backbone unless weights_backbone=None too.
    kwargs: dict = {"weights": None}
    if "weights_backbone" in inspect.signature(models.get_model_builder(name)).parameters:
        kwargs["weights_backbone"] = None
    with seeded():
        try:
            module = models.get_model(name, **kwargs)
        except Exception as e:
            raise LoadError(f"torchvision could not build {name!r} ({type(e).__name__}: {e})") from e
    module.eval()
    if input_shape is None:
        input_shape = _default_shape(name, family, module, batch_size)
    elif len(input_shape) < 2:
        raise UsageError(f"--input-shape {input_shape} is too short for torchvision:{name}: give batch first, e.g. 1x3x224x224")
    x = torch.randn(input_shape, generator=example_generator())
    return LoadedModel(module=module, example_args=(x,), task="vision")


def _default_shape(name: str, family: str, module: torch.nn.Module, batch_size: int) -> tuple[int, ...]:
    if family == "video":
        return (batch_size, *_VIDEO_SHAPE.get(name, _VIDEO_DEFAULT))
    # ViT and friends fix their input size at construction; they store it as image_size.
    size = int(getattr(module, "image_size", _IMAGE_SIZE.get(name, 224)))
    return (batch_size, 3, size, size)


@register_source
class TorchvisionSource(SourceKind):
    """`torchvision:NAME`: a torchvision architecture, randomly initialised, with optional local `weights=`."""

    name, form = "torchvision", "name"
    keys, required = ("name", "weights", "weights_sha256"), ("name",)

    def recognises(self, request: SourceRequest) -> bool:
        return isinstance(request.source, str) and request.source.startswith(TV_PREFIX)

    def load(self, request: SourceRequest) -> tuple[LoadedModel, dict[str, Any]]:
        request.refuse("arch", "it names its architecture already")
        name = request.text[len(TV_PREFIX):]
        lm = build_torchvision(name, input_shape=request.input_shape, batch_size=request.batch_size)
        return lm, {"name": name, **request.load_weights(lm, f"torchvision:{name}")}

    def source_of(self, spec: Mapping[str, Any]) -> str:
        return TV_PREFIX + spec["name"]
