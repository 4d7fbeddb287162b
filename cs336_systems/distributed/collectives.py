"""The few collectives used outside the parallel strategies: checks that every rank holds the same
model, broadcasts, means and gathers of small values, and a barrier.

Each fails loudly on every rank rather than leaving some ranks waiting in a later collective.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

if TYPE_CHECKING:
    from cs336_systems.distributed.world import World


def require_process_group(what: str) -> None:
    """Raise a clear error when `what` is used without torch.distributed being initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{what} needs an initialised process group: call torch.distributed.init_process_group "
            "first (or launch through cs336_systems.distributed.launch / torchrun)"
        )


def check_same_parameters(module: nn.Module, what: str) -> None:
    """Raise on every rank if any rank's parameters or buffers differ (name, shape, dtype, requires_grad).

    Every rank gathers every rank's description, so all of them see the mismatch and raise the
    same error; checking on rank 0 alone would leave the others waiting in the next collective.
    """
    local = [(name, tuple(t.shape), str(t.dtype), t.requires_grad)
             for name, t in [*module.named_parameters(), *module.named_buffers()]]
    gathered = gather_from_ranks(local)
    for rank, theirs in enumerate(gathered):
        if theirs != gathered[0]:
            raise ValueError(
                f"{what}: rank {rank}'s module differs from rank 0's: {_first_difference(gathered[0], theirs)}; "
                "every rank must build the same model"
            )


def _first_difference(ours: list, theirs: list) -> str:
    for a, b in zip(ours, theirs):
        if a != b:
            return f"rank 0 has {_describe(a)}, it has {_describe(b)}"
    return f"rank 0 has {len(ours)} parameters and buffers, it has {len(theirs)}"


def _describe(entry: tuple) -> str:
    name, shape, dtype, requires_grad = entry
    return f"{name!r} of shape {shape} {dtype}" + ("" if requires_grad else " (frozen)")


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Make every rank start from rank 0's parameters and buffers."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.detach(), src=0)


def gather_from_ranks(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of `value` over the ranks (itself with one rank)."""
    if world.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world.world_size


def barrier(world: World) -> None:
    """Wait for every rank (nothing with one)."""
    if world.world_size > 1:
        dist.barrier()
