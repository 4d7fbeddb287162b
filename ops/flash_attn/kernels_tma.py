"""FlashAttention-2 forward whose tiles move through tensor descriptors (TMA on Hopper).

dispatch.py uses it for head dim 128 and long sequences, where it measured 4-7 % faster than the
pointer kernel on an H100; for head dim 64 it was not faster.

Same math as `kernels.flash_fwd_kernel` (online softmax in the log2 domain with qk_scale =
scale * log2(e) folded in, causal key tiles split into unmasked and masked-diagonal ranges, the
longest causal rows launched first, L stored in natural log, grouped-query K/V rows bh // group,
packed documents skipped and masked per tile under HAS_DOCS); only the data movement differs.
Q, K, V and O arrive as host-side `TensorDescriptor`s over the 3-D (BH, N, D) views, with blocks
[1, BLOCK_M, D] (Q, O) and [1, BLOCK_N, D] (K, V). On sm_90+ Triton turns their loads and stores into
TMA bulk copies; elsewhere, and under the interpreter, into masked pointer accesses.

Why 3-D and not the flat (BH*N, D) view: a descriptor bounds-checks every dimension, so rows past a
head's end read as zero and are dropped on store. Flat, a ragged last tile would read the next
head's rows (harmless for K/V, whose keys >= n_keys are masked out of the scores anyway, unless that
head holds inf/NaN: 0 * inf in P @ V) and, worse, an O tile store would overwrite the next head's
rows, which another program owns. 3-D also takes any (B, H, N, D) strides whose non-unit strides are
16-byte multiples, not only layouts where batch and heads merge, and keeps every extent < 2**31.

Constraints (checked by launch_tma.tma_supported): the head dim D is a power of two in 16..256, so the
tile is exactly D wide (no column masks); last stride 1, other strides and the base 16-byte aligned.

Compiled for sm_90 (triton 3.6 and 3.9, checked on the TTGIR), each 3-D load is one TMA copy straight
into a (rows, D) shared-memory tile, the reshape that drops the unit dim costs nothing, K^T is a view
of that tile, and both dots are wgmma reading it; K/V copies are multi-buffered by num_stages. The
loops do not ask for warp specialization: on sm_90 triton 3.6's Hopper pass fails on this kernel at
num_warps=4 and skips it at any other num_warps.
"""

import triton
import triton.language as tl

from ops.flash_attn.kernels import (
    LN2_C,
    document_key_ranges,
    key_ranges,
    query_tile,
    row_documents,
    softmax_init,
    softmax_step,
    visible,
)


@triton.jit
def fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kv, rows, row_start, row_end, lo, hi, n_keys, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                   MASKED: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Online softmax over key tiles [lo, hi): returns the updated (acc, l_i, m_i).

    Keys past n_keys come back from the descriptor as zero rows: their scores are 0, not -inf, so
    the ragged last tile must take the MASKED path (it does: key_ranges ends the unmasked range
    at the last full tile), and their V rows are zero, so they add nothing even before masking.
    """
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        k = k_desc.load([kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)  # (BLOCK_N, D)
        v = v_desc.load([kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)  # (BLOCK_N, D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            keep = visible(rows, start_n + offs_n, n_keys, row_start, row_end, IS_CAUSAL, HAS_DOCS)
            s = tl.where(keep, s, float("-inf"))
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, qk_scale, PRECISION)
    return acc, l_i, m_i


@triton.jit
def flash_fwd_tma_kernel(
    q_desc, k_desc, v_desc, o_desc,  # descriptors over (BH, Nq, D), (BHkv, Nk, D), (BHkv, Nk, D), (BH, Nq, D)
    LSE, START, END,  # (BH, Nq) float32, contiguous; (BH, Nq) int32 document bounds (read only with HAS_DOCS)
    n_queries, n_keys, group, qk_scale,  # group = BH / BHkv; qk_scale = softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr = False,
):
    """O = softmax(Q K^T * scale) V and L = logsumexp for one BLOCK_M query tile of one head."""
    bh64, start_m, rows = query_tile(BLOCK_M, IS_CAUSAL)
    bh = bh64.to(tl.int32)  # descriptor offsets are int32; the grid's y extent is < 2**16
    kv = bh // group  # this query row's K/V row (grouped-query attention)
    start_base, end_base = START + bh64 * n_queries, END + bh64 * n_queries
    row_start, row_end = row_documents(start_base, end_base, rows, n_queries, HAS_DOCS)

    q = q_desc.load([bh, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)  # rows >= n_queries read as 0
    acc, l_i, m_i = softmax_init(BLOCK_M, HEAD_DIM, HAS_DOCS)
    full_end, end = key_ranges(start_m, n_keys, BLOCK_M, BLOCK_N, IS_CAUSAL)
    full_lo = 0
    if HAS_DOCS:  # skips the key tiles of other documents; masks the tiles on document edges
        lo, full_lo, full_end, end = document_key_ranges(full_end, end, start_base, end_base, start_m,
                                                         n_queries, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kv, rows, row_start, row_end, lo, full_lo,
                                       n_keys, qk_scale, HEAD_DIM, BLOCK_N, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    acc, l_i, m_i = fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kv, rows, row_start, row_end, full_lo, full_end,
                                   n_keys, qk_scale, HEAD_DIM, BLOCK_N, IS_CAUSAL, False, PRECISION, HAS_DOCS)
    acc, l_i, m_i = fwd_inner_tma(acc, l_i, m_i, q, k_desc, v_desc, kv, rows, row_start, row_end, full_end, end,
                                   n_keys, qk_scale, HEAD_DIM, BLOCK_N, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    acc = acc / l_i[:, None]
    # The descriptor clips the store at n_queries, so the ragged last tile writes only its own rows.
    o_desc.store([bh, start_m, 0], acc.to(o_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM))
    lse = (m_i + tl.log2(l_i)) * LN2_C  # back to natural log
    tl.store(LSE + bh64 * n_queries + rows, lse, mask=rows < n_queries)
