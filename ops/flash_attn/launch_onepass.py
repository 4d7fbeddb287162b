"""Launcher of the one-pass backward (kernels_bwd_onepass.py): same contract as launch.flash_backward.

dQ is summed across programs (bulk reductions or atomics), so its last bits vary from run to run;
dK and dV do not. Tile shapes: `kernel_configs(...).onepass` in tiles.py.
"""

from __future__ import annotations

import torch

from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.kernels_bwd_onepass import (
    flash_bwd_onepass_dq_kernel,
    flash_bwd_onepass_kernel,
    flash_bwd_onepass_preprocess_kernel,
)
from ops.flash_attn.launch import (
    as_bhnd,
    backward_outputs,
    batch_heads,
    document_arrays,
    group_size,
    kernel_meta,
    launch_grid,
)
from ops.flash_attn.launch_tma import descriptor, tma_aligned
from ops.flash_attn.tiles import Blocks, block_d_for, kernel_configs
from ops.triton_utils.replay import ReplayLauncher

ROW_BLOCK = 64  # query rows per program of the preprocess and conversion kernels (memory-bound)
# Launched without Triton's per-call bookkeeping, as launch.forward_kernel is.
preprocess_kernel = ReplayLauncher(flash_bwd_onepass_preprocess_kernel)
onepass_kernel = ReplayLauncher(flash_bwd_onepass_kernel)
dq_convert_kernel = ReplayLauncher(flash_bwd_onepass_dq_kernel)


def flash_backward_onepass(grad_out, q, k, v, out, lse, is_causal: bool, scale: float,
                           blocks: Blocks | None = None, descriptors: bool = False,
                           bounds: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Gradients (dQ, dK, dV) in the input dtypes; dO may have any strides (even 0, from .sum()).

    `blocks` overrides the tile shape of the one-pass kernel (the tuning script uses it). With
    `descriptors` (Hopper; q must pass launch_tma.tma_supported) the streamed q and dO tiles and the
    dQ additions go through tensor descriptors: TMA copies and bulk reductions. `bounds`: packed
    documents (launch.flash_forward).
    """
    (dq, dk, dv), lse, delta = backward_outputs(q, k, v, lse)
    bh, n_q, n_k, head_dim = batch_heads(q), q.shape[-2], k.shape[-2], q.shape[-1]
    if bh == 0:
        return dq, dk, dv
    # Zeroed by the preprocess kernel; empty here to save a memset launch.
    dq_acc = torch.empty((bh, n_q, head_dim), dtype=torch.float32, device=q.device)
    # (BH, N, D) views: descriptors need them (host time does not matter at the sizes this runs).
    q3, k3, v3, o3, do3, dq3, dk3, dv3 = (as_bhnd(t) for t in (q, k, v, out, grad_out, dq, dk, dv))
    block_d = block_d_for(head_dim)
    row_meta = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": ROW_BLOCK}
    preprocess_kernel[launch_grid(n_q, ROW_BLOCK, bh)](  # (BH, N, D) arrays: one batch of BH heads
        o3, do3, delta, dq_acc, 0, *o3.stride(), 0, *do3.stride(), n_q, bh, **row_meta)
    # One program per key tile of each K/V row (grouped-query attention: G query rows each), so the
    # tiles are the ones tuned for that many rows.
    blocks = blocks or kernel_configs(head_dim, q.dtype, n_q, batch_heads(k)).onepass
    q_in, do_in, acc = _streamed(q3, do3, dq_acc, blocks.block_m, descriptors)
    onepass_kernel[launch_grid(n_k, blocks.block_n, batch_heads(k))](
        q_in, k3, v3, do_in, lse, delta, dk3, dv3, acc, *document_arrays(bounds, lse),
        *q3.stride(), *k3.stride(), *v3.stride(), *do3.stride(), *dk3.stride(), *dv3.stride(),
        n_q, n_k, group_size(q, k), scale * LOG2E, scale, DESCRIPTORS=descriptors,
        **kernel_meta(blocks, head_dim, block_d, is_causal, q.dtype, bounds is not None))
    dq_convert_kernel[launch_grid(n_q, ROW_BLOCK, bh)](dq_acc, dq3, 0, *dq3.stride(), n_q, bh, scale, **row_meta)
    return dq, dk, dv


def _streamed(q3, do3, dq_acc, block_m: int, descriptors: bool):
    """The kernel's Q, DO and DQ_ACC arguments: the tensors, or descriptors with [1, block_m, D] blocks."""
    if not descriptors:
        return q3, do3, dq_acc
    if not tma_aligned(do3):
        do3 = do3.contiguous()  # e.g. the all-zero strides of the gradient of .sum()
    return tuple(descriptor(x, block_m) for x in (q3, do3, dq_acc))
