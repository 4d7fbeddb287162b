"""The optimizer and learning-rate schedule of a training run, built from its configuration."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from cs336_systems.parallel.sharded_optimizer import ShardedOptimizer
from cs336_systems.training.config import OptimizerConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], config: OptimizerConfig, *, shard: bool = False,
                    communication_timer: contextlib.AbstractContextManager | None = None) -> torch.optim.Optimizer:
    """cs336 AdamW over `params` with `config`'s hyperparameters; sharded over the ranks (ZeRO-1) when
    `shard`, with `communication_timer` around its parameter broadcast."""
    from cs336_basics.optimizer import AdamW

    kwargs = {"lr": config.lr, "betas": config.betas, "eps": config.eps, "weight_decay": config.weight_decay}
    if shard:
        return ShardedOptimizer(params, AdamW, communication_timer=communication_timer, **kwargs)
    return AdamW(params, **kwargs)


def learning_rate(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based: the first step already learns)."""
    from cs336_basics.optimizer import get_cosine_lr

    return get_cosine_lr(step, config.lr, config.min_lr, config.warmup_steps, total_steps)
