"""Image folders: one sub-folder per class, resized and normalised as the model's input expects."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .registry import ReadRequest, accepted, register_reader

__all__ = ["read_image_folder", "IMAGENET_MEAN", "IMAGENET_STD", "DEFAULT_IMAGE_SIZE"]

# torchvision's ImageNet statistics: what torchvision and most Hugging Face vision models expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224


@register_reader("image folder", describes="an image folder (one sub-folder per class)",
                 recognises=lambda path, task: path.is_dir(), catch_all=True)
def read_image_folder(request: ReadRequest) -> Dataset:
    """A folder of class sub-folders, read with torchvision's ImageFolder, resized to the model's input."""
    path, spec = request.path, request.spec
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
                        f"{accepted()}") from None
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
