"""Eval mode for a block of code, each module's own train/eval flag given back afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["eval_mode"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then give each its own flag back.

    Flags are set directly rather than through `.eval()`: a `torch.export` GraphModule refuses
    `.eval()`, and a model may mix modes on purpose (frozen batch norms).
    """
    flags = [(m, m.training) for m in model.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
