"""Numerically stable softmax / cross-entropy, global-norm gradient clipping, argument checks."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def check_positive_int(**values: int) -> None:
    """Raise a ValueError naming the first argument that is not a positive int: `check_positive_int(d_model=d)`."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _shifted(x: Tensor, dim: int) -> Tensor:
    # exp() overflows fp32 above ~88, so shift the largest entry to 0; softmax is invariant to the
    # shift. Detaching the max is exact: its gradient contributions cancel.
    return x - x.amax(dim=dim, keepdim=True).detach()


def softmax(x: Tensor, dim: int) -> Tensor:
    exp = _shifted(x, dim).exp()
    return exp / exp.sum(dim=dim, keepdim=True)


def log_softmax(x: Tensor, dim: int) -> Tensor:
    shifted = _shifted(x, dim)
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean negative log-likelihood of `targets` (...) under `logits` (..., V); returns an fp32+ scalar."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets must have shape {tuple(logits.shape[:-1])} (logits without the vocab dim), "
                         f"got {tuple(targets.shape)}")
    # bf16 has 8 mantissa bits: log-sum-exp over a 50k vocab in bf16 loses most of the loss's digits.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    shifted = _shifted(logits, -1)  # (..., V)
    log_normalizer = shifted.exp().sum(dim=-1).log()  # (...)
    # Gather the target logit instead of materialising the full (..., V) log-probabilities.
    target_logits = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return (log_normalizer - target_logits).mean()


@torch.no_grad()
def clip_gradient(parameters: Iterable[Tensor] | Tensor, max_norm: float, eps: float = 1e-6) -> Tensor:
    """Scale all gradients in place so their global L2 norm is at most `max_norm`; return the pre-clip norm.

    Parameters without a gradient are skipped. The scale is applied unconditionally (as a factor
    clamped to 1) rather than behind `if norm > max_norm`, which would be a CPU-GPU sync every step.
    """
    if max_norm <= 0:
        raise ValueError(f"max_norm must be positive, got {max_norm!r}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    # Per-tensor norms in fp32 (bf16 squares lose precision), then the norm of the norms.
    norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads])
    total_norm = torch.linalg.vector_norm(norms)
    scale = (max_norm / (total_norm + eps)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total_norm
