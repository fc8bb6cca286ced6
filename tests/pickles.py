"""What the pickle-safety tests save: a small MLP, and a payload that runs a command when unpickled."""

from __future__ import annotations

import os

import torch
from torch import nn


class FourLayerMLP(nn.Module):
    """stem → fc1 → fc2 → head on 8 features: fc1 and fc2 are compressed by default."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 32)
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.fc1(x))
        return self.head(torch.relu(self.fc2(x)))


class Payload:
    """Unpickling this runs `os.system(command)`: the classic malicious checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class DigitsMLP(nn.Module):
    """8×8 digits (64 features) → 10 classes, with layers wide enough for `--rank 64` to compress."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(64, 256)
        self.fc1 = nn.Linear(256, 256)
        self.fc2 = nn.Linear(256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.fc1(x))
        return self.head(torch.relu(self.fc2(x)))
