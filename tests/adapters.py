"""The CS336 Assignment 2 interface: thin functions over the library (names and keywords as CS336's).

Imports happen inside each function so that this file imports only the library, and only the
part a given test needs.
"""

from __future__ import annotations

from typing import Any

import torch


def get_flashattention_autograd_function_pytorch() -> type:
    """The tiled pure-PyTorch FlashAttention-2 autograd.Function: `.apply(q, k, v, is_causal=False)`."""
    from ops.flash_attn import FlashAttention2PyTorch

    return FlashAttention2PyTorch


def get_flashattention_autograd_function_triton() -> type:
    """The Triton FlashAttention-2 autograd.Function (calls `torch.ops.cs336.flash_attn_*`)."""
    from ops.flash_attn import FlashAttention2Triton

    return FlashAttention2Triton


def get_ddp_individual_parameters(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap `module` so each gradient is all-reduced asynchronously as soon as it is ready."""
    from cs336_systems.parallel.ddp import DDPIndividualParameters

    return DDPIndividualParameters(module)


def ddp_individual_parameters_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Wait for the gradient all-reduces started during backward."""
    ddp_model.finish_gradient_synchronization()


def get_ddp_bucketed(module: torch.nn.Module, bucket_size_mb: float) -> torch.nn.Module:
    """Wrap `module` so gradients are all-reduced in buckets of at most `bucket_size_mb` MB."""
    from cs336_systems.parallel.ddp import DDPBucketed

    return DDPBucketed(module, bucket_size_mb=bucket_size_mb)


def ddp_bucketed_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Wait for the bucket all-reduces and leave averaged gradients in `param.grad`."""
    ddp_model.finish_gradient_synchronization()


def ddp_bucketed_on_train_batch_start(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reset per-step bucket state before a new training batch."""
    ddp_model.on_train_batch_start()


def get_sharded_optimizer(params: Any, optimizer_cls: type[torch.optim.Optimizer],
                          **kwargs: Any) -> torch.optim.Optimizer:
    """An optimizer whose state is sharded across ranks (ZeRO stage 1) around `optimizer_cls(**kwargs)`."""
    from cs336_systems.parallel.sharded_optimizer import ShardedOptimizer

    return ShardedOptimizer(params, optimizer_cls, **kwargs)


# ---------------------------------------------------------------- CS336 2026 names


def get_ddp(module: torch.nn.Module) -> torch.nn.Module:
    """DDP that all-reduces each gradient asynchronously as soon as backward produces it (2026 name of
    `get_ddp_individual_parameters`)."""
    return get_ddp_individual_parameters(module)


def ddp_on_after_backward(ddp_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Wait for the gradient all-reduces started during backward (2026 name)."""
    ddp_individual_parameters_on_after_backward(ddp_model, optimizer)


def get_fsdp(module: torch.nn.Module, compute_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Fully-sharded data parallel: Linear/Embedding parameters sharded over the ranks, gathered just in
    time; with `compute_dtype`, weights are cast before the all-gather and computed with in that dtype.

    Build the optimizer over the returned wrapper's `parameters()`: the fp32 shards (stored on the
    sharded layers as `weight_shard`) and the replicated small parameters. `.module` is the wrapped
    module; its `weight` attributes of sharded layers are plain tensors, not Parameters.
    """
    from cs336_systems.parallel.fsdp import FSDP

    return FSDP(module, compute_dtype=compute_dtype)


def fsdp_on_after_backward(fsdp_model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Wait for the gradient reduce-scatters; average the replicated gradients. Afterwards every parameter
    of `fsdp_model.module` that requires grad has an fp32 `.grad` of its own shape (a shard's for shards)."""
    fsdp_model.finish_gradient_synchronization()


def fsdp_gather_full_params(fsdp_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name in the unwrapped module: full tensor} (a collective: call on every rank)."""
    return fsdp_model.gather_full_params()
