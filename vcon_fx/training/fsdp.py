"""FSDP2 for models one device cannot hold through the transition: a sharded training copy.

    copy = sharded_copy(vm, device)     # every Blend is a fully_shard unit, then the root
    … train `copy` (β is set on its Blend modules as usual) …
    gather_into(copy, vm)               # vm holds the trained weights and β again, on every rank

The copy is made by `copy.deepcopy` with the parameters aliased (no tensor is copied), then
`fully_shard` gives each rank its chunk of every parameter; the full tensors stay with `vm` on
the host (where torchrun's ranks loaded them) and never reach the device whole, except one
Blend (a dense layer and its twin) at a time while fully_shard moves and chunks it. β stays a
plain buffer, replicated on every rank: FSDP shards parameters, never buffers, so schedules
set it exactly as without FSDP. A failed run leaves `vm` untouched (it is only written to at the
end, by `gather_into`).

Blend modules are the units because their two branches run together, and the forward hooks
that measure the dense–compressed gap (registered ahead of FSDP's own, see `evaluate.GapProbe`)
run inside the unit's forward, while its parameters are whole. `--match-groups` is refused:
its hook runs the twin once more with gradients, outside the autograd edges FSDP reduces.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ConfigError
from ..graph.blend import blend_modules, get_betas, set_beta

__all__ = ["sharded_copy", "gather_into", "check_fsdp_settings", "is_sharded"]


def check_fsdp_settings(world: int, match_groups: float) -> None:
    """Refuse FSDP where it cannot run (pure).

    Raises:
        ConfigError: one process (nothing to shard across), or `match_groups` > 0.
    """
    if world < 2:
        raise ConfigError("--fsdp shards the model across processes, but this is a single process: launch it with "
                          "`torchrun --nproc-per-node N … finetune … --fsdp` (N ≥ 2), or drop --fsdp")
    if match_groups > 0:
        raise ConfigError("--match-groups cannot run under --fsdp (it trains each twin in a forward hook, whose "
                          "gradients FSDP does not reduce): drop --match-groups (--distill works), or drop --fsdp "
                          "to train with DDP")


def sharded_copy(vm: nn.Module, device: torch.device) -> nn.Module:
    """A copy of `vm` whose parameters are sharded over the process group (pure on `vm`).

    Args:
        vm: the blended model, whole on every rank.
        device: this rank's device (the mesh is of its type: gloo on CPU, nccl on GPU).

    Returns:
        The copy, with every Blend and then the root passed to `fully_shard`.
    """
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # Aliases, not copies: fully_shard keeps only each rank's chunk and lets the full tensor go.
    memo = {id(p): nn.Parameter(p.detach() if p.is_contiguous() else p.detach().contiguous(),
                                requires_grad=p.requires_grad) for p in vm.parameters()}
    twin = copy.deepcopy(vm, memo)
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    for blend in blend_modules(twin).values():
        fully_shard(blend, mesh=mesh)
    # The root reshards after every forward too (FSDP's default keeps it whole until the backward):
    # the forwards without a backward (probes, evaluation) would otherwise leave its whole weights
    # registered, where the optimizer and `gather_into` expect the sharded ones.
    fully_shard(twin, mesh=mesh, reshard_after_forward=True)
    return twin


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` went through `fully_shard` (pure)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@torch.no_grad()
def gather_into(sharded: nn.Module, vm: nn.Module) -> None:
    """Copy the full parameters, buffers and β of `sharded` into `vm` (in place on `vm`).

    Collective: every rank calls it, in the same order; one parameter is whole on the device at a time.
    """
    from torch.distributed.tensor import DTensor

    mine = dict(vm.named_parameters())
    for name, param in sharded.named_parameters():
        full = param.full_tensor() if isinstance(param, DTensor) else param
        mine[name].copy_(full.to(mine[name].device))
    theirs = dict(sharded.named_buffers())
    for name, buffer in vm.named_buffers():
        buffer.copy_(theirs[name].to(buffer.device))
    set_beta(vm, get_betas(sharded))  # the Python mirror of β, and the dense gradients a β of 0 drops
