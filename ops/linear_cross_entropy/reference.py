"""The math of `linear_cross_entropy`, unfused: what the op computes and what the tests and the
benchmark compare against (one definition, imported everywhere).

    logits = x @ weight.T                                   # (N, V)
    loss_i = logsumexp(logits_i) - logits_i[t_i]            # 0 where t_i == ignore_index
    mean   = sum_i loss_i / max(count, 1)                   # count: tokens not ignored
    dlogits_i = (softmax(logits_i) - onehot(t_i)) * scale_i # scale: 1/max(count, 1), 1, or grad_i

The reference materialises all N x V logits; it runs in the inputs' dtype (float64 inputs give the
tests' oracle, bfloat16 inputs give what plain PyTorch does in low precision).
"""

from __future__ import annotations

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def linear_cross_entropy_reference(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                                   reduction: str = "mean") -> Tensor:
    """F.cross_entropy(x @ weight.T, targets) for x (..., D), weight (V, D), targets (...), written as
    the formula above: autograd of logsumexp gives softmax as exp(logits - lse), as the op computes it,
    so a low-precision run of this rounds where the op's math does.

    Unlike F.cross_entropy, `mean` over zero non-ignored targets is 0 (not nan), as in our op.
    """
    logits = x.reshape(-1, x.shape[-1]) @ weight.T  # (N, V)
    flat = targets.reshape(-1)  # (N,)
    valid = flat != ignore_index  # (N,)
    picked = logits.gather(1, torch.where(valid, flat, 0)[:, None]).squeeze(1)  # (N,) logit of the target
    losses = torch.where(valid, torch.logsumexp(logits, dim=-1) - picked, 0.0)  # (N,)
    if reduction == "none":
        return losses.reshape(targets.shape)
    total = losses.sum()
    return total if reduction == "sum" else total / valid.sum().clamp(min=1)


def reference_loss_and_grads(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                             reduction: str = "mean", grad_loss: Tensor | None = None,
                             dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dx, dweight) of the reference done in `dtype` (float64: the tests' oracle).

    `grad_loss` is the upstream gradient (default: ones of the loss's shape).
    """
    x = x.detach().to(dtype).requires_grad_()
    weight = weight.detach().to(dtype).requires_grad_()
    loss = linear_cross_entropy_reference(x, weight, targets, ignore_index, reduction)
    grad = torch.ones_like(loss) if grad_loss is None else grad_loss.to(loss.dtype)
    dx, dweight = torch.autograd.grad(loss, (x, weight), grad, allow_unused=True)
    # No token at all: autograd has nothing to differentiate through; the gradient is zero.
    dx = torch.zeros_like(x) if dx is None else dx
    dweight = torch.zeros_like(weight) if dweight is None else dweight
    return loss.detach(), dx, dweight
