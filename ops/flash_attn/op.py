"""torch.library registration of FlashAttention-2 (namespace `cs336`) and the CS336 autograd Functions.

Ops (`document_ids` is optional everywhere):
  cs336::flash_attn_fwd(q, k, v, is_causal, scale, document_ids) -> (O, L)       building block, has a fake
  cs336::flash_attn_bwd(dO, q, k, v, O, L, is_causal, scale, document_ids) -> (dQ, dK, dV)   the same
  cs336::flash_attn(q, k, v, is_causal=False, scale=None, document_ids=None) -> O   public, differentiable

q is (..., Hq, Nq, D) and k, v (..., Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query heads;
query head h reads kv head h // (Hq // Hkv)). `document_ids` (documents.py) packs several documents
into each row.

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

from ops.flash_attn.documents import check_document_ids
from ops.flash_attn.reference import default_scale
from ops.flash_attn.tiled import tiled_backward, tiled_forward
from ops.triton_utils.device import eager, use_triton

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def check_inputs(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None = None, *,
                 check_values: bool = True) -> None:
    """Raise TypeError/ValueError naming the offending argument; silent when the inputs are usable.
    `check_values=False` skips reading document_ids' values (the fakes: no host sync, no data)."""
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
    _check_heads(q, k, v)
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
    if document_ids is not None:
        check_document_ids(document_ids, q, k, check_values=check_values)


def _check_heads(q: Tensor, k: Tensor, v: Tensor) -> None:
    """k and v share their leading dims; q's may differ from theirs only in the heads (dim -3), by a
    whole multiple (grouped-query attention; Hkv = 1 is multi-query attention)."""
    if k.shape[:-2] != v.shape[:-2]:
        raise ValueError(f"flash_attn: k and v must have the same leading dims (batch, heads), got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] == k.shape[:-2]:
        return
    if q.dim() != k.dim() or q.dim() < 3 or q.shape[:-3] != k.shape[:-3]:
        raise ValueError(f"flash_attn: leading dims of q, k, v differ: {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (only the heads, dim -3, may differ)")
    heads_q, heads_kv = q.shape[-3], k.shape[-3]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"flash_attn: q has {heads_q} heads, k has {heads_kv}: the query heads must be a "
                         f"multiple of the key/value heads")


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


def forward_impl(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float,
                 document_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(O, L): the Triton kernels on CUDA (or under the interpreter), else the tiled PyTorch path."""
    check_inputs(q, k, v, document_ids)  # reads the ids' values once per ids tensor (documents.py)
    return _forward_checked(q, k, v, is_causal, scale, document_ids)


def _forward_checked(q: Tensor, k: Tensor, v: Tensor, is_causal: bool, scale: float,
                     document_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """forward_impl for inputs that already passed check_inputs."""
    if use_triton(q):
        from ops.flash_attn.dispatch import attention_forward

        out, lse = attention_forward(q, k, v, is_causal, scale, document_ids)
    else:
        out, lse = tiled_forward(q, k, v, is_causal, scale, document_ids)
    return like(out, q), lse


def backward_impl(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                  is_causal: bool, scale: float, document_ids: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dQ, dK, dV) by recomputation from L, on the same path as forward_impl (which checked the ids)."""
    if use_triton(q):
        from ops.flash_attn.dispatch import attention_backward

        grads = attention_backward(grad_out, q, k, v, out, lse, is_causal, scale, document_ids)
    else:
        grads = tiled_backward(grad_out, q, k, v, out, lse, is_causal, scale, document_ids)
    return tuple(like(g, x) for g, x in zip(grads, (q, k, v)))


flash_attn_fwd = torch.library.custom_op(
    "cs336::flash_attn_fwd", forward_impl, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, bool is_causal, float scale, Tensor? document_ids=None) "
           "-> (Tensor, Tensor)")


@flash_attn_fwd.register_fake
def _(q, k, v, is_causal, scale, document_ids=None):
    check_inputs(q, k, v, document_ids, check_values=False)  # fakes have no values
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


flash_attn_bwd = torch.library.custom_op(
    "cs336::flash_attn_bwd", backward_impl, mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool is_causal, float scale, "
           "Tensor? document_ids=None) -> (Tensor, Tensor, Tensor)")


