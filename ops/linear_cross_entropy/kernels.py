"""Triton kernel of the fused LM-head loss: one row of logits -> its loss and its dlogits.

The matmuls stay with cuBLAS (launch.py); this kernel is the memory-bound part in between. Per row
i of a chunk of float32 logits z (R, V), with target t_i and upstream scale s_i:

    m_i   = max_j z_ij,   lse_i = m_i + log sum_j exp(z_ij - m_i)    (online over vocabulary tiles)
    loss_i = lse_i - z_i,t_i                                          (0 when t_i is ignored)
    dlogits_ij = (exp(z_ij - lse_i) - [j == t_i]) * s_i               (0 when t_i is ignored)

A target outside [0, V) (possible on CUDA without the host-side check) is treated as ignored, so
no load or store ever leaves the row.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * log2(e)): exp2 is the hardware instruction


@triton.jit
def _max_sum_tile(row_logits, offs, m, s, VOCAB: tl.constexpr, MASKED: tl.constexpr):
    """(m, s) = running max and sum of exp(z - m) of a row, updated with the logits at `offs`."""
    if MASKED:
        z = tl.load(row_logits + offs, mask=offs < VOCAB, other=float("-inf"))
    else:
        z = tl.load(row_logits + offs)
    m_new = tl.maximum(m, tl.max(z, axis=0))
    s = s * tl.exp2((m - m_new) * LOG2E) + tl.sum(tl.exp2((z - m_new) * LOG2E), axis=0)
    return m_new, s


@triton.jit
def _grad_tile(row_logits, row_dlogits, offs, lse, target, scale, VOCAB: tl.constexpr, MASKED: tl.constexpr):
    """dlogits at `offs` = (exp(z - lse) - [col == target]) * scale, in the dlogits dtype."""
    if MASKED:
        z = tl.load(row_logits + offs, mask=offs < VOCAB, other=0.0)
    else:
        z = tl.load(row_logits + offs)
    grad = (tl.exp2((z - lse) * LOG2E) - tl.where(offs == target, 1.0, 0.0)) * scale
    grad = grad.to(row_dlogits.dtype.element_ty)
    if MASKED:
        tl.store(row_dlogits + offs, grad, mask=offs < VOCAB)
    else:
        tl.store(row_dlogits + offs, grad)


@triton.jit
def lce_rows_kernel(
    logits_ptr,  # (R, V) float32, row stride `logits_stride`
    dlogits_ptr,  # (R, V) input dtype, row stride `dlogits_stride`; written when WRITE_GRAD
    targets_ptr,  # (R,) int64
    scale_ptr,  # (R,) float32 upstream gradient per row; read when HAS_ROW_SCALE
    loss_ptr,  # (R,) float32 out
    logits_stride,
    dlogits_stride,
    ignore_index,
    VOCAB: tl.constexpr,  # V: a model has one, so one compile; the loops' bounds are then known
    BLOCK_V: tl.constexpr,
    HAS_ROW_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    """One program per row: loss_ptr[row] and, when WRITE_GRAD, dlogits[row, :] (see the module docstring).

    Full tiles load unmasked and only the last, partial tile is masked: with V odd (50257) a mask on
    every tile would keep Triton from vectorising any load.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2**31 on large chunks
    row_logits = logits_ptr + row * logits_stride
    cols = tl.arange(0, BLOCK_V)
    FULL: tl.constexpr = VOCAB // BLOCK_V * BLOCK_V  # columns in full tiles

    # Pass 1: running max and sum of exponentials, one reduction per tile (one exp per logit).
    m = float("-inf")
    s = 0.0
    for start in range(0, FULL, BLOCK_V):
        m, s = _max_sum_tile(row_logits, start + cols, m, s, VOCAB, False)
    if FULL < VOCAB:
        m, s = _max_sum_tile(row_logits, FULL + cols, m, s, VOCAB, True)
    lse = m + tl.log(s)

    target = tl.load(targets_ptr + row)
    valid = (target != ignore_index) & (target >= 0) & (target < VOCAB)
    target = tl.where(valid, target, 0)  # a column inside the row even when ignored
    z_target = tl.load(row_logits + target)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))

    if WRITE_GRAD:
        if HAS_ROW_SCALE:
            scale = tl.load(scale_ptr + row)
        else:
            scale = 1.0
        scale = tl.where(valid, scale, 0.0)  # ignored rows still get their zeros written: the buffer is reused
        row_dlogits = dlogits_ptr + row * dlogits_stride
        # Pass 2 walks the row backwards: the tiles pass 1 read last are the likeliest still in L2.
        if FULL < VOCAB:
            _grad_tile(row_logits, row_dlogits, FULL + cols, lse, target, scale, VOCAB, True)
        for i in range(0, FULL // BLOCK_V):
            _grad_tile(row_logits, row_dlogits, FULL - (i + 1) * BLOCK_V + cols, lse, target, scale, VOCAB, False)
