"""Launchers: allocate outputs, view inputs as (BH, N, D) with their strides, pick blocks, launch.

Outputs are always fresh tensors (never views of inputs), as torch.library requires; the op
(op.py: `like`) returns them laid out like their inputs.

Grouped-query attention: k and v may have fewer heads than q (Hq = G * Hkv); the kernels take G
(`group_size`) and read K/V row bh // G for query row bh. Packed documents: `bounds` is
documents.document_bounds' (start, end), each (BH, Nq) int32 over q's rows, or None.
Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools

import torch

from ops.flash_attn.kernels import LOG2E, flash_fwd_kernel
from ops.flash_attn.kernels_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel
from ops.flash_attn.tiles import Blocks, KernelConfigs, block_d_for, kernel_configs, precision
from ops.triton_utils.replay import ReplayLauncher

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, where batch*heads goes
# The kernels small calls spend their host time on: launched without Triton's per-call bookkeeping.
forward_kernel = ReplayLauncher(flash_fwd_kernel)
dq_kernel = ReplayLauncher(flash_bwd_dq_kernel)
dkdv_kernel = ReplayLauncher(flash_bwd_dkdv_kernel)


def as_bhnd(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (BH, N, D); a view whenever the leading dims can be merged."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def heads_view(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (B, H, N, D): x itself at four dims, with leading ones below, a view merging
    the outer leading dims above where they merge (else a copy). Unlike as_bhnd it never copies a
    (B, H, N, D) tensor whose B and H do not merge, e.g. the (B, N, H, D) projection output seen
    through .transpose(1, 2): tensor descriptors take its four strides as they are."""
    if x.dim() == 4:
        return x  # (the common case, and reshape's own host time is a launch's worth at small sizes)
    if x.dim() < 4:
        return x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))  # adds unit dims: always a view
    return x.reshape(-1, *x.shape[-3:])


