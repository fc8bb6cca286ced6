"""Image folders: one sub-folder per class, resized and normalised as the model's input expects."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .registry import ReadRequest, accepted, register_reader

__all__ = ["read_image_folder", "image_transform", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_IMAGE_SIZE"]

# torchvision's ImageNet statistics: what torchvision and most Hugging Face vision models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


@register_reader("image folder", describes="an image folder (one sub-folder per class)",
                 recognises=lambda path, task: path.is_dir(), catch_all=True)
def read_image_folder(request: ReadRequest) -> Dataset:
    """A folder of class sub-folders, read with torchvision's ImageFolder, resized to the model's input."""
    from torchvision import datasets

    path = request.path
    transform, keyword = image_transform(path, request.spec)
    try:
        ds = datasets.ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataError(f"{path} is a folder without images in class sub-folders ({str(e).splitlines()[0][:120]}): "
                        f"{accepted()}") from None
    if keyword is not None:
        return _Keyword(ds, keyword)
    return ds


def image_transform(path, spec: Mapping[str, Any]) -> tuple[Callable, str | None]:
    """PIL image → the tensor the model takes (resized, 1 or 3 channels, normalised), and its keyword (pure).

    Args:
        path: the data, for error messages.
        spec: the recipe's example-input spec; without one, 3×224×224.

    Returns:
        (transform, "pixel_values" when the model takes the image as that keyword input, else None).

    Raises:
        DataError: the model does not take images (N×C×H×W with 1 or 3 channels).
    """
    from torchvision import transforms

    args = list(spec.get("args") or [])
    pixel = (spec.get("kwargs") or {}).get("pixel_values")
    shape = args[0]["shape"] if len(args) == 1 else pixel["shape"] if pixel else None
    if shape is not None and len(shape) != 4:
        raise DataError(f"{path} holds images but the model takes inputs of shape {'×'.join(map(str, shape))}, "
                        "not images (N×C×H×W): give a tensor file instead")
    channels, height, width = (shape[1], shape[2], shape[3]) if shape else (3, DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE)
    if channels not in (1, 3):
        raise DataError(f"{path}: the model takes {channels}-channel images; images give 1 or 3 channels: "
                        "give a tensor file instead")
    steps = [transforms.Resize((height, width))]
    if channels == 1:
        steps.append(transforms.Grayscale(1))
    steps.append(transforms.ToTensor())
    if channels == 3:
        steps.append(transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return transforms.Compose(steps), "pixel_values" if pixel is not None else None


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
