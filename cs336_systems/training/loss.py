"""The LM loss: the one function that turns a model and a batch into the training loss.

Training, every benchmark and the tests call `lm_loss`, so the way the loss is computed (logits +
cross-entropy, or the fused LM head that never builds the logits) is chosen here, once.
"""

from __future__ import annotations

import torch
from torch import nn

LOSS_IMPLEMENTATIONS = ("fused", "unfused")
"""`fused`: the model's fused LM head + cross-entropy (ops/linear_cross_entropy: never holds the
logits); `unfused`: logits, then cs336_basics' cross_entropy (the CS336 path, for comparison)."""


def lm_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, document_ids: torch.Tensor | None = None,
            *, loss: str = "fused") -> torch.Tensor:
    """Mean next-token cross-entropy of `model` (a BasicsTransformerLM, or any wrapper whose forward
    passes keyword arguments through: DDP, FSDP, compiled) on token ids `inputs` (B, T) against
    `targets` (B, T); a float32 scalar. `document_ids` (B, T): packed documents (the model attends
    within each); every position still counts, so the loss means the same with or without them."""
    # Only passed when given: a model (or wrapper) without the argument keeps working unpacked.
    documents = {} if document_ids is None else {"document_ids": document_ids}
    if loss == "fused":
        return model(inputs, targets=targets, **documents)
    if loss != "unfused":
        raise ValueError(f"loss must be one of {LOSS_IMPLEMENTATIONS}, got {loss!r}")
    from cs336_basics.nn_utils import cross_entropy

    logits = model(inputs, **documents)  # (B, T, V)
    return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
