"""The one place that turns a plain model into what a job trains: activation checkpointing, then
compilation, then the data-parallel wrapper. `train` and every benchmark call `parallelize`.

    forward, ddp = parallelize(model, world_size, compile_model=True, bucket_size_mb=25)
    loss = lm_loss(forward, x, y)                      # forward: the module to call
    ...; ddp.finish_gradient_synchronization()         # ddp: the wrapper, or None with one rank

Order matters: checkpointing wraps blocks before they are compiled (so the compiled graph holds
the recomputation), and the DDP wrapper goes around the compiled module (its gradient hooks stay in
eager autograd, outside any traced graph).
"""

from __future__ import annotations

import torch
from torch import nn

from cs336_systems.parallel.ddp import DDPBucketed


def apply_compile(model: nn.Module, enabled: bool, backend: str = "inductor") -> nn.Module:
    """`model` itself, or a torch.compile wrapper sharing its parameters."""
    return torch.compile(model, backend=backend) if enabled else model


def apply_ddp(module: nn.Module, world_size: int, bucket_size_mb: float | None) -> DDPBucketed | None:
    """Our bucketed DDP around `module` when there are several ranks, else None."""
    if world_size == 1:
        return None
    return DDPBucketed(module, bucket_size_mb=bucket_size_mb)


def parallelize(model: nn.Module, world_size: int, *, compile_model: bool = False, compile_backend: str = "inductor",
                bucket_size_mb: float | None = 25.0) -> tuple[nn.Module, DDPBucketed | None]:
    """(the module to call, the DDP wrapper or None) for `model` on `world_size` ranks."""
    compiled = apply_compile(model, compile_model, compile_backend)
    ddp = apply_ddp(compiled, world_size, bucket_size_mb)
    return (ddp or compiled), ddp
