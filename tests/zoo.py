"""The test zoo: small models every invariant is checked on.

Each factory returns a `ZooCase`: the model in eval mode, its example inputs, and the names of
inputs with a sequence axis. Factories seed the RNG, so a case is the same on every call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ZooCase", "ZOO", "SLOW", "make", "MLP", "ConvBNReLU", "ResidualNet", "SharedLinear", "FunctionalLinear",
           "UNet", "VideoNet", "LSTMLanguageModel", "RecurrentTagger"]


@dataclass
class ZooCase:
    name: str
    model: nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    seq_inputs: tuple[str, ...] = ()

    def __iter__(self):  # (name, model, args, kwargs, seq_inputs)
        return iter((self.name, self.model, self.args, self.kwargs, self.seq_inputs))

    def inputs(self, batch: int, seed: int = 1) -> tuple[tuple, dict]:
        """Fresh inputs like the example ones, at another batch size."""
        gen = torch.Generator().manual_seed(seed)

        def like(t: torch.Tensor) -> torch.Tensor:
            shape = (batch, *t.shape[1:])
            if t.is_floating_point():
                return torch.randn(shape, generator=gen, dtype=t.dtype)
            if t.numel() and int(t.min()) == 1 and int(t.max()) == 1:  # masks of ones
                return torch.ones(shape, dtype=t.dtype)
            high = int(t.max()) + 1 if t.numel() else 2
            return torch.randint(0, max(high, 2), shape, generator=gen, dtype=t.dtype)

        return tuple(like(a) for a in self.args), {k: like(v) for k, v in self.kwargs.items()}


# ── hand-written models ────────────────────────────────────────────────────────────────────


class MLP(nn.Module):
    """Stem → three hidden layers → head: the middle three are selected by default."""

    def __init__(self, d_in: int = 16, hidden: int = 64, d_out: int = 4, dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Linear(d_in, hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.fc1(x))
        x = self.drop(F.relu(self.fc2(x)))
        x = F.relu(self.fc3(x))
        return self.head(x)


class ConvBNReLU(nn.Module):
    """Conv-BN-ReLU ×3 then pooling and a Linear head."""

    def __init__(self, width: int = 32, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.body(x)
        return self.head(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    """conv → bn → relu → conv → bn, plus the identity, then relu."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class ResidualNet(nn.Module):
    """Stem, two residual blocks (`layer1.0`, `layer1.1`), pooled Linear head."""

    def __init__(self, width: int = 32, classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(width), BasicBlock(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = self.layer1(F.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class SharedLinear(nn.Module):
    """Calls `shared` twice: one layer, one group (its two calls are tied)."""

    def __init__(self, d: int = 48):
        super().__init__()
        self.stem = nn.Linear(8, d)
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = torch.tanh(self.shared(x))
        return self.head(x)


class FunctionalLinear(nn.Module):
    """`F.linear` on its own parameters (no nn.Linear module): normalize must lift it."""

    def __init__(self, d: int = 48):
        super().__init__()
        self.stem = nn.Linear(8, d)
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.bias = nn.Parameter(torch.randn(d) * 0.1)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(F.linear(x, self.weight, self.bias))
        return self.head(x)


class UNet(nn.Module):
    """A two-level U-Net from torchvision blocks: Conv2dNormActivation pairs, max-pool down,
    ConvTranspose2d up, skip connections concatenated, a 1×1 conv head (segmentation logits)."""

    def __init__(self, width: int = 8, classes: int = 3):
        super().__init__()
        from torchvision.ops import Conv2dNormActivation

        def pair(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(Conv2dNormActivation(cin, cout), Conv2dNormActivation(cout, cout))

        w = width
        self.enc1, self.enc2, self.bottom = pair(3, w), pair(w, 2 * w), pair(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, stride=2), pair(4 * w, 2 * w)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * w, w, 2, stride=2), pair(2 * w, w)
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class VideoNet(nn.Module):
    """Conv3d stem, a (2+1)-D pair (1×3×3 then 3×1×1) with BatchNorm3d, a strided Conv3d, a
    ConvTranspose3d back up, and a 1×1×1 Conv3d head: per-voxel logits of a short clip."""

    def __init__(self, width: int = 16, classes: int = 2):
        super().__init__()
        w = width
        self.stem = nn.Conv3d(3, w, 3, padding=1)
        self.spatial = nn.Conv3d(w, w, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.bn1 = nn.BatchNorm3d(w)
        self.temporal = nn.Conv3d(w, w, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.bn2 = nn.BatchNorm3d(w)
        self.down = nn.Conv3d(w, 2 * w, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose3d(2 * w, w, 2, stride=2)
        self.head = nn.Conv3d(w, classes, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.bn2(self.temporal(F.relu(self.bn1(self.spatial(x))))))
        return self.head(F.relu(self.up(F.relu(self.down(x)))) + x)


class LSTMLanguageModel(nn.Module):
    """Token embedding → 2-layer LSTM → Linear + tanh → vocabulary head (a word-level LM)."""

    def __init__(self, vocab: int = 120, dim: int = 32, hidden: int = 48):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, batch_first=True)
        self.proj = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids))
        return self.head(torch.tanh(self.proj(out)))


class RecurrentTagger(nn.Module):
    """Embedding → bidirectional GRU → ReLU RNN (time-major) → a tag per token: GRU and RNN, both directions."""

    def __init__(self, vocab: int = 80, dim: int = 24, hidden: int = 32, tags: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True, bidirectional=True)
        self.rnn = nn.RNN(2 * hidden, hidden, nonlinearity="relu")
        self.head = nn.Linear(hidden, tags)

    def forward(self, ids):
        out, _ = self.gru(self.embed(ids))
        out, _ = self.rnn(out.transpose(0, 1))
        return self.head(out.transpose(0, 1))


# ── factories ──────────────────────────────────────────────────────────────────────────────


def mlp() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("mlp", MLP().eval(), (torch.randn(4, 16),))


def conv_bn_relu() -> ZooCase:
    torch.manual_seed(0)
    model = ConvBNReLU()
    _randomize_bn(model)
    return ZooCase("conv_bn_relu", model.eval(), (torch.randn(2, 3, 16, 16),))


def residual() -> ZooCase:
    torch.manual_seed(0)
    model = ResidualNet()
    _randomize_bn(model)
    return ZooCase("residual", model.eval(), (torch.randn(2, 3, 16, 16),))


def shared_linear() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("shared_linear", SharedLinear().eval(), (torch.randn(4, 8),))


def functional_linear() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("functional_linear", FunctionalLinear().eval(), (torch.randn(4, 8),))


def resnet18() -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomize_bn(model)
    return ZooCase("resnet18", model.eval(), (torch.randn(2, 3, 64, 64),))


def mobilenet_v3_small() -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10)
    _randomize_bn(model)
    return ZooCase("mobilenet_v3_small", model.eval(), (torch.randn(2, 3, 64, 64),))


def vit_b_16() -> ZooCase:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(image_size=32, num_classes=10)
    return ZooCase("vit_b_16", model.eval(), (torch.randn(2, 3, 32, 32),))


def bert_tiny() -> ZooCase:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        vocab_size=100, attn_implementation="eager")
    model = BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    return ZooCase("bert_tiny", model, (), {"input_ids": ids, "attention_mask": mask},
                   ("input_ids", "attention_mask"))


def unet() -> ZooCase:
    torch.manual_seed(0)
    model = UNet()
    _randomize_bn(model)
    return ZooCase("unet", model.eval(), (torch.randn(2, 3, 16, 16),))


def video3d() -> ZooCase:
    torch.manual_seed(0)
    model = VideoNet()
    _randomize_bn(model)
    return ZooCase("video3d", model.eval(), (torch.randn(2, 3, 4, 16, 16),))


def lstm_lm() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("lstm_lm", LSTMLanguageModel().eval(), (), {"ids": torch.randint(0, 120, (2, 9))}, ("ids",))


def recurrent_tagger() -> ZooCase:
    torch.manual_seed(0)
    return ZooCase("recurrent_tagger", RecurrentTagger().eval(), (), {"ids": torch.randint(0, 80, (2, 9))}, ("ids",))


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics, so eval-mode BN is not the identity."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


ZOO: dict[str, Callable[[], ZooCase]] = {
    "mlp": mlp,
    "conv_bn_relu": conv_bn_relu,
    "residual": residual,
    "shared_linear": shared_linear,
    "functional_linear": functional_linear,
    "resnet18": resnet18,
    "mobilenet_v3_small": mobilenet_v3_small,
    "vit_b_16": vit_b_16,
    "bert_tiny": bert_tiny,
    "unet": unet,
    "video3d": video3d,
    "lstm_lm": lstm_lm,
    "recurrent_tagger": recurrent_tagger,
}

# Heavy cases (86M parameters): only under the `slow` marker.
SLOW = {"vit_b_16"}


def make(name: str) -> ZooCase:
    return ZOO[name]()
