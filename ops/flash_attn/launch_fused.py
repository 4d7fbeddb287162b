"""Launcher of the single-pass backward (kernels_bwd_fused.py): same contract as launch.flash_backward.

dQ is summed with float32 atomics, so it is nondeterministic in its last bits; dK and dV are not.
"""

from __future__ import annotations

import torch

from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.kernels_bwd_fused import (
    flash_bwd_fused_dq_kernel,
    flash_bwd_fused_kernel,
    flash_bwd_fused_preprocess_kernel,
)
from ops.flash_attn.launch import LONG_SEQUENCE, Blocks, _as_bhnd, _block_d, _grid, _meta, interpreting
from ops.flash_attn.launch_tma import descriptor, tma_aligned

ROW_BLOCK = 64  # query rows per program of the preprocess and conversion kernels (memory-bound)

# Small tiles under the interpreter, so small test shapes still cross tile edges.
_INTERPRETER = Blocks(16, 16, 1, 1)
_FP32 = Blocks(32, 32, 4, 1)

# 16-bit inputs, keyed like launch._HALF: (padded head dim BLOCK_D, long sequence). Measured on
# an H100 with descriptors (cs336_systems.bench.flash_tune --kernels fused; docs/perf/flash_attention.md).
# D = 64 is the case dispatch.py uses; D = 128 lost to the two-pass backward at every tile tried.
FUSED_BLOCKS = {
    (64, False): Blocks(64, 64, 4, 4),
    (64, True): Blocks(64, 64, 4, 4),
    (128, False): Blocks(64, 128, 8, 3),
    (128, True): Blocks(64, 128, 8, 3),
    # k, v, dK and dV of a key tile all live in registers: keep the tile short at D = 256.
    (256, False): Blocks(32, 32, 4, 1),
    (256, True): Blocks(32, 32, 4, 1),
}


def fused_blocks(head_dim: int, dtype: torch.dtype, n_queries: int = 0) -> Blocks:
    """The tile shape of the fused kernel for inputs of this head dim, dtype and query length."""
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float32:
        return _FP32
    return FUSED_BLOCKS[max(64, _block_d(head_dim)), n_queries >= LONG_SEQUENCE]


def flash_backward_fused(grad_out, q, k, v, out, lse, is_causal: bool, scale: float,
                         blocks: Blocks | None = None, descriptors: bool = False):
    """Gradients (dQ, dK, dV) in the input dtypes; dO may have any strides (even 0, from .sum()).

    `blocks` overrides the tile shape of the fused kernel (the tuning script uses it). With
    `descriptors` (Hopper; q must pass launch_tma.tma_supported) the streamed q and dO tiles and the
    dQ additions go through tensor descriptors: TMA copies and bulk reductions.
    """
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    q3, k3, v3, o3, do3 = (_as_bhnd(t) for t in (q, k, v, out, grad_out))
    dq3, dk3, dv3 = _as_bhnd(dq), _as_bhnd(dk), _as_bhnd(dv)
    bh, n_q, head_dim = q3.shape
    n_k = k3.shape[1]
    if bh == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    delta = torch.empty_like(lse)  # (..., Nq) float32
    # Zeroed by the preprocess kernel; empty here to save a memset launch.
    dq_acc = torch.empty((bh, n_q, head_dim), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    row_meta = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": ROW_BLOCK}
    flash_bwd_fused_preprocess_kernel[_grid(n_q, ROW_BLOCK, bh)](
        o3, do3, delta, dq_acc, *o3.stride(), *do3.stride(), n_q, **row_meta)
    blocks = blocks or fused_blocks(head_dim, q.dtype, n_q)
    q_in, do_in, acc = _streamed(q3, do3, dq_acc, blocks.block_m, descriptors)
    flash_bwd_fused_kernel[_grid(n_k, blocks.block_n, bh)](
        q_in, k3, v3, do_in, lse, delta, dk3, dv3, acc,
        *q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dk3.stride(), *dv3.stride(),
        n_q, n_k, scale * LOG2E, scale, DESCRIPTORS=descriptors,
        **_meta(blocks, head_dim, block_d, is_causal, q.dtype))
    flash_bwd_fused_dq_kernel[_grid(n_q, ROW_BLOCK, bh)](dq_acc, dq3, *dq3.stride(), n_q, scale, **row_meta)
    return dq, dk, dv


def _streamed(q3, do3, dq_acc, block_m: int, descriptors: bool):
    """The kernel's Q, DO and DQ_ACC arguments: the tensors, or descriptors with [1, block_m, D] blocks."""
    if not descriptors:
        return q3, do3, dq_acc
    if not tma_aligned(do3):
        do3 = do3.contiguous()  # e.g. the all-zero strides of the gradient of .sum()
    return tuple(descriptor(x, block_m) for x in (q3, do3, dq_acc))
