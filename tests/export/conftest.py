"""Tiny models for the export and check tests, each exported once per session."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from vcon_fx.export.onnx import export_onnx


class MLP(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, width), nn.Linear(width, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class LowRankMLP(nn.Module):
    """The MLP with fc1 factored through rank 2: a smaller file, the same interface."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(8, 2, bias=False), nn.Linear(2, 256))
        self.fc2 = nn.Linear(256, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        return self.head(h.mean(dim=(2, 3)))


class DictOut(nn.Module):
    """Two outputs in a dict plus a nested tuple: names come from the keys."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 2)

    def forward(self, x):
        return {"scores": self.a(x), "aux": (self.b(x), x.sum(-1))}


class TextModel(nn.Module):
    """int64 ids and a mask as keyword inputs, an embedding, dropout (must be off in export)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 8)
        self.drop = nn.Dropout(0.5)
        self.proj = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask=None):
        h = self.drop(self.emb(input_ids)) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.proj(h.sum(1) / attention_mask.sum(1, keepdim=True).clamp(min=1))


def text_inputs(batch: int, seq: int) -> dict:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq // 2:] = 0  # some padding, so the mask matters
    return {"input_ids": torch.randint(0, 100, (batch, seq)), "attention_mask": mask}


@dataclass
class Case:
    """A model, how to call it at export and at another batch size, and its exported file."""

    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    other_args: tuple = ()
    other_kwargs: dict = field(default_factory=dict)
    seq_inputs: tuple = ()
    path: object = None


def _cases() -> dict:
    torch.manual_seed(0)
    text = TextModel()
    return {
        "mlp": Case(MLP(), (torch.randn(2, 8),), other_args=(torch.randn(5, 8),)),
        "conv": Case(ConvNet(), (torch.randn(2, 3, 8, 8),), other_args=(torch.randn(3, 3, 8, 8),)),
        "dict": Case(DictOut(), (torch.randn(1, 6),), other_args=(torch.randn(4, 6),)),
        "text": Case(text, (), text_inputs(2, 5), other_kwargs=text_inputs(3, 9),
                     seq_inputs=("input_ids", "attention_mask")),
    }


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """Name -> Case, each model exported once (dynamic batch, seq for text) for all tests."""
    folder = tmp_path_factory.mktemp("onnx")
    cases = _cases()
    for name, case in cases.items():
        case.model.train()  # export must switch to eval and back
        case.path = export_onnx(case.model, folder / f"{name}.onnx", case.args, example_kwargs=case.kwargs,
                                seq_inputs=case.seq_inputs)
    return cases


@pytest.fixture(scope="session")
def tiny():
    """The model classes and input makers, for tests that build their own (no conftest import)."""
    return SimpleNamespace(MLP=MLP, LowRankMLP=LowRankMLP, ConvNet=ConvNet, DictOut=DictOut,
                           TextModel=TextModel, text_inputs=text_inputs)
