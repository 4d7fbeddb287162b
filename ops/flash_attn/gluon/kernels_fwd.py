"""Warp-specialised FlashAttention-2 forward for Hopper (sm_90), written in Gluon.

Same math and contract as `ops.flash_attn.kernels.flash_fwd_kernel`: scores in log2 units with
qk_scale = scale * log2(e) folded into one FMA per score, online softmax, causal masking top-left
aligned, L stored in natural log. What Gluon lets us write that `tl` does not (triton 3.6):

One CTA owns 2 * BLOCK_M query rows of one head and runs three partitions (`gl.warp_specialize`):
  - a load partition (1 warp, 24 registers) that issues every TMA copy: the two Q tiles once, then
    K and V tiles into a NUM_STAGES-deep ring of NVMMA-swizzled shared-memory buffers, each guarded
    by a "ready" mbarrier (TMA transaction count) and an "empty" mbarrier (both consumers arrive);
  - two consumer warpgroups (the default partition and one worker of 4 warps), each owning
    BLOCK_M = 64 query rows (one wgmma M extent) and sharing every K/V tile. They are independent,
    so the warp schedulers overlap one's softmax with the other's wgmma; with PINGPONG they also
    take turns through two mbarriers to issue their matmuls (FlashAttention-3's ping-pong).

Inside a consumer the K/V loop is software-pipelined as in FlashAttention-3 (intra-warpgroup
overlap): iteration j issues S_j = Q K_j^T and O += P_{j-1} V_{j-1} as async wgmma, waits only for
S_j (`warpgroup_mma_wait(1)`), computes the softmax of S_j while the P V wgmma still runs, then
waits for O and rescales it. P goes to the second wgmma from registers (no shared-memory round trip).

Tensors arrive as 4-D (B, H, N, D) host descriptors with their own strides, blocks [1, 1, rows, D]
(so a (B, N, H, D) layout seen through .transpose(1, 2) needs no copy): TMA bounds-checks every
dimension, so rows past a head's end read as zero and O stores past Nq are dropped (see
kernels_tma.py for why not a flat view). Keys past Nk read as zero scores, so the ragged last key
tile takes the masked path.

GQA (GROUP query heads per K/V head) changes only the K/V coordinate. Packed documents (HAS_DOCS:
per-row key ranges [start, end)) narrow the key tiles a CTA visits to its rows' documents and mask
per row. Both are constexprs: without them the kernel is the one described above.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LN2_C = gl.constexpr(0.6931471805599453)
NUM_CONSUMERS = gl.constexpr(2)  # consumer warpgroups per CTA, BLOCK_M query rows each


@gluon.jit
def _key_tiles(start_m, n_keys, ROWS: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """(unmasked key tiles, all visible key tiles) for query rows [start_m, start_m + ROWS)."""
    if IS_CAUSAL:
        n_full = gl.minimum(start_m, n_keys) // BLOCK_N  # tiles whose last key <= the first row
        n_all = gl.cdiv(gl.minimum(start_m + ROWS, n_keys), BLOCK_N)
    else:
        n_full = n_keys // BLOCK_N
        n_all = gl.cdiv(n_keys, BLOCK_N)
    return n_full, n_all


@gluon.jit
def _tile_start(BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """(flat head index b * H + h, first query row of this CTA); causal CTAs with the longest rows
    launch first."""
    pid_m = gl.program_id(0)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    return gl.program_id(1), pid_m * (NUM_CONSUMERS * BLOCK_M)


@gluon.jit
def _document_key_tiles(bh, start_m, n_queries, start_ptr, end_ptr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                        IS_CAUSAL: gl.constexpr):
    """Packed documents: (first key tile, number of key tiles) that query rows [start_m, start_m + ROWS)
    see: from the first row's document start to (causal) the last row or the last row's document
    end. Tiles outside hold no key of these rows' documents. Nq == Nk."""
    row0 = bh.to(gl.int64) * n_queries
    last = gl.minimum(start_m + ROWS, n_queries) - 1  # the last real row
    first = gl.load(start_ptr + row0 + start_m) // BLOCK_N
    if IS_CAUSAL:
        stop = last + 1
    else:
        stop = gl.load(end_ptr + row0 + last)
    return first, gl.cdiv(stop, BLOCK_N) - first


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, n_queries, n_keys, n_heads,
                    start_ptr, end_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                    IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr, HAS_DOCS: gl.constexpr):
    """Issue the TMA copies: both Q tiles, then K_j and V_j into ring slot j % NUM_STAGES."""
    q_ready, k_ready, v_ready, k_empty, v_empty, _ = bars
    bh, start_m = _tile_start(BLOCK_M, IS_CAUSAL)
    b, h = bh // n_heads, bh % n_heads  # descriptor coordinates of flat head bh = b * H + h
    kv_h = h // GROUP  # GQA: query heads h of one group share K/V head h // GROUP (GROUP = 1 folds away)
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, h, start_m + c * BLOCK_M, 0], q_ready.index(c),
                                        q_smem.index(c))
    if HAS_DOCS:
        first, n_tiles = _document_key_tiles(bh, start_m, n_queries, start_ptr, end_ptr, NUM_CONSUMERS * BLOCK_M,
                                             BLOCK_N, IS_CAUSAL)
    else:
        first = 0
        _, n_tiles = _key_tiles(start_m, n_keys, NUM_CONSUMERS * BLOCK_M, BLOCK_N, IS_CAUSAL)
    for j in range(n_tiles):
        slot = j % NUM_STAGES
        phase = (j // NUM_STAGES) & 1
        # A fresh mbarrier counts as having completed the phase before phase 0: the first
        # NUM_STAGES waits on "empty" pass at once.
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, kv_h, (first + j) * BLOCK_N, 0], k_ready.index(slot),
                                        k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [b, kv_h, (first + j) * BLOCK_N, 0], v_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _scores(q, k_smem, k_ready, j, s_layout: gl.constexpr,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_STAGES: gl.constexpr):
    """Issue S_j = Q K_j^T (async) once K_j has landed; returns the wgmma token."""
    slot = j % NUM_STAGES
    mbarrier.wait(k_ready.index(slot), (j // NUM_STAGES) & 1)
    k_t = k_smem.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))  # (D, BLOCK_N) view
    s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q, k_t, s0, use_acc=False, is_async=True)


