"""How much memory a plan needs: transform's peak, and one training step's (`vcon-fx inspect` prints both).

A pure estimate from the plan, counting tensors, not measuring anything:

- the dense model: every parameter and buffer of the captured graph, in its own dtype;
- the twins: low-rank factors (`params_after` of each layer, in the model's dtype); a prune or
  quant twin shares the dense weight (methods/twin.py) and adds nothing, unless
  `separate_weights` gives it a copy; a fixed prune mask adds one byte per weight;
- transform's work space: the largest compressed layer, twice, in float32 (the SVD's or the
  rounding's working copies), one layer at a time (duplicate builds the twins layer by layer);
- one training step: the model after transform, plus a gradient for every trainable parameter
  and Adam's two moments for each, all in the parameter's dtype (torch's Adam keeps its state in
  the dtype of the parameter: bf16 parameters have bf16 moments).

Activations are excluded: they depend on the batch and sequence length, not on the plan. The
estimate is checked against the tensors one real step holds (tests/test_memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.base import method_for
from ..methods.twin import WeightTwinMethod

__all__ = ["MemoryEstimate", "memory_estimate"]

ADAM_STATES = 2  # exp_avg and exp_avg_sq
WORKSPACE_COPIES = 2  # a layer's float32 working copies while its twin is built


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a plan needs; `transform` and `step` are the two peaks, activations excluded.

    Attributes:
        dense: the model as loaded (parameters and buffers).
        twins: what the compressed twins add.
        workspace: transform's transient copies of its largest layer.
        gradients: one gradient per trainable parameter.
        adam: Adam's two moments per trainable parameter.
    """

    dense: int
    twins: int
    workspace: int
    gradients: int
    adam: int

    @property
    def transform(self) -> int:
        return self.dense + self.twins + self.workspace

    @property
    def step(self) -> int:
        return self.dense + self.twins + self.gradients + self.adam


def memory_estimate(compression_plan, *, freeze_dense: bool = False) -> MemoryEstimate:
    """The memory `transform` and one fine-tuning step of this plan need (pure).

    Args:
        compression_plan: a `CompressionPlan` from `plan` (its captured graph gives the dtypes).
        freeze_dense: the dense branch does not train (`--freeze-dense`): no gradients or Adam
            state for it, except the weights a shared twin trains.

    Returns:
        A MemoryEstimate, in bytes.
    """
    gm = compression_plan.extra["gm"]
    params = {id(p): p for p in gm.parameters()}.values()
    dense = sum(_bytes(p) for p in params) + sum(_bytes(b) for b in gm.buffers())
    item = next((p.element_size() for p in params if p.is_floating_point()), 4)
    config = compression_plan.config
    method = method_for(config)
    weight_twin = isinstance(method, WeightTwinMethod)
    shares = weight_twin and method.share_dense_weights()
    done = [pl for pl in compression_plan.plans.values() if not pl.skipped]
    twin_params = 0 if shares else sum(pl.params_before if weight_twin else pl.params_after for pl in done)
    masks = sum(pl.params_before for pl in done) if getattr(config, "fixed_mask", False) else 0
    largest = max((pl.params_before for pl in done), default=0)
    trainable = twin_params + (0 if freeze_dense and not shares else sum(p.numel() for p in params if p.requires_grad))
    if freeze_dense and shares:  # only the twins' latent weights (the dense layers' own) train
        trainable = sum(pl.params_before for pl in done)
    return MemoryEstimate(dense=dense, twins=twin_params * item + masks,
                          workspace=WORKSPACE_COPIES * largest * torch.float32.itemsize,
                          gradients=trainable * item, adam=ADAM_STATES * trainable * item)


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
