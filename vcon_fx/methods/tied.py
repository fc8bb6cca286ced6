"""Tied embeddings: an output head whose weight IS the input embedding's table stays tied.

A language model often computes its logits with the token embedding's table (`head.weight =
embed.weight`). Compressing the two separately would give two different tables: silently
untied, and stored twice. Instead the head's twin is a `TiedHead` over the embedding's own
twin, whatever the method made of it, so both read one compressed table:

    embedding twin           head twin (TiedHead)
    Embedding(n, r) → Linear(r → d)   logits = (h · U) · Aᵀ     (low-rank: the same A and U)
    a pruned / quantized table T      logits = h · Tᵀ           (the same mask, the same integers)

`tie_plans` rewrites the head's plan to say so: its weight is counted with the embedding (the
head keeps only its bias), and when the embedding stays dense the head does too, with the reason.
Selection (graph/select.py) keeps a tie only when both layers are selected, else refuses both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LayerPlan
from .layer_types import effective_weight

__all__ = ["TiedHead", "tie_plans", "tied_logits"]

_FLOAT_BYTES = 4


def tied_logits(table: nn.Module, h: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """h · Wᵀ (+ bias) with W the table `table` computes with (an embedding twin, or its deployed form).

    The product runs on 2-D rows (ONNX Gemm with transB), so the exporter never stores a
    transposed copy of the shared table beside it.
    """
    rows = h.reshape(-1, h.shape[-1])
    if isinstance(table, nn.Sequential) and hasattr(table, "down") and hasattr(table, "up"):  # Embedding → Linear
        rows = rows @ effective_weight(table.up)
        logits = F.linear(rows, effective_weight(table.down), bias)
    else:
        logits = F.linear(rows, effective_weight(table), bias)
    return logits.reshape(*h.shape[:-1], logits.shape[-1])


class TiedHead(nn.Module):
    """The twin of an output head tied to an embedding: logits from the embedding twin's table.

    Args:
        table: the embedding's twin (registered here too: one module, two places in the tree).
        head: the dense head (a Linear whose weight is the embedding's); only its bias is kept,
            shared with it when `share`, else copied.
    """

    def __init__(self, table: nn.Module, head: nn.Linear, *, share: bool, init: bool = True):
        super().__init__()
        self.table = table
        bias = head.bias
        if bias is not None and not share:
            bias = nn.Parameter(bias.detach().clone() if init else torch.empty_like(bias),
                                requires_grad=bias.requires_grad)
        self.bias = bias
        self.train(head.training)

    def forward(self, h):
        return tied_logits(self.table, h, self.bias)

    def extra_repr(self) -> str:
        return "logits from the tied embedding's compressed table"


def tie_plans(ties: dict[str, str], plans: dict[str, LayerPlan]) -> None:
    """Rewrite each tied head's plan (in place on `plans`): it computes with its embedding's
    compressed table, whose size the embedding's plan counts; it follows the embedding when
    that stays dense.

    Args:
        ties: head path → embedding path, both selected (graph/select.py).
    """
    for head, embedding in ties.items():
        if head not in plans or embedding not in plans:
            continue
        table, plan = plans[embedding], plans[head]
        own = plan.params_before - table.params_before  # the head's bias
        rank = table.detail.get("rank")
        positions = plan.flops_before // max(2 * table.params_before, 1)
        flops = 2 * rank * sum(table.shape) * positions if rank else plan.flops_before
        plan.params_before = plan.params_after = own
        plan.bytes_before = plan.bytes_after = own * _FLOAT_BYTES
        plan.flops_after = flops
        plan.detail = {**{k: v for k, v in table.detail.items() if not isinstance(v, dict)}, "tied_to": embedding,
                       "weights": f"tied: computes with {embedding}'s compressed table (counted there)"}
        plan.skip_reason = (None if not table.skipped else
                            f"tied to {embedding}, which stays dense ({table.skip_reason}): both stay dense, still tied")
