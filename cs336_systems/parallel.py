"""The processes of a `train` job, and the few collectives the loop needs outside DDP.

    run_job(fn, config)          # fn(config, world) on every process of the job; rank 0's result

Three ways to get processes, picked by `config.parallel` (see ParallelConfig.resolve):
- one process: `fn` runs here, with no process group;
- `--nproc N`: N local workers from `distributed.launch` (spawn; gloo on CPU, NCCL one GPU each);
- torchrun: this process is already one worker; the group is initialised from its environment.

This module stays light (no DDP or dynamo import), so the launching process starts quickly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cs336_systems.distributed import DEFAULT_TIMEOUT, default_backend, launch

if TYPE_CHECKING:
    from cs336_systems.train_config import TrainConfig


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return default_backend(self.device)


def run_job(fn: Callable[[TrainConfig, World], Any], config: TrainConfig) -> Any:
    """`fn(config, world)` on every process of the job; returns rank 0's result (None on other ranks)."""
    parallel, device = config.parallel, torch.device(config.runtime.device)
    if parallel.torchrun:
        # launch() gives each local worker its share of the cores; do the same under torchrun.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        init_torchrun_group(default_backend(device))
        try:
            return _run_rank(fn, config)
        finally:
            dist.destroy_process_group()
    if parallel.world_size > 1:
        return launch(_run_rank, parallel.world_size, fn, config, backend=default_backend(device))[0]
    return fn(config, World(0, 1, device))


def init_torchrun_group(backend: str) -> None:
    """The default process group from torchrun's environment, with store keys private to this attempt.

    torchrun's c10d rendezvous shares its TCPStore with the workers and keeps it across restarts, so
    a restarted worker could read the addresses a dead one published and hang while connecting
    (pytorch/pytorch#135712); prefixing every key with the restart count keeps the attempts apart.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=DEFAULT_TIMEOUT))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"cs336/attempt_{attempt}", store), rank=rank,
                            world_size=world_size, timeout=DEFAULT_TIMEOUT)


def _run_rank(fn: Callable[[TrainConfig, World], Any], config: TrainConfig) -> Any:
    """In a worker whose process group is up: find its device, run `fn`, return its result on rank 0."""
    device = torch.device(config.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = World(dist.get_rank(), dist.get_world_size(), device)
    result = fn(config, world)
    return result if world.is_main else None


def reduce_mean(value: torch.Tensor, world: World) -> torch.Tensor:
    """Mean of `value` over the ranks (itself with one rank)."""
    if world.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world.world_size


def barrier(world: World) -> None:
    if world.world_size > 1:
        dist.barrier()
