"""The processes of a job: `World` (this process's rank, world size, device) and `run_job`.

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
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from cs336_systems.distributed.launch import default_backend, init_from_env, launch


class JobConfig(Protocol):
    """What `run_job` reads of a job's configuration (training's TrainConfig is one):
    `parallel.torchrun`, `parallel.world_size` and `runtime.device`."""

    parallel: Any
    runtime: Any


C = TypeVar("C", bound=JobConfig)


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


def run_job(fn: Callable[[C, World], Any], config: C) -> Any:
    """`fn(config, world)` on every process of the job; returns rank 0's result (None on other ranks)."""
    parallel, device = config.parallel, torch.device(config.runtime.device)
    if parallel.torchrun:
        # launch() gives each local worker its share of the cores; do the same under torchrun.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        init_from_env(default_backend(device))
        try:
            return _run_rank(fn, config)
        finally:
            dist.destroy_process_group()
    if parallel.world_size > 1:
        return launch(_run_rank, parallel.world_size, fn, config, backend=default_backend(device))[0]
    return fn(config, World(0, 1, device))


def _run_rank(fn: Callable[[C, World], Any], config: C) -> Any:
    """In a worker whose process group is up: find its device, run `fn`, return its result on rank 0."""
    device = torch.device(config.runtime.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    world = World(dist.get_rank(), dist.get_world_size(), device)
    result = fn(config, world)
    return result if world.is_main else None
