"""Fine-tuning under torchrun: the process group, the device of each rank, DDP or FSDP.

torchrun describes the run in environment variables (WORLD_SIZE, LOCAL_RANK, …); a plain
`python` run has none and is a world of one, where every collective below is the identity, so
the training loop is written once for both. The group is joined with gloo on CPU and nccl on
GPU, and left again only by the code that joined it: a caller that set up its own process group
keeps it.

DDP (a whole replica per rank) is the default. With `fsdp` the ranks train a copy of the model
whose parameters are sharded with FSDP2's `fully_shard` (`fsdp.py`), for models that one device
cannot hold, dense branch and twin together, with gradients and Adam's state.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Distributed"]


class Distributed:
    """Joins the process group torchrun describes (and leaves it if it joined it)."""

    def __init__(self, device, *, fsdp: bool = False):
        self.requested = torch.device(device)
        self.created = False
        self.rank, self.world = 0, 1
        self.sharded = fsdp  # FSDP2 instead of DDP (`check_sharding` refuses it in one process)

    def __enter__(self) -> "Distributed":
        import torch.distributed as tdist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.enabled = (tdist.is_available() and tdist.is_initialized()) or world > 1
        device = self.requested
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device} was asked for, but this PyTorch sees no CUDA GPU: use device 'cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.enabled and not tdist.is_initialized():
            tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.created = True
        if self.enabled:
            self.rank, self.world = tdist.get_rank(), tdist.get_world_size()
            self.comm = device if tdist.get_backend() == "nccl" else torch.device("cpu")
        return self

    def check_sharding(self, match_groups: float) -> None:
        """Refuse `fsdp` where it cannot run (one process, `match_groups`); see `fsdp.check_fsdp_settings`."""
        if self.sharded:
            from .fsdp import check_fsdp_settings

            check_fsdp_settings(self.world, match_groups)

    def __exit__(self, *exc) -> None:
        if self.created:
            import torch.distributed as tdist

            tdist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def place(self, vm: nn.Module) -> nn.Module:
        """The model the ranks train: `vm` on this rank's device, or (fsdp) a sharded copy of it.

        The sharded copy leaves `vm` where it is; `finish` writes the trained weights back into it.
        """
        if not self.sharded:
            return vm.to(self.device)
        from .fsdp import sharded_copy

        return sharded_copy(vm, self.device)

    def finish(self, model: nn.Module, vm: nn.Module) -> None:
        """After training: `vm` holds `model`'s weights and β (collective under fsdp; nothing to do otherwise)."""
        if model is not vm:
            from .fsdp import gather_into

            gather_into(model, vm)

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in one process or sharded (FSDP runs in its own hooks); else `model` in DistributedDataParallel."""
        if self.world == 1 or self.sharded:
            return model
        from torch.nn.parallel import DistributedDataParallel

        # Blend skips a branch at β = 0 or 1, so the set of used parameters changes with β.
        return DistributedDataParallel(model, device_ids=[self.device] if self.device.type == "cuda" else None,
                                       find_unused_parameters=True)

    def sum(self, values: list[float]) -> list[float]:
        """Sum of `values` over ranks (identity in one process)."""
        if self.world == 1:
            return values
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        tdist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        """Wait for every rank (nothing in one process)."""
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()

    def share(self, text: str) -> str:
        """Rank 0's `text`, on every rank (the name of a folder rank 0 made, say)."""
        if self.world == 1:
            return text
        import torch.distributed as tdist

        box = [text]
        tdist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, values: list[float]) -> list[list[float]]:
        if self.world == 1:
            return [values]
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        out = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(out, t)
        return [o.tolist() for o in out]
