"""Fine-tuning under torchrun: the process group, the device of each rank, and DDP.

torchrun describes the run in environment variables (WORLD_SIZE, LOCAL_RANK, …); a plain
`python` run has none and is a world of one, where every collective below is the identity, so
the training loop is written once for both. The group is joined with gloo on CPU and nccl on
GPU, and left again only by the code that joined it: a caller that set up its own process group
keeps it.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Distributed"]


class Distributed:
    """Joins the process group torchrun describes (and leaves it if it joined it)."""

    def __init__(self, device):
        self.requested = torch.device(device)
        self.created = False
        self.rank, self.world = 0, 1

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

    def __exit__(self, *exc) -> None:
        if self.created:
            import torch.distributed as tdist

            tdist.destroy_process_group()

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` in one process; across processes, `model` in DistributedDataParallel."""
        if self.world == 1:
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

    def gather(self, values: list[float]) -> list[list[float]]:
        if self.world == 1:
            return [values]
        import torch.distributed as tdist

        t = torch.tensor(values, dtype=torch.float64, device=self.comm)
        out = [torch.empty_like(t) for _ in range(self.world)]
        tdist.all_gather(out, t)
        return [o.tolist() for o in out]
