"""Table columns of images (`datasets`' Image feature): decoded per example, shaped like image folders."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .images import image_transform
from .registry import ReadRequest

__all__ = ["ImageRows", "image_column", "IMAGE_COLUMNS"]

# Column names taken for the images when a table has several image columns.
IMAGE_COLUMNS = ("image", "img", "pixel_values", "picture")


def image_column(table, label_column: str | None, source: str) -> str | None:
    """The table's column of images (None when it has none).

    Raises:
        DataError: several image columns, none of them named like IMAGE_COLUMNS.
    """
    images = [c for c in table.column_names if c != label_column and type(table.features[c]).__name__ == "Image"]
    if len(images) <= 1:
        return images[0] if images else None
    named = [c for c in IMAGE_COLUMNS if c in images]
    if not named:
        raise DataError(f"{source}: columns {', '.join(images)} all hold images: rename the model's input "
                        f"column to '{IMAGE_COLUMNS[0]}'")
    return named[0]


class ImageRows(Dataset):
    """Images of a table column, decoded when an example is read and resized / normalised for the model.

    Items are `(x, y)`, `x`, or `{"pixel_values": x, "labels": y}` (keyword models), as image folders give.
    """

    def __init__(self, table, column: str, labels: torch.Tensor | None, request: ReadRequest, source: str):
        self.table, self.column, self.labels = table, column, labels
        self.transform, self.keyword = image_transform(source, request.spec)
        self.source = source

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int):
        image = self.table[int(i)][self.column]
        if image is None:
            raise DataError(f"{self.source}: column '{self.column}' has an empty cell (row {int(i) + 1}): fill or "
                            "drop that row")
        x = self.transform(image.convert("RGB"))  # as ImageFolder's loader: palette / alpha / grey → RGB first
        if self.keyword is not None:
            return {self.keyword: x} if self.labels is None else {self.keyword: x, "labels": self.labels[i]}
        return x if self.labels is None else (x, self.labels[i])
