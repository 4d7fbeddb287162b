"""torch.library registration of FlashAttention-2 (namespace `cs336`) and the CS336 autograd Functions.

Ops:
  cs336::flash_attn_fwd(q, k, v, is_causal, scale) -> (O, L)           building block, has a fake
  cs336::flash_attn_bwd(dO, q, k, v, O, L, is_causal, scale) -> (dQ, dK, dV)   building block, has a fake
  cs336::flash_attn(q, k, v, is_causal=False, scale=None) -> O          public, differentiable

`flash_attn` is CompositeImplicitAutograd: it runs `FlashAttention2Triton.apply`, whose forward
saves L from the fwd op and whose backward calls the bwd op. Dynamo records `flash_attn` as one
node; AOTAutograd then sees the fwd/bwd ops, whose fakes let torch.compile trace without kernels.
On CUDA (or CPU under TRITON_INTERPRET=1) the ops run the Triton kernels; otherwise the tiled
PyTorch implementation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ops.flash_attn.reference import default_scale
from ops.flash_attn.tiled import tiled_backward, tiled_forward
from ops.triton_utils.device import eager, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def check_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Raise TypeError/ValueError naming the offending argument; silent when the inputs are usable."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"flash_attn: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"flash_attn: {name} has dtype {x.dtype}; supported: float32, bfloat16, float16")
        if x.dim() < 2:
            raise ValueError(f"flash_attn: {name} must have shape (..., N, D), got {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attn: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attn: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"flash_attn: leading dims of q, k, v differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"flash_attn: k and v must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise ValueError(f"flash_attn: head dims of q, k, v differ: {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.shape[-1] == 0:  # caught here: the default scale 1/sqrt(D) would divide by zero
        raise ValueError(f"flash_attn: head dim (q.shape[-1]) must be positive, got shape {tuple(q.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash_attn: head dim (q.shape[-1]) must be <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"flash_attn: empty sequence: q has {q.shape[-2]} rows, k has {k.shape[-2]}")


def _resolve_scale(q: Tensor, scale: float | None) -> float:
    if scale is None:
        return default_scale(q.shape[-1])  # symbolic under dynamic shapes: no checks on it here
    if not (math.isfinite(scale) and scale > 0):
        # The kernels fold the scale into max and exp2, which needs a positive scale.
        raise ValueError(f"flash_attn: scale must be a positive finite number, got {scale}")
    return scale


def like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """x with the strides torch.empty_like(ref) would have (ref's stride order where ref is dense,
    else contiguous): what the op's fakes promise. x itself when it has them, else a copy."""
    if x.is_contiguous() and ref.is_contiguous():
        return x
    if x.stride() == ref.stride():
        return x  # x is fresh, so dense: so is ref then, and empty_like keeps a dense tensor's strides
    target = torch.empty_like(ref, dtype=x.dtype)
    return x if target.stride() == x.stride() else target.copy_(x)


def forward_impl(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(O, L): the Triton kernels on CUDA (or under the interpreter), else the tiled PyTorch path."""
    check_inputs(q, k, v)
    return _forward_checked(q, k, v, is_causal, scale)


def _forward_checked(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """forward_impl for inputs that already passed check_inputs."""
    if use_triton(q):
        from ops.flash_attn.dispatch import attention_forward

        out, lse = attention_forward(q, k, v, is_causal, scale)
    else:
        out, lse = tiled_forward(q, k, v, is_causal, scale)
    return like(out, q), lse


def backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) by recomputation from L, on the same path as forward_impl."""
    if use_triton(q):
        from ops.flash_attn.dispatch import attention_backward

        grads = attention_backward(grad_out, q, k, v, out, lse, is_causal, scale)
    else:
        grads = tiled_backward(grad_out, q, k, v, out, lse, is_causal, scale)
    return tuple(like(g, x) for g, x in zip(grads, (q, k, v)))


flash_attn_fwd = torch.library.custom_op("cs336::flash_attn_fwd", forward_impl, mutates_args=())


@flash_attn_fwd.register_fake
def _(q, k, v, is_causal, scale):
    check_inputs(q, k, v)
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


flash_attn_bwd = torch.library.custom_op("cs336::flash_attn_bwd", backward_impl, mutates_args=())


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, is_causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FlashAttention2Triton(torch.autograd.Function):
    """FlashAttention-2 through the `cs336` ops (Triton on CUDA). `.apply(q, k, v, is_causal=False, scale=None)`."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, scale=None):
        check_inputs(q, k, v)
        scale = _resolve_scale(q, scale)
        forward = _forward_checked if eager(q, k, v) else torch.ops.cs336.flash_attn_fwd
        out, lse = forward(q, k, v, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)  # lse (..., Nq) is the only (..., Nq)-shaped tensor
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        backward = backward_impl if eager(grad_out, q) else torch.ops.cs336.flash_attn_bwd
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, ctx.is_causal, ctx.scale)
        return dq, dk, dv, None, None


class FlashAttention2PyTorch(torch.autograd.Function):
    """FlashAttention-2 in tiled pure PyTorch (any device). `.apply(q, k, v, is_causal=False, scale=None)`."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, scale=None):
        check_inputs(q, k, v)
        scale = _resolve_scale(q, scale)
        out, lse = tiled_forward(q, k, v, is_causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        return (*tiled_backward(grad_out, q, k, v, out, lse, ctx.is_causal, ctx.scale), None, None)


_lib = torch.library.Library("cs336", "FRAGMENT")
_lib.define("flash_attn(Tensor q, Tensor k, Tensor v, bool is_causal=False, float? scale=None) -> Tensor")


def _flash_attn_composite(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                          scale: float | None = None) -> Tensor:
    return FlashAttention2Triton.apply(q, k, v, is_causal, scale)


_lib.impl("flash_attn", _flash_attn_composite, "CompositeImplicitAutograd")


def flash_attn(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask]) v for q (..., Nq, D), k/v (..., Nk, D); differentiable.

    The same as `torch.ops.cs336.flash_attn`; in eager mode it skips the op dispatch (see ops.triton_utils.eager).
    """
    if eager(q, k, v):
        return FlashAttention2Triton.apply(q, k, v, is_causal, scale)
    return torch.ops.cs336.flash_attn(q, k, v, is_causal, scale)