def launch_grid(n_rows: int, block: int, bh: int) -> tuple[int, int]:
    if bh > MAX_GRID_Y:
        raise ValueError(f"flash_attn supports at most {MAX_GRID_Y} batch*heads, got {bh}")
    return (-(-n_rows // block), bh)  # ceil division; triton.cdiv costs a jit call in newer triton


def _fresh_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of x's shape, dtype and device (empty_like parses its
    arguments in about half the host time of torch.empty(shape, dtype=, device=))."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What every forward launcher allocates: O (..., Nq, D) in q.dtype and L (..., Nq) float32."""
    return _fresh_like(q), torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def backward_outputs(q, k, v, lse) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """What every tl backward launcher allocates: fresh contiguous (dQ, dK, dV) in the input dtypes,
    and `row_buffers(lse)`."""
    return (_fresh_like(q), _fresh_like(k), _fresh_like(v)), *row_buffers(lse)


def row_buffers(lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L made contiguous, room for D = rowsum(O * dO)): the per-row inputs of every backward, (..., Nq)
    float32."""
    lse = lse.contiguous()
    return lse, torch.empty_like(lse)


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x (..., N, D) as the pointer kernels take it, a (BH, N, D) array: a tensor to take the data
    pointer of, and its three strides. A contiguous x goes as it is: a reshape costs about a
    microsecond of host time, and a forward + backward reshaped twelve tensors."""
    if x.is_contiguous():
        n, d = x.shape[-2], x.shape[-1]
        return x, (n * d, d, 1)
    x3 = as_bhnd(x)
    return x3, x3.stride()


def batch_heads(x: torch.Tensor) -> int:
    """BH: the product of the leading dims of x (..., N, D)."""
    return x.shape[:-2].numel()


def group_size(q: torch.Tensor, k: torch.Tensor) -> int:
    """G = Hq / Hkv, the query heads that share one K/V head (1 without grouped-query attention)."""
    return batch_heads(q) // max(batch_heads(k), 1)


def document_arrays(bounds: tuple[torch.Tensor, torch.Tensor] | None,
                    placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' START and END arguments: the (BH, Nq) int32 bounds, or without documents a
    placeholder the kernels never read (HAS_DOCS is off)."""
    return bounds if bounds is not None else (placeholder, placeholder)


def flash_forward(q, k, v, is_causal: bool, scale: float, blocks: Blocks | None = None,
                  bounds: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., Hq, Nq, D), k/v (..., Hkv, Nk, D) -> O (..., Hq, Nq, D) in q.dtype, L (..., Hq, Nq) float32.

    `blocks` overrides the tuned tile shapes (the tuning script uses it); `bounds`: packed documents.
    """
    out, lse = forward_outputs(q)
    bh, n_q, head_dim = batch_heads(q), q.shape[-2], q.shape[-1]
    if bh == 0:
        return out, lse
    blocks = blocks or kernel_configs(head_dim, q.dtype, n_q, bh).forward
    (q_, sq), (k_, sk), (v_, sv), (o_, so) = map(_operand, (q, k, v, out))
    forward_kernel[launch_grid(n_q, blocks.block_m, bh)](
        q_, k_, v_, o_, lse, *document_arrays(bounds, lse), *sq, *sk, *sv, *so,
        n_q, k.shape[-2], group_size(q, k), scale * LOG2E,
        **kernel_meta(blocks, head_dim, block_d_for(head_dim), is_causal, q.dtype, bounds is not None))
    return out, lse


def flash_backward(grad_out, q, k, v, out, lse, is_causal: bool, scale: float,
                   configs: KernelConfigs | None = None, bounds: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Gradients (dQ, dK, dV) in the input dtypes; dO may have any strides (even 0, from .sum()).

    `configs` overrides the tuned tile shapes; `bounds`: packed documents (flash_forward).
    """
    (dq, dk, dv), lse, delta = backward_outputs(q, k, v, lse)
    bh, n_q, n_k, head_dim = batch_heads(q), q.shape[-2], k.shape[-2], q.shape[-1]
    if bh == 0:
        return dq, dk, dv
    block_d, has_docs, group = block_d_for(head_dim), bounds is not None, group_size(q, k)
    dq_blocks = configs.dq if configs else kernel_configs(head_dim, q.dtype, n_q, bh).dq
    # The dK/dV grid has one program per key tile of each K/V row: G times fewer than the dQ pass
    # has, each G times longer, so its tiles are the ones tuned for that many rows.
    dkdv = configs.dkdv if configs else kernel_configs(head_dim, q.dtype, n_q, batch_heads(k)).dkdv
    (q_, sq), (k_, sk), (v_, sv), (o_, so), (do_, sdo) = map(_operand, (q, k, v, out, grad_out))
    sdq, sdk, sdv = (_operand(x)[1] for x in (dq, dk, dv))
    start, end = document_arrays(bounds, lse)
    # The dQ pass goes first: it also writes D = rowsum(O * dO), which the dK/dV pass reads.
    dq_kernel[launch_grid(n_q, dq_blocks.block_m, bh)](
        q_, k_, v_, o_, do_, lse, delta, dq, start, end, *sq, *sk, *sv, *so, *sdo, *sdq,
        n_q, n_k, group, scale * LOG2E, scale,
        **kernel_meta(dq_blocks, head_dim, block_d, is_causal, q.dtype, has_docs))
    dkdv_kernel[launch_grid(n_k, dkdv.block_n, batch_heads(k))](
        q_, k_, v_, do_, lse, delta, dk, dv, start, end, *sq, *sk, *sv, *sdo, *sdk, *sdv,
        n_q, n_k, group, scale * LOG2E, scale,
        **kernel_meta(dkdv, head_dim, block_d, is_causal, q.dtype, has_docs))
    return dq, dk, dv


def kernel_meta(blocks: Blocks, head_dim: int, block_d: int, is_causal: bool, dtype: torch.dtype,
                has_docs: bool = False) -> dict:
    """Compile-time arguments shared by the attention kernels (one dict per distinct set, shared:
    callers only unpack it)."""
    return kernel_meta_for(blocks, head_dim, block_d, is_causal, precision(dtype, block_d), has_docs)


@functools.cache
def kernel_meta_for(blocks: Blocks, head_dim: int, block_d: int, is_causal: bool, precision: str,
                    has_docs: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                IS_CAUSAL=is_causal, PRECISION=precision, HAS_DOCS=has_docs,
                num_warps=blocks.num_warps, num_stages=blocks.num_stages)
