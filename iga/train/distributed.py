"""Data-parallel training over torch.distributed (started by torchrun): each rank's share of the global
batch and the few collectives the methods need.

Every rank computes the *global* losses (its own token sums over the sums of all ranks' token counts),
and its backward pass gives it its share of the global gradient: the shares of all ranks add up to the
single process's gradient on the same global batch. The trainer sums them with one all-reduce of the
flat LoRA gradient per step, as DDP does. Rules that need the global per-domain gradients (IGA, the
masks, PCGrad, Pareto-GS) instead reduce each module's per-domain gradients to the one rank that owns
the module, run there, and leave their result as that rank's share (zero elsewhere).

The single process is `World()`: no communication, and every method here returns its input, so its
arithmetic is unchanged bit for bit.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from iga.errors import ConfigError


class _SumOverRanks(torch.autograd.Function):
    """Forward: the sum over ranks. Backward: the gradient flows to this rank's own input unchanged
    (each rank then backpropagates the global loss into its own rows only)."""

    @staticmethod
    def forward(ctx: object, t: Tensor) -> Tensor:
        total = t.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        return grad


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_size: int = 1  # ranks on this machine (they share its cores)

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, writes checkpoints and outputs."""
        return self.rank == 0

    def sum(self, t: Tensor) -> Tensor:
        """`t` summed over ranks, differentiable into this rank's own `t` (see `_SumOverRanks`)."""
        return t if self.size == 1 else _SumOverRanks.apply(t)

    def owner(self, index: int) -> int:
        """The rank that runs a gradient rule for module `index`: round-robin, so each owns ~1/size."""
        return index % self.size

    def reduce_to(self, t: Tensor, owner: int) -> Tensor | None:
        """The sum over ranks of `t`, delivered to `owner` (None on the other ranks)."""
        if self.size == 1:
            return t
        t = t.contiguous()
        dist.reduce(t, dst=owner)
        return t if self.rank == owner else None

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Every parameter's .grad summed over ranks in place, in one collective (a missing .grad is 0)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([p.numel() for p in params])):
            p.grad = chunk.view_as(p).to(p.dtype)

    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Rank 0's parameter values on every rank (as DDP does at construction)."""
        if self.size == 1:
            return
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for p, chunk in zip(params, flat.split([p.numel() for p in params])):
                p.copy_(chunk.view_as(p))

    def share(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank: e.g. its checkpoint, which other machines cannot read."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard(self, items: list, what: str = "train.groups_per_batch") -> list:
        """This rank's equal share of a global batch's `items`."""
        if len(items) % self.size:
            raise ConfigError(f"{what} = {len(items)} does not divide evenly among {self.size} ranks: the global "
                              "batch must be a multiple of the number of ranks")
        k = len(items) // self.size
        return items[self.rank * k:(self.rank + 1) * k]


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def join(device: torch.device, timeout_s: float) -> World:
    """The world torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, ...), its process group joined once per
    process: gloo on CPU, nccl on CUDA, each rank on its own GPU. A collective that waits longer than
    `timeout_s` (a rank died or hangs) raises instead of hanging. Outside torchrun: World()."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ["LOCAL_RANK"])
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        atexit.register(dist.destroy_process_group)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", size)))
