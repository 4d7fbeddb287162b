"""The stock PyTorch recipe of `bench step` (the CS336 2026 leaderboard's baseline), written plainly.

SDPA attention, torch.utils.checkpoint around every block, each block compiled with block.compile(), the
LM head + F.cross_entropy in checkpointed chunks of STOCK_LOSS_CHUNK tokens, torch.optim.AdamW(fused=True).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from cs336_systems.bench.lm_loss import checkpointed_chunks_loss

STOCK_LOSS_CHUNK = 8192
"""Tokens per checkpointed LM-head + cross-entropy chunk of the stock recipe."""
ADAMW = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
"""The AdamW hyperparameters every contender of `bench step` uses."""


class StockCheckpointedBlock(nn.Module):
    """torch.utils.checkpoint around one block (the stock recipe's activation checkpointing)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, x, use_reentrant=False)


def stock_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy with the LM head and loss in checkpointed chunks of STOCK_LOSS_CHUNK tokens:
    only one chunk's logits exist at a time, in forward and in backward."""
    x = model.token_embeddings(inputs)  # (B, T, d)
    for layer in model.layers:
        x = layer(x)
    hidden, targets = model.ln_final(x).flatten(0, 1), targets.flatten()  # (B*T, d), (B*T,)
    return checkpointed_chunks_loss(hidden, model.lm_head.weight, targets, STOCK_LOSS_CHUNK, upcast=True)


def stock_setup(model: nn.Module, compile_backend: str | None, compile: bool = True
                ) -> tuple[Callable, torch.optim.Optimizer]:
    model.layers = nn.ModuleList(StockCheckpointedBlock(block) for block in model.layers)
    if compile:
        for layer in model.layers:
            layer.compile(backend=compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), **ADAMW, fused=True)
    return (lambda x, y: stock_loss(model, x, y)), optimizer
