"""The optimizer and learning-rate schedule of a training run, built from its configuration."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from cs336_systems.errors import ConfigError
from cs336_systems.parallel.sharded_optimizer import ShardedOptimizer
from cs336_systems.training.config import OptimizerConfig
from cs336_systems.training.optim_in_backward import InBackwardOptimizer


def adamw(implementation: str, device: torch.device) -> tuple[type[torch.optim.Optimizer], dict]:
    """(AdamW class, its extra keyword arguments) for `implementation` ("auto", "cs336", "torch-fused")
    on `device`. torch's AdamW is the same update as cs336_basics.optimizer.AdamW (decoupled decay
    p *= 1 - lr wd first, bias-corrected moments, eps added to sqrt(v_hat)); fused, one kernel
    updates every parameter per step instead of ~5 kernels per parameter."""
    from cs336_basics.optimizer import AdamW

    if implementation == "auto":
        implementation = "torch-fused" if device.type == "cuda" else "cs336"
    if implementation == "cs336":
        return AdamW, {}
    if device.type != "cuda":
        raise ConfigError(f"--optimizer torch-fused needs CUDA parameters, these are on {device}")
    return torch.optim.AdamW, {"fused": True}


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimizerConfig, *, shard: bool = False,
                    communication_timer: contextlib.AbstractContextManager | None = None,
                    ) -> torch.optim.Optimizer | InBackwardOptimizer:
    """AdamW (config.implementation) over `params` with `config`'s hyperparameters; sharded over the
    ranks (ZeRO-1) when `shard`, with `communication_timer` around its parameter broadcast; stepped
    inside backward, one AdamW per parameter, when `config.in_backward` (optim_in_backward.py)."""
    params = list(params)
    optimizer_cls, extra = adamw(config.implementation, params[0].device if params else torch.device("cpu"))
    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay, **extra}
    if config.in_backward:
        if shard:  # TrainConfig refuses several processes with --optimizer-in-backward before this
            raise ValueError("build_optimizer: the optimizer step inside backward cannot be sharded")
        return InBackwardOptimizer(params, lambda own: optimizer_cls(own, **kwargs))
    if shard:
        return ShardedOptimizer(params, optimizer_cls, communication_timer=communication_timer, **kwargs)
    return optimizer_cls(params, **kwargs)


def learning_rate(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based: the first step already learns)."""
    from cs336_basics.optimizer import get_cosine_lr

    return get_cosine_lr(step, config.lr, config.min_lr, config.warmup_steps, total_steps)
