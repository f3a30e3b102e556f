"""Where this process sits in a data-parallel run, and the few collective helpers the loop needs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class RankContext:
    """Rank, world size and device of this process; one process on the CPU by default."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def current(cls, device: torch.device | str | None = None) -> RankContext:
        """From the initialised default process group (Ray Train, torchrun), else a single process."""
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size(), dev)
        return cls(device=dev)


def average_gradients(params: list[nn.Parameter], ctx: RankContext) -> None:
    """Mean of each parameter's gradient over the ranks (for modules trained outside DDP: the discriminator)."""
    if not ctx.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= ctx.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_objects(obj: object, ctx: RankContext) -> list[object]:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[object] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_over_ranks(values: dict[str, torch.Tensor], ctx: RankContext) -> dict[str, float]:
    """Scalar losses averaged over the ranks, as floats: one small all-reduce per step.

    Every rank then logs the same numbers and sees a NaN at the same iteration, so a stop for a non-finite
    loss happens on all ranks together instead of leaving some waiting in a collective.
    """
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    if ctx.distributed:
        dist.all_reduce(stacked)
        stacked /= ctx.world_size
    return dict(zip(values, stacked.tolist()))
