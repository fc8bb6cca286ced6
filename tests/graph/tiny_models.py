"""Tiny models the graph-pass tests share: small enough to write their expected graphs by hand."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Chain", "Blocky", "Functional", "holder"]


class Chain(nn.Module):
    """stem → fc1 → relu → fc2 → head: by default fc1 and fc2 are compressed, one group each."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc1, self.fc2, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(self.stem(x)))))


class Blocky(nn.Module):
    """stem → block (Linear, ReLU, Linear) → head: `--blocks block` makes the block one group."""

    def __init__(self):
        super().__init__()
        self.stem, self.head = nn.Linear(4, 8), nn.Linear(8, 2)
        self.block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.head(self.block(self.stem(x)))


def holder(**params: torch.Tensor) -> nn.Module:
    """A bare module holding these parameters (as a functional layer keeps its weights)."""
    module = nn.Module()
    for name, value in params.items():
        module.register_parameter(name, nn.Parameter(value))
    return module


class Functional(nn.Module):
    """F.linear and F.conv2d on bare parameters."""

    def __init__(self):
        super().__init__()
        self.proj = holder(weight=torch.randn(4, 8), bias=torch.randn(4))
        self.conv = holder(weight=torch.randn(6, 3, 3, 3))

    def forward(self, x, img):
        return F.linear(x, self.proj.weight, self.proj.bias).relu(), F.conv2d(img, self.conv.weight, padding=1)
