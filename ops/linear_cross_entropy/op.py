"""torch.library registration of the fused LM-head loss (namespace `cs336`) and its autograd Function.

Ops:
  cs336::linear_cross_entropy_fwd(x, weight, targets, ignore_index, reduction, grad_x, grad_weight)
      -> (loss, dx, dweight)     building block, has a fake; dx/dweight are 0-size unless asked for
  cs336::linear_cross_entropy_bwd(grad_loss, x, weight, targets, ignore_index, reduction, grad_x, grad_weight)
      -> (dx, dweight)           building block, has a fake; recomputes the logits chunk by chunk
  cs336::linear_cross_entropy(x, weight, targets, ignore_index=-100, reduction="mean") -> loss
                                 public, differentiable (CompositeImplicitAutograd)

With `mean`/`sum` and a gradient wanted, the forward op returns the gradients too, computed while
each chunk's logits exist (three matmuls in all); the backward only scales them by the incoming
scalar. With `none` the upstream gradient is per token, so the backward op recomputes the logits
(four matmuls). With no gradient wanted, the forward is one matmul. On CUDA (or CPU under
TRITON_INTERPRET=1) the Triton path runs (launch.py), else the chunked PyTorch one (chunked.py).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from ops.linear_cross_entropy import chunked
from ops.linear_cross_entropy.reference import REDUCTIONS
from ops.triton_utils.device import eager, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Range-check targets on CUDA too (a host sync per call); also on with CS336_CHECK_TARGETS=1.
CHECK_TARGETS = False


def check_inputs(x: Tensor, weight: Tensor, targets: Tensor, reduction: str) -> None:
    """Raise TypeError/ValueError naming the offending argument; metadata only (no host sync)."""
    for name, value in (("x", x), ("weight", weight), ("targets", targets)):
        if not isinstance(value, Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(value).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"linear_cross_entropy: x has dtype {x.dtype}; supported: float32, bfloat16, float16")
    if weight.dtype != x.dtype:
        raise TypeError(f"linear_cross_entropy: weight has dtype {weight.dtype}, x has {x.dtype}; they must match")
    if targets.dtype != torch.int64:
        raise TypeError(f"linear_cross_entropy: targets must be int64 (torch.long), got {targets.dtype}")
    if not (x.device == weight.device == targets.device):
        raise ValueError(f"linear_cross_entropy: x, weight, targets must be on one device, got {x.device}, "
                         f"{weight.device}, {targets.device}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"linear_cross_entropy: x must have shape (..., D) with D > 0, got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: weight must have shape (V, D) with V > 0, got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_cross_entropy: head dim mismatch: x has D = {x.shape[-1]}, weight (V, D) has "
                         f"D = {weight.shape[1]}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, "
                         f"got {tuple(targets.shape)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_target_range(targets: Tensor, vocab: int, ignore_index: int) -> None:
    """Targets in [0, V) or ignore_index. Always on CPU; on CUDA only with CHECK_TARGETS or
    CS336_CHECK_TARGETS=1, since reading the answer is a host sync (the kernel treats a stray
    target as ignored instead)."""
    if targets.device.type != "cpu" and not (CHECK_TARGETS or os.environ.get("CS336_CHECK_TARGETS") == "1"):
        return
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if bad.any():
        raise ValueError(f"linear_cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index "
                         f"({ignore_index}); got {targets[bad].reshape(-1)[0].item()}")


def _no_autocast(x: Tensor):
    """The op computes in its inputs' dtypes: autocast (which does not stop at a custom op) must not
    recast the matmuls inside, whose float32 outputs and accumulators are the point."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def _backend(x: Tensor):
    if use_triton(x):
        from ops.linear_cross_entropy import launch

        return launch.loss_and_grads
    return chunked.loss_and_grads


def _mean_scale(targets: Tensor, vocab: int, ignore_index: int) -> Tensor:
    """1 / max(count, 1) as a 0-dim float32 tensor, on the device (no host sync). count: the targets
    the loss counts (ignored and out-of-range ones excluded); no such target gives loss 0, grads 0."""
    count = ((targets != ignore_index) & (targets >= 0) & (targets < vocab)).sum()
    return 1.0 / count.clamp(min=1).to(torch.float32)


def _finish(dx: Tensor | None, dw: Tensor | None, scale: Tensor | None, x: Tensor,
            weight: Tensor) -> tuple[Tensor, Tensor]:
    """Scale the backend's gradients (dx (N, D) in x.dtype, dw (V, D) float32) and give them the
    inputs' shapes and dtypes; 0-size tensors for the ones not computed."""
    if dx is None:
        dx = x.new_empty(0)
    else:
        dx = (dx if scale is None else dx.mul_(scale)).view(x.shape)
    if dw is None:
        dw = weight.new_empty(0)
    elif weight.dtype != torch.float32:
        dw = dw.to(weight.dtype) if scale is None else torch.mul(dw, scale, out=weight.new_empty(weight.shape))
    elif scale is not None:
        dw.mul_(scale)
    return dx, dw