@gluon.jit
def _mask(s, j, n_full, rows, n_keys, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """-inf for keys past Nk and, when causal, after the query; only tiles j >= n_full need it."""
    if j >= n_full:
        keys = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(keys, 0) < n_keys
        if IS_CAUSAL:
            keep = keep & (gl.expand_dims(keys, 0) <= gl.expand_dims(rows, 1))
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _row_bounds(bh, start_m, n_queries, start_ptr, end_ptr, rows, BLOCK_M: gl.constexpr):
    """Packed documents: this warpgroup's rows' key ranges [row_start, row_end) (empty past Nq), and
    the keys [doc_lo, doc_hi) every one of its rows sees (start of its last row's document, end of
    its first row's): key tiles inside that range need no document mask."""
    row0 = bh.to(gl.int64) * n_queries
    real = rows < n_queries
    row_start = gl.load(start_ptr + row0 + rows, mask=real, other=0)
    row_end = gl.load(end_ptr + row0 + rows, mask=real, other=0)
    doc_lo = gl.load(start_ptr + row0 + gl.minimum(start_m + BLOCK_M, n_queries) - 1)
    doc_hi = gl.load(end_ptr + row0 + gl.minimum(start_m, n_queries - 1))
    return row_start, row_end, doc_lo, doc_hi


@gluon.jit
def _document_mask(s, j, n_full, rows, n_keys, row_start, row_end, doc_lo, doc_hi, s_layout: gl.constexpr,
                   BLOCK_N: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """_mask, and -inf for keys outside each row's document; tiles wholly inside [doc_lo, doc_hi)
    below n_full go unmasked."""
    key0 = j * BLOCK_N
    if (j >= n_full) | (key0 < doc_lo) | (key0 + BLOCK_N > doc_hi):
        keys = gl.expand_dims(key0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
        keep = (keys < n_keys) & (keys >= gl.expand_dims(row_start, 1)) & (keys < gl.expand_dims(row_end, 1))
        if IS_CAUSAL:
            keep = keep & (keys <= gl.expand_dims(rows, 1))
        s = gl.where(keep, s, float("-inf"))
    return s


@gluon.jit
def _safe_max(m, HAS_DOCS: gl.constexpr):
    """The running max to subtract: with documents a row may have seen only masked keys so far
    (m = -inf), where 0 keeps exp2(-inf - m) at 0 instead of NaN. Without, every row sees key 0 or
    its diagonal in the first tile."""
    if HAS_DOCS:
        m = gl.where(m == float("-inf"), 0.0, m)
    return m


@gluon.jit
def _consumer(consumer: gl.constexpr, o_desc, q_smem, k_smem, v_smem, bars, lse_ptr, start_ptr, end_ptr, n_queries,
              n_keys, n_heads, qk_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, HAS_DOCS: gl.constexpr):
    """One warpgroup: O and L for query rows [start_m + consumer * BLOCK_M, + BLOCK_M)."""
    q_ready, k_ready, v_ready, k_empty, v_empty, turn = bars
    bh, cta_start = _tile_start(BLOCK_M, IS_CAUSAL)
    start_m = cta_start + consumer * BLOCK_M
    # wgmma accumulators: 4 warps stacked along M (16 rows each), one instruction spans the tile's N.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    rows = start_m + gl.arange(0, BLOCK_M, layout=row_s)
    n_full, _ = _key_tiles(start_m, n_keys, BLOCK_M, BLOCK_N, IS_CAUSAL)
    # Both consumers walk the CTA's key tiles (the load partition's count), so every "empty"
    # barrier gets its two arrivals; tiles past this consumer's diagonal are fully masked.
    if HAS_DOCS:
        first, n_tiles = _document_key_tiles(bh, cta_start, n_queries, start_ptr, end_ptr, NUM_CONSUMERS * BLOCK_M,
                                             BLOCK_N, IS_CAUSAL)
        row_start, row_end, doc_lo, doc_hi = _row_bounds(bh, start_m, n_queries, start_ptr, end_ptr, rows, BLOCK_M)
    else:
        first = 0
        _, n_tiles = _key_tiles(cta_start, n_keys, NUM_CONSUMERS * BLOCK_M, BLOCK_N, IS_CAUSAL)

    mbarrier.wait(q_ready.index(consumer), 0)
    q = q_smem.index(consumer).reshape([BLOCK_M, HEAD_DIM])

    # Prologue: S_0 and its softmax.
    s = warpgroup_mma_wait(0, deps=(_scores(q, k_smem, k_ready, 0, s_layout, BLOCK_M, BLOCK_N, HEAD_DIM,
                                            NUM_STAGES),))
    mbarrier.arrive(k_empty.index(0), count=1)
    if HAS_DOCS:
        s = _document_mask(s, first, n_full, rows, n_keys, row_start, row_end, doc_lo, doc_hi, s_layout, BLOCK_N,
                           IS_CAUSAL)
    else:
        s = _mask(s, 0, n_full, rows, n_keys, s_layout, BLOCK_N, IS_CAUSAL)
    m_i = gl.max(s, axis=1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(_safe_max(m_i, HAS_DOCS), 1))
    l_i = gl.sum(p, axis=1)
    p = gl.convert_layout(p.to(q_smem.dtype), p_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    for j in range(1, n_tiles):
        if PINGPONG:
            # FA3's ping-pong: the consumers take turns to issue their two wgmmas, so one's softmax
            # runs while the other's matmuls hold the tensor cores. A fresh mbarrier passes a wait
            # on parity 1, which gives consumer 0 the first turn.
            mbarrier.wait(turn.index(consumer), ((j - 1) & 1) ^ (1 - consumer))
        # Issue S_j and O += P_{j-1} V_{j-1}; wait for S_j only.
        s_tok = _scores(q, k_smem, k_ready, j, s_layout, BLOCK_M, BLOCK_N, HEAD_DIM, NUM_STAGES)
        prev = (j - 1) % NUM_STAGES
        mbarrier.wait(v_ready.index(prev), ((j - 1) // NUM_STAGES) & 1)
        v = v_smem.index(prev).reshape([BLOCK_N, HEAD_DIM])
        o_tok = warpgroup_mma(p, v, acc, is_async=True)
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - consumer), count=1)
        s = warpgroup_mma_wait(1, deps=(s_tok,))
        mbarrier.arrive(k_empty.index(j % NUM_STAGES), count=1)

        # Softmax of S_j while the P V wgmma runs.
        if HAS_DOCS:
            s = _document_mask(s, first + j, n_full, rows, n_keys, row_start, row_end, doc_lo, doc_hi, s_layout,
                               BLOCK_N, IS_CAUSAL)
        else:
            s = _mask(s, j, n_full, rows, n_keys, s_layout, BLOCK_N, IS_CAUSAL)
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
        m_sub = _safe_max(m_new, HAS_DOCS)
        p_f = gl.exp2(s * qk_scale - gl.expand_dims(m_sub, 1))
        alpha = gl.exp2(m_i - m_sub)
        l_i = l_i * alpha + gl.sum(p_f, axis=1)
        m_i = m_new

        acc, p = warpgroup_mma_wait(0, deps=(o_tok, p))
        mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p = gl.convert_layout(p_f.to(q_smem.dtype), p_layout)

    last = (n_tiles - 1) % NUM_STAGES
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // NUM_STAGES) & 1)
    o_tok = warpgroup_mma(p, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(o_tok,))
    mbarrier.arrive(v_empty.index(last), count=1)

    # Epilogue: O through this consumer's Q buffer (its last reader, the final S wgmma, is done).
    acc = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    o_smem = q_smem.index(consumer)
    o_smem.reshape([BLOCK_M, HEAD_DIM]).store(acc.to(o_desc.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [bh // n_heads, bh % n_heads, start_m, 0], o_smem)  # clipped at Nq
    lse = (m_i + gl.log2(l_i)) * LN2_C  # back to natural log
    gl.store(lse_ptr + bh.to(gl.int64) * n_queries + rows, lse, mask=rows < n_queries)
    tma.store_wait(0)


@gluon.jit
def flash_fwd_ws_kernel(
    q_desc, k_desc, v_desc, o_desc,  # (B, H, Nq, D), (B, H // GROUP, Nk, D) x2, (B, H, Nq, D); blocks [1, 1, rows, D]
    lse_ptr,  # (BH, Nq) float32, contiguous
    start_ptr, end_ptr,  # HAS_DOCS: (BH, Nq) int32 each, contiguous: row i sees keys [start, end); else None
    n_queries, n_keys, n_heads, qk_scale,  # qk_scale = softmax scale * log2(e)
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, GROUP: gl.constexpr,
    HAS_DOCS: gl.constexpr,
):
    """O = softmax(Q K^T * scale) V and L = logsumexp for 2 * BLOCK_M query rows of one head."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_ready.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # each consumer arrives once per tile
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    bars = (q_ready, k_ready, v_ready, k_empty, v_empty, turn)

    # The tuples are written out in the call: a tuple assigned to a variable first turns its
    # constexprs into int32 scalars (triton 3.6). The consumer index (0: the default partition)
    # stays a constexpr as a literal here; this gives the same instructions as one wrapper function
    # per consumer did (PTX compared for every head dim, causal, dtype and ping-pong variant).
    gl.warp_specialize([
        (_consumer, (0, o_desc, q_smem, k_smem, v_smem, bars, lse_ptr, start_ptr, end_ptr, n_queries, n_keys,
                       n_heads, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, IS_CAUSAL, PINGPONG, HAS_DOCS)),
        (_consumer, (1, o_desc, q_smem, k_smem, v_smem, bars, lse_ptr, start_ptr, end_ptr, n_queries, n_keys,
                       n_heads, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, IS_CAUSAL, PINGPONG, HAS_DOCS)),
        (_load_partition, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, bars, n_queries, n_keys, n_heads,
                           start_ptr, end_ptr, BLOCK_M, BLOCK_N, NUM_STAGES, IS_CAUSAL, GROUP, HAS_DOCS)),
    ], [4, 1], [CONSUMER_REGS, 24])