@flash_attn_bwd.register_fake
def _(grad_out, q, k, v, out, lse, is_causal, scale, document_ids=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _plain(q: Tensor, k: Tensor, v: Tensor, document_ids: Tensor | None) -> bool:
    """eager() over the inputs, the ids included when given."""
    return eager(q, k, v) if document_ids is None else eager(q, k, v, document_ids)


def _save(ctx, q, k, v, out, lse, document_ids, is_causal, scale) -> None:
    """What both Functions' backward needs: lse (..., Nq) is the only (..., Nq)-shaped tensor saved,
    and the ids only when given."""
    ctx.save_for_backward(q, k, v, out, lse, *(() if document_ids is None else (document_ids,)))
    ctx.is_causal, ctx.scale = is_causal, scale


def _saved(ctx) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """(q, k, v, O, L, document_ids or None) as _save kept them."""
    q, k, v, out, lse, *ids = ctx.saved_tensors
    return q, k, v, out, lse, (ids[0] if ids else None)


class FlashAttention2Triton(torch.autograd.Function):
    """FlashAttention-2 through the `cs336` ops (Triton on CUDA).
    `.apply(q, k, v, is_causal=False, scale=None, document_ids=None)`."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, scale=None, document_ids=None):
        plain = _plain(q, k, v, document_ids)
        check_inputs(q, k, v, document_ids, check_values=plain)  # traced: the op's real impl reads the ids
        scale = _resolve_scale(q, scale)
        forward = _forward_checked if plain else torch.ops.cs336.flash_attn_fwd
        out, lse = forward(q, k, v, is_causal, scale, document_ids)
        _save(ctx, q, k, v, out, lse, document_ids, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, document_ids = _saved(ctx)
        backward = backward_impl if _plain(grad_out, q, k, document_ids) else torch.ops.cs336.flash_attn_bwd
        dq, dk, dv = backward(grad_out, q, k, v, out, lse, ctx.is_causal, ctx.scale, document_ids)
        return dq, dk, dv, None, None, None


class FlashAttention2PyTorch(torch.autograd.Function):
    """FlashAttention-2 in tiled pure PyTorch (any device).
    `.apply(q, k, v, is_causal=False, scale=None, document_ids=None)`."""

    @staticmethod
    def forward(ctx, q, k, v, is_causal=False, scale=None, document_ids=None):
        check_inputs(q, k, v, document_ids, check_values=not torch.compiler.is_compiling())
        scale = _resolve_scale(q, scale)
        out, lse = tiled_forward(q, k, v, is_causal, scale, document_ids)
        _save(ctx, q, k, v, out, lse, document_ids, is_causal, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, document_ids = _saved(ctx)
        grads = tiled_backward(grad_out, q, k, v, out, lse, ctx.is_causal, ctx.scale, document_ids)
        return (*grads, None, None, None)


_lib = torch.library.Library("cs336", "FRAGMENT")
_lib.define("flash_attn(Tensor q, Tensor k, Tensor v, bool is_causal=False, float? scale=None, "
            "Tensor? document_ids=None) -> Tensor")


def _flash_attn_composite(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False,
                          scale: float | None = None, document_ids: Tensor | None = None) -> Tensor:
    return FlashAttention2Triton.apply(q, k, v, is_causal, scale, document_ids)


_lib.impl("flash_attn", _flash_attn_composite, "CompositeImplicitAutograd")


def flash_attn(q: Tensor, k: Tensor, v: Tensor, is_causal: bool = False, scale: float | None = None,
               document_ids: Tensor | None = None) -> Tensor:
    """softmax(q k^T * scale [+ causal mask] [+ document mask]) v for q (..., Hq, Nq, D), k/v
    (..., Hkv, Nk, D), Hq a multiple of Hkv; `document_ids` (integers broadcastable to q.shape[:-1],
    nondecreasing along the sequence, Nq == Nk) keeps attention within each document. Differentiable.

    The same as `torch.ops.cs336.flash_attn`; in eager mode it skips the op dispatch (see ops.triton_utils.eager).
    """
    if _plain(q, k, v, document_ids):
        return FlashAttention2Triton.apply(q, k, v, is_causal, scale, document_ids)
    if document_ids is None:  # the graph records the call as made: no trailing None without documents
        return torch.ops.cs336.flash_attn(q, k, v, is_causal, scale)
    return torch.ops.cs336.flash_attn(q, k, v, is_causal, scale, document_ids)
