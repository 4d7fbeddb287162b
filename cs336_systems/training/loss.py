"""The LM loss: the one function that turns a model and a batch into the training loss.

Training, every benchmark and the tests call `lm_loss`, so the way the loss is computed (logits +
cross-entropy, or the fused LM head that never builds the logits) is chosen here, once.
"""

from __future__ import annotations

import torch
from torch import nn


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (any wrapper of a BasicsTransformerLM) on token ids
    `inputs` (B, T) against `targets` (B, T); a float32 scalar."""
    from cs336_basics.nn_utils import cross_entropy

    logits = model(inputs)  # (B, T, V)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
