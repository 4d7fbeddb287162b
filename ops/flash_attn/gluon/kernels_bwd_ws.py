"""Warp-specialised one-pass FlashAttention backward for Hopper (sm_90), written in Gluon.

Same math, contract and tiles as kernels_bwd.flash_bwd_gluon_kernel (one CTA per BLOCK_N = 128 keys of
one K/V head, query tiles of BLOCK_M rows, dQ added by TMA bulk reductions), with the CTA's warps
split into partitions (`gl.warp_specialize`) that meet on mbarriers instead of CTA barriers:

  - a load partition (1 warp) issues every TMA copy: K and V once, then Q, dO, L and Delta of each
    query tile into a NUM_STAGES ring, each slot freed ("empty") when both MMA partitions are done
    with it;
  - two MMA partitions (one warpgroup each: the default partition and a 4-warp worker), each owning
    64 of the keys: S^T, dP^T, P^T, dS^T, dV and dK for its rows, and half of dQ's head-dim columns,
    which it adds to global memory itself (one TMA reduction of a BLOCK_M x D/2 tile).

Where the one-pass kernel's warpgroups meet at two CTA barriers a step (dS^T complete; the dQ tile
complete), here a warpgroup waits only for the other's half of dS^T ("ds_ready", double-buffered, so
the two may be a step apart), issues no TMA loads itself, and waits for its own dQ reduction alone
(`tma.store_wait`) before it reuses its dQ buffer. dS^T is written to shared memory per half and read
whole by both dQ wgmmas; its buffer is rewritten only after both have read it ("ds_free").

Dispatched wherever the Gluon backward runs (gluon/__init__.py: use_gluon_backward). Measured on one H100
(tools/gluon_timings.py --backward-tiles): the 8B layer 78.9 ms against the one-pass Gluon kernel's 87.0
and cuDNN's 79.7; the leaderboard's D = 64 shape 3.26 ms against the tl one-pass 3.60 and cuDNN 3.21.
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

from ops.flash_attn.gluon.kernels_bwd import (
    _document_probabilities,
    _document_query_tiles,
    _key_bounds,
    _load_tile,
    _probabilities,
    _query_step,
    _query_tiles,
    _reduce_add,
    _row_vector,
)

KEYS = gl.constexpr(64)  # key rows per MMA partition (one wgmma M extent)


@gluon.jit
def _cta(BLOCK_N: gl.constexpr, HEADS_FIRST: gl.constexpr):
    """(flat K/V head b * Hkv + h, first key of this CTA). HEADS_FIRST: the grid is (heads, key tiles),
    so CTAs launch key tile by key tile across all heads: with causal masking the first key tiles
    have the most query steps (GROUP times more with GQA), and launching them first leaves short
    CTAs for the tail. Otherwise (key tiles, heads): one head after another."""
    if HEADS_FIRST:
        return gl.program_id(0), gl.program_id(1) * BLOCK_N
    return gl.program_id(1), gl.program_id(0) * BLOCK_N


@gluon.jit
def _steps(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
           IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr, HAS_DOCS: gl.constexpr):
    """(first query tile, query tiles per query head, steps): the walk every partition takes."""
    if HAS_DOCS:
        first, n_tiles = _document_query_tiles(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M, BLOCK_N,
                                               IS_CAUSAL, GROUP)
    else:
        first, n_tiles = _query_tiles(start_n, n_queries, BLOCK_M, IS_CAUSAL)
    return first, n_tiles, n_tiles * GROUP


@gluon.jit
def _load_partition(q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                    lse_smem, delta_smem, bars, start_ptr, end_ptr, n_queries, n_heads, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr,
                    HAS_DOCS: gl.constexpr, HEADS_FIRST: gl.constexpr):
    """K and V of this CTA's keys, then each step's Q, dO, L and Delta into ring slot it % NUM_STAGES."""
    kv_ready, ready, empty, _, _, _ = bars
    bh, start_n = _cta(BLOCK_N, HEADS_FIRST)
    b, h = bh // n_heads, bh % n_heads
    mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, h, start_n, 0], kv_ready, k_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [b, h, start_n, 0], kv_ready, v_smem.index(0))
    first, n_tiles, n_steps = _steps(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M, BLOCK_N, IS_CAUSAL,
                                     GROUP, HAS_DOCS)
    for it in range(n_steps):
        stage = it % NUM_STAGES
        # A fresh mbarrier counts as having completed the phase before phase 0: the first NUM_STAGES
        # waits pass at once.
        mbarrier.wait(empty.index(stage), ((it // NUM_STAGES) & 1) ^ 1)
        row, h_q, tile = _query_step(it, 0, first, n_tiles, bh, h, GROUP)
        _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, b, h_q,
                   row, tile, stage)


@gluon.jit
def _mma_partition(half: gl.constexpr, dk_desc, dv_desc, dq_desc, k_smem, v_smem, q_smem, do_smem, lse_smem,
                   delta_smem, ds_smem, dq_smem, bars, start_ptr, end_ptr, n_queries, n_keys, n_heads, qk_scale,
                   sm_scale, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   NUM_STAGES: gl.constexpr, IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr, HAS_DOCS: gl.constexpr,
                   HEADS_FIRST: gl.constexpr):
    """Keys [half * 64, half * 64 + 64) of the CTA: their dK and dV, and dQ's columns [half * D/2, + D/2)."""
    kv_ready, ready, empty, ds_ready, ds_free, done = bars
    dtype: gl.constexpr = q_smem.dtype
    bh, start_n = _cta(BLOCK_N, HEADS_FIRST)
    b, h = bh // n_heads, bh % n_heads
    my_keys = start_n + half * KEYS
    # One warpgroup: 4 warps stacked along its 64 key rows; along the query rows for its dQ half.
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, HEAD_DIM // 2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    k_all = k_smem.index(0).reshape([BLOCK_N, HEAD_DIM])
    k_mine = k_all.slice(half * KEYS, KEYS)  # (64, D)
    v_mine = v_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).slice(half * KEYS, KEYS)
    k_cols = k_all.slice(half * (HEAD_DIM // 2), HEAD_DIM // 2, dim=1)  # (BLOCK_N, D/2): dQ's B operand
    dq_mine = dq_smem.index(half)  # (1, BLOCK_M, D/2) float32

    first, n_tiles, n_steps = _steps(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M, BLOCK_N, IS_CAUSAL,
                                     GROUP, HAS_DOCS)
    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, kv_layout)
    mbarrier.wait(kv_ready, 0)
    for it in range(n_steps):
        stage = it % NUM_STAGES
        buf = it % 2
        row, h_q, tile = _query_step(it, 0, first, n_tiles, bh, h, GROUP)
        start_m = tile * BLOCK_M
        if HAS_DOCS:
            key_start, key_end = _key_bounds(start_ptr, end_ptr, row, my_keys, n_keys, st_layout, KEYS)
        mbarrier.wait(ready.index(stage), (it // NUM_STAGES) & 1)
        q2 = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        do2 = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])

        zero_st = gl.zeros([KEYS, BLOCK_M], gl.float32, st_layout)
        st_tok = warpgroup_mma(k_mine, q2.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        s_t = warpgroup_mma_wait(0, deps=(st_tok,))
        if HAS_DOCS:
            p_t = _document_probabilities(s_t, lse_smem.index(stage), my_keys, start_m, qk_scale, key_start, key_end,
                                          st_layout, KEYS, BLOCK_M, IS_CAUSAL)
        else:
            p_t = _probabilities(s_t, lse_smem.index(stage), my_keys, start_m, n_keys, qk_scale, st_layout, KEYS,
                                 BLOCK_M, IS_CAUSAL)
        p_op = gl.convert_layout(p_t.to(dtype), a_layout)
        dpt_tok = warpgroup_mma(v_mine, do2.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, st_layout),
                                use_acc=False, is_async=True)
        dv_tok = warpgroup_mma(p_op, do2, dv, is_async=True)
        delta = _row_vector(delta_smem.index(stage), st_layout)
        dp_t = warpgroup_mma_wait(1, deps=(dpt_tok,))
        ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)

        # My half of dS^T into buffer `buf`, once both halves of step it - 2 have been read from it.
        mbarrier.wait(ds_free.index(buf), ((it // 2) & 1) ^ 1)
        ds_buf = ds_smem.index(buf)  # (BLOCK_N, BLOCK_M)
        ds_buf.slice(half * KEYS, KEYS).store(ds_t)
        fence_async_shared()
        gl.thread_barrier()  # this warpgroup's rows are all written (a partition-local barrier)
        mbarrier.arrive(ds_ready.index(buf), count=1)
        ds_op = gl.convert_layout(ds_t, a_layout)
        dk_tok = warpgroup_mma(ds_op, q2, dk, is_async=True)

        # dQ[:, my columns] = dS K[:, my columns], over all BLOCK_N keys: needs the other half of dS^T.
        mbarrier.wait(ds_ready.index(buf), (it // 2) & 1)
        zero_dq = gl.zeros([BLOCK_M, HEAD_DIM // 2], gl.float32, dq_layout)
        dq_tok = warpgroup_mma(ds_buf.permute((1, 0)), k_cols, zero_dq, use_acc=False, is_async=True)
        dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
        mbarrier.arrive(ds_free.index(buf), count=1)
        mbarrier.arrive(empty.index(stage), count=1)  # Q, dO, L, Delta of this slot: read by my wgmmas

        tma.store_wait(0)  # (the issuing thread) my previous dQ reduction has read dq_mine
        gl.thread_barrier()  # ... and every thread of this warpgroup knows it
        dq_mine.reshape([BLOCK_M, HEAD_DIM // 2]).store(dq)
        fence_async_shared()
        gl.thread_barrier()
        _reduce_add(dq_desc, [row, start_m, half * (HEAD_DIM // 2)], dq_mine)  # rows past Nq dropped

    # dK, dV out through my rows of the K and V buffers, once the other partition's last dQ wgmma has
    # read K (it reads all BLOCK_N rows) and its last dS^T read is done.
    tma.store_wait(0)
    mbarrier.arrive(done, count=1)
    mbarrier.wait(done, 0)
    k_mine.store((dk * sm_scale).to(dtype))
    v_mine.store(dv.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    # The same rows as 4-D (1, 1, 64, D) views for the descriptors (a reshape of a slice is not
    # supported in triton 3.6, a slice of the 4-D buffer is).
    tma.async_copy_shared_to_global(dk_desc, [b, h, my_keys, 0], k_smem.index(0).slice(half * KEYS, KEYS, dim=2))
    tma.async_copy_shared_to_global(dv_desc, [b, h, my_keys, 0], v_smem.index(0).slice(half * KEYS, KEYS, dim=2))
    tma.store_wait(0)


@gluon.jit
def flash_bwd_ws_kernel(
    q_desc, k_desc, v_desc, do_desc,  # (B, Hq, Nq, D), (B, Hkv, Nk, D) x2, (B, Hq, Nq, D); blocks [1, 1, rows, D]
    dk_desc, dv_desc, dq_desc,  # (B, Hkv, Nk, D) x2, blocks [1, 1, 64, D]; (BH, Nq, D) float32, [1, BLOCK_M, D/2]
    lse_desc, delta_desc,  # (BH, Nq) float32 each, blocks [1, BLOCK_M]: L (natural log) and rowsum(O * dO)
    start_ptr, end_ptr,  # HAS_DOCS: (BH, Nq) int32 each, contiguous: query row i sees keys [start, end); else None
    n_queries, n_keys, n_heads, qk_scale, sm_scale,  # n_heads: K/V heads; qk_scale = sm_scale * log2(e)
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr, HAS_DOCS: gl.constexpr, MMA_REGS: gl.constexpr,
    HEADS_FIRST: gl.constexpr,
):
    """dK, dV of BLOCK_N keys of one K/V head; dQ_acc += dS K (unscaled) for each query tile they meet.
    dQ_acc must hold zeros first (the tl preprocess kernel writes them with Delta)."""
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [1] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + delta_desc.block_type.shape,
                                           delta_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [2] + dq_desc.block_type.shape, dq_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(done, count=2)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both MMA partitions release a slot
    for i in gl.static_range(2):
        mbarrier.init(ds_ready.index(i), count=2)  # both halves of dS^T written
        mbarrier.init(ds_free.index(i), count=2)  # both dQ wgmmas done reading
    fence_async_shared()  # barrier inits visible to the TMA unit
    bars = (kv_ready, ready, empty, ds_ready, ds_free, done)

    # Arguments written out in the call (a tuple assigned first turns its constexprs into scalars in
    # triton 3.6; see kernels_fwd.flash_fwd_ws_kernel), the partition index a literal constexpr.
    gl.warp_specialize([
        (_mma_partition, (0, dk_desc, dv_desc, dq_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
                          ds_smem, dq_smem, bars, start_ptr, end_ptr, n_queries, n_keys, n_heads, qk_scale,
                          sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, IS_CAUSAL, GROUP, HAS_DOCS,
                          HEADS_FIRST)),
        (_mma_partition, (1, dk_desc, dv_desc, dq_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem,
                          ds_smem, dq_smem, bars, start_ptr, end_ptr, n_queries, n_keys, n_heads, qk_scale,
                          sm_scale, HEAD_DIM, BLOCK_M, BLOCK_N, NUM_STAGES, IS_CAUSAL, GROUP, HAS_DOCS,
                          HEADS_FIRST)),
        (_load_partition, (q_desc, k_desc, v_desc, do_desc, lse_desc, delta_desc, k_smem, v_smem, q_smem, do_smem,
                           lse_smem, delta_smem, bars, start_ptr, end_ptr, n_queries, n_heads, BLOCK_M, BLOCK_N,
                           NUM_STAGES, IS_CAUSAL, GROUP, HAS_DOCS, HEADS_FIRST)),
    ], [4, 1], [MMA_REGS, 24])
