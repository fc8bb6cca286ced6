"""The demo's task and model: scikit-learn's handwritten digits and a tiny vision transformer.

The digits (1797 images, 8×8, 16 grey levels, 10 classes; bundled with scikit-learn, no
download) are split once, stratified, into a fixed train and test set, so every seed and every
method is measured on the same test images.

`TinyViT` cuts an image into 2×2 patches (16 tokens), embeds them, runs `depth` pre-norm
transformer blocks (attention: `qkv` + `proj`; MLP: `fc1` + `fc2`) and classifies the mean
token. Everything is plain `nn.Linear` / `nn.LayerNorm` and tensor methods, so torch.fx
traces it and the ONNX exporter handles it. vcon-fx's default selection then compresses every
Linear inside the blocks and leaves the patch embedding (stem) and the classifier (head)
dense, which is the paper's ViT setting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["TinyViT", "DigitsData", "load_digits_data", "pretrain", "accuracy", "example_inputs"]

IMAGE = 8          # the digits are 8×8
CLASSES = 10
TEST_SIZE = 360    # ~20% of the 1797 images
SPLIT_SEED = 0     # the split is fixed: seeds vary the model and the training, not the test set


class Attention(nn.Module):
    """Multi-head self-attention from one `qkv` Linear and one `proj` Linear."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, d = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).reshape(-1, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)  # softmax(q·kᵀ/√d)
        return self.proj((attn @ v).transpose(1, 2).reshape(-1, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    """A vision transformer for 8×8 one-channel images, input (N, 1, 8, 8), output (N, classes) logits.

    Args:
        patch: patch side (2 → 16 tokens of 4 pixels).
        dim: token width.
        depth: transformer blocks.
        heads: attention heads.
        hidden: MLP width.
        classes: output classes.

    Example:
        >>> TinyViT()(torch.zeros(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(self, patch: int = 2, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128,
                 classes: int = CLASSES):
        super().__init__()
        if IMAGE % patch:
            raise ValueError(f"patch {patch} does not divide the image side {IMAGE}")
        self.patch = patch
        self.grid = IMAGE // patch
        tokens = self.grid ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        g, p = self.grid, self.patch
        # (N, 1, 8, 8) → (N, tokens, p·p): row-major patches
        x = x.reshape(-1, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(-1, g * g, p * p)
        x = self.blocks(self.embed(x) + self.pos)
        return self.head(self.norm(x).mean(1))


class DigitsData:
    """The fixed split: `train` and `test` are TensorDatasets of (image (1, 8, 8) in [0, 1], label)."""

    def __init__(self, train: TensorDataset, test: TensorDataset):
        self.train = train
        self.test = test

    def __repr__(self) -> str:
        return f"DigitsData(train={len(self.train)}, test={len(self.test)})"


class _LabelledTensors(TensorDataset):
    """A TensorDataset that exposes its labels, so `finetune` checks them without reading images."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        super().__init__(images, labels)
        self.labels = labels


def load_digits_data(test_size: int = TEST_SIZE) -> DigitsData:
    """scikit-learn's digits, split once (stratified, fixed seed) into train and test (pure).

    Raises:
        ImportError: scikit-learn is not installed (`pip install 'vcon-fx[demo]'`).
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the demo needs scikit-learn: pip install 'vcon-fx[demo]'") from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(range(len(labels)), test_size=test_size, random_state=SPLIT_SEED,
                                           stratify=digits.target)
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    return DigitsData(_LabelledTensors(images[train_idx], labels[train_idx]),
                      _LabelledTensors(images[test_idx], labels[test_idx]))


def example_inputs(batch: int = 2) -> tuple[torch.Tensor]:
    """Example inputs for capture and export: `batch` blank images."""
    return (torch.zeros(batch, 1, IMAGE, IMAGE),)


def pretrain(model: nn.Module, train: TensorDataset, *, steps: int, lr: float = 3e-3, batch_size: int = 64,
             weight_decay: float = 0.05, seed: int = 0) -> list[float]:
    """Train the dense model from scratch with AdamW and a one-cycle learning rate (in place).

    Returns:
        The loss of every step.
    """
    images, labels = train.tensors
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 10)

    def factor(t: int) -> float:  # linear warm-up, then cosine to zero
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (t - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    losses = []
    order = torch.randperm(len(labels), generator=gen)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(labels), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `data` (model run in eval mode; its mode is restored)."""
    was = model.training
    model.eval()
    images, labels = data.tensors
    correct = 0
    for lo in range(0, len(labels), batch_size):
        correct += int((model(images[lo:lo + batch_size]).argmax(-1) == labels[lo:lo + batch_size]).sum())
    model.train(was)
    return correct / len(labels)