def forward_impl(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                 grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dL/dx, dL/dweight): the gradients of loss (of loss.sum() for `none`) when asked for."""
    check_inputs(x, weight, targets, reduction)
    return _forward_checked(x, weight, targets, ignore_index, reduction, grad_x, grad_weight)


def _forward_checked(x, weight, targets, ignore_index, reduction, grad_x, grad_weight):
    """forward_impl for inputs that already passed check_inputs."""
    vocab = weight.shape[0]
    check_target_range(targets, vocab, ignore_index)
    x2, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1).contiguous()  # (N, D), (N,)
    with _no_autocast(x):
        losses, dx, dw = _backend(x)(x2, weight, flat, ignore_index, None, grad_x, grad_weight)
    scale = _mean_scale(flat, vocab, ignore_index) if reduction == "mean" else None
    if reduction == "none":
        loss = losses.view(targets.shape)
    else:
        loss = losses.sum() if scale is None else losses.sum() * scale
    return (loss, *_finish(dx, dw, scale, x, weight))


def backward_impl(grad_loss: Tensor, x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, reduction: str,
                  grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor]:
    """(dx, dweight) for the upstream gradient `grad_loss` (the loss's shape), logits recomputed."""
    vocab = weight.shape[0]
    x2, flat = x.reshape(-1, x.shape[-1]), targets.reshape(-1).contiguous()  # (N, D), (N,)
    row_scale, scale = None, None
    if reduction == "none":
        row_scale = grad_loss.reshape(-1).to(torch.float32).contiguous()  # (N,): a per-token scale in the kernel
    else:
        scale = grad_loss.to(torch.float32)
        scale = scale * _mean_scale(flat, vocab, ignore_index) if reduction == "mean" else scale
    with _no_autocast(x):
        _, dx, dw = _backend(x)(x2, weight, flat, ignore_index, row_scale, grad_x, grad_weight)
    return _finish(dx, dw, scale, x, weight)


linear_cross_entropy_fwd = torch.library.custom_op("cs336::linear_cross_entropy_fwd", forward_impl, mutates_args=())


@linear_cross_entropy_fwd.register_fake
def _(x, weight, targets, ignore_index, reduction, grad_x, grad_weight):
    check_inputs(x, weight, targets, reduction)
    loss = x.new_empty(targets.shape if reduction == "none" else (), dtype=torch.float32)
    return loss, x.new_empty(x.shape if grad_x else 0), weight.new_empty(weight.shape if grad_weight else 0)


linear_cross_entropy_bwd = torch.library.custom_op("cs336::linear_cross_entropy_bwd", backward_impl, mutates_args=())


@linear_cross_entropy_bwd.register_fake
def _(grad_loss, x, weight, targets, ignore_index, reduction, grad_x, grad_weight):
    return x.new_empty(x.shape if grad_x else 0), weight.new_empty(weight.shape if grad_weight else 0)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """`.apply(x, weight, targets, ignore_index=-100, reduction="mean")`: the loss, differentiable in x, weight.

    Grad mode is always off inside forward, so under no_grad `.apply` still makes the gradients of
    inputs that require grad; `linear_cross_entropy` (and the op) skip the Function there.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index=-100, reduction="mean"):
        check_inputs(x, weight, targets, reduction)
        grad_x, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # mean/sum: the upstream gradient is one scalar, so the gradients can be made now, while each
        # chunk's logits exist. none: a gradient per token, known only in backward (recompute there).
        ctx.fused = reduction != "none"
        forward = _forward_checked if eager(x, weight, targets) else torch.ops.cs336.linear_cross_entropy_fwd
        loss, dx, dw = forward(x, weight, targets, ignore_index, reduction,
                               ctx.fused and grad_x, ctx.fused and grad_weight)
        ctx.save_for_backward(*((dx, dw) if ctx.fused else (x, weight, targets)))
        ctx.ignore_index, ctx.reduction = ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.fused:
            dx, dw = ctx.saved_tensors
            return dx * grad_loss if grad_x else None, dw * grad_loss if grad_weight else None, None, None, None
        x, weight, targets = ctx.saved_tensors
        backward = backward_impl if eager(grad_loss, x, weight) else torch.ops.cs336.linear_cross_entropy_bwd
        dx, dw = backward(grad_loss, x, weight, targets, ctx.ignore_index, ctx.reduction, grad_x, grad_weight)
        return dx if grad_x else None, dw if grad_weight else None, None, None, None


_lib = torch.library.Library("cs336", "FRAGMENT")
_lib.define("linear_cross_entropy(Tensor x, Tensor weight, Tensor targets, int ignore_index=-100, "
            "str reduction=\"mean\") -> Tensor")


def _loss(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100, reduction: str = "mean") -> Tensor:
    """Through the Function when autograd will record a graph; else the forward alone (one matmul):
    inside Function.forward grad mode is always off, so under no_grad the Function could not tell."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return LinearCrossEntropyFunction.apply(x, weight, targets, ignore_index, reduction)
    check_inputs(x, weight, targets, reduction)
    forward = _forward_checked if eager(x, weight, targets) else torch.ops.cs336.linear_cross_entropy_fwd
    return forward(x, weight, targets, ignore_index, reduction, False, False)[0]


_lib.impl("linear_cross_entropy", _loss, "CompositeImplicitAutograd")


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> Tensor:
    """Cross-entropy of x @ weight.T against targets without materialising the logits.

    x (..., D), weight (V, D), targets (...) int64. Returns float32: a scalar for `mean` (over the
    non-ignored targets; 0 if there are none) and `sum`, per-token losses (...) for `none`. The same
    as `torch.ops.cs336.linear_cross_entropy`; in eager mode it skips the op dispatch.
    """
    if eager(x, weight, targets):
        return _loss(x, weight, targets, ignore_index, reduction)
    check_inputs(x, weight, targets, reduction)  # our messages before the dispatcher's schema errors
    return torch.ops.cs336.linear_cross_entropy(x, weight, targets, ignore_index, reduction)
