"""One-pass FlashAttention backward for Hopper (sm_90), written in Gluon.

Same math as `ops.flash_attn.kernels_bwd_onepass` (5 matmuls and one exp per score; dQ summed
across CTAs, so its last bits vary from run to run): one CTA owns BLOCK_N = 128 keys of one head
and walks the query tiles that see them, BLOCK_M = 64 rows at a time. Per query tile, in log2
units (qk_scale = scale * log2 e, L2 = L * log2 e):

    S^T  = K Q^T            P^T = exp2(qk_scale S^T - L2)     dP^T = V dO^T
    dV  += P^T dO           dS^T = P^T * (dP^T - Delta)        dK  += dS^T Q
    dQ_tile = dS K  -> added into a float32 (BH, Nq, D) buffer by one TMA bulk reduction

What Gluon lets us write that `tl` (triton 3.6) did not:
  - every matmul is an async wgmma whose wait we place: dP^T runs while the exp of S^T is taken,
    dV while dS^T is formed, dK and dQ while the next tile's copies land;
  - P^T and dS^T feed the dV and dK wgmmas from registers (dK issued before the warpgroups meet);
    dS^T also goes to shared memory once, and its transposed view is the A operand of dQ (no
    register transpose);
  - Q and dO tiles stream through a NUM_STAGES-deep TMA ring on mbarriers, and each dQ tile leaves
    as one `cp.reduce.async.bulk.tensor` (Gluon 3.6 has the op in its builder but no wrapper:
    `_reduce_add` below).

Two warpgroups (num_warps = 8) split the key rows: each owns 64 keys of S^T, dP^T, dK and dV (one
wgmma M extent), and half of dQ's head-dim columns. They meet at thread barriers where dS^T and
the dQ tile cross between them.

Q, K, V, dO, dK and dV arrive as 4-D (B, H, N, D) host descriptors with their own strides (a
(B, N, H, D) layout seen through .transpose(1, 2) needs no copy); the float32 dQ accumulator as
(BH, Nq, D), L and Delta as (BH, Nq). Rows past a head's end read as zero and stores or reductions
past it are dropped. Zero query rows contribute nothing (dO = 0 there, and L = 0
keeps P finite); keys past Nk would have P = exp2(-L2), so the ragged key tile is masked.

GQA (constexpr GROUP): a CTA owns keys of one K/V head and walks the query tiles of each of the
GROUP query heads that read it, one head after another, so dK and dV need no atomics. Packed
documents (constexpr HAS_DOCS): the query tiles are narrowed to the keys' documents and P^T is
masked by each key's query range. Without either the kernel is the one described above.
"""


from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E_C = gl.constexpr(1.4426950408889634)


@builtin
def _reduce_add(tensor_desc, coord, src, _semantic=None):
    """global[desc at coord] += src (shared memory), by the TMA unit: `cp.reduce.async.bulk.tensor`.
    Completes like a TMA store: `tma.store_wait` before src is written again."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _query_tiles(start_n, n_queries, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """(first query tile, number of query tiles) that see keys from start_n on."""
    first = 0
    if IS_CAUSAL:
        first = start_n // BLOCK_M  # top-left aligned: row r sees keys <= r
    return first, gl.maximum(gl.cdiv(n_queries, BLOCK_M) - first, 0)


@gluon.jit
def _document_query_tiles(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          IS_CAUSAL: gl.constexpr, GROUP: gl.constexpr):
    """Packed documents: (first query tile, number of query tiles) that see keys [start_n, start_n +
    BLOCK_N) in any of the GROUP query rows of K/V row bh: from the first key's document start
    (causal: the first key) to the last key's document end. Nq == Nk."""
    last = gl.minimum(start_n + BLOCK_N, n_queries) - 1  # the last real key
    lo = start_n
    hi = start_n + 1
    for g in gl.static_range(GROUP):
        row0 = (bh * GROUP + g).to(gl.int64) * n_queries
        if not IS_CAUSAL:
            lo = gl.minimum(lo, gl.load(start_ptr + row0 + start_n))
        hi = gl.maximum(hi, gl.load(end_ptr + row0 + last))
    first = lo // BLOCK_M
    return first, gl.cdiv(hi, BLOCK_M) - first


@gluon.jit
def _query_step(it, ahead: gl.constexpr, first, n_tiles, bh, h, GROUP: gl.constexpr):
    """Step `it + ahead` of the walk over the group's query rows (GQA: the GROUP query heads that read
    this K/V head, n_tiles query tiles each, one after another): (its query row b * Hq + h_q, h_q,
    query tile). Without GQA the row is bh and the tile first + it + ahead (summed in that order: the
    kernel's instructions stay those it had before GQA). Walking each tile through all GROUP heads
    before the next tile instead measured slower (docs/perf/flash_attention_gluon.md)."""
    if GROUP == 1:
        row, h_q, tile = bh, h, first + it + ahead
    else:
        step = it + ahead
        g = step // n_tiles
        row, h_q, tile = bh * GROUP + g, h * GROUP + g, first + step - g * n_tiles
    return row, h_q, tile


@gluon.jit
def _key_bounds(start_ptr, end_ptr, row, start_n, n_keys, st_layout: gl.constexpr, BLOCK_N: gl.constexpr):
    """Packed documents: the query range [start, end) of each of this CTA's keys in query row `row`
    (query i sees key j iff start[j] <= i < end[j], the same documents seen from the key); empty
    past Nk."""
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
    row0 = row.to(gl.int64) * n_keys
    real = keys < n_keys
    return (gl.load(start_ptr + row0 + keys, mask=real, other=0),
            gl.load(end_ptr + row0 + keys, mask=real, other=0))


@gluon.jit
def _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, b, h, bh,
               tile, stage):
    """TMA copies of query tile `tile` (Q, dO, and its rows of L and Delta) into ring slot `stage`."""
    rows: gl.constexpr = q_desc.block_type.shape[2]
    nbytes: gl.constexpr = (q_desc.block_type.nbytes + do_desc.block_type.nbytes + lse_desc.block_type.nbytes
              + delta_desc.block_type.nbytes)
    bar = ready.index(stage)
    mbarrier.expect(bar, nbytes)
    tma.async_copy_global_to_shared(q_desc, [b, h, tile * rows, 0], bar, q_smem.index(stage))
    tma.async_copy_global_to_shared(do_desc, [b, h, tile * rows, 0], bar, do_smem.index(stage))
    tma.async_copy_global_to_shared(lse_desc, [bh, tile * rows], bar, lse_smem.index(stage))
    tma.async_copy_global_to_shared(delta_desc, [bh, tile * rows], bar, delta_smem.index(stage))


@gluon.jit
def _probabilities(s_t, lse_smem, start_n, start_m, n_keys, qk_scale,
                   st_layout: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, IS_CAUSAL: gl.constexpr):
    """P^T = exp2(qk_scale S^T - L2) for one tile, zero where a key is past Nk or, causal, after
    the query. Rows past Nq have L = 0 (TMA fills zeros): P stays finite, and dO = 0 there."""
    lse2 = _row_vector(lse_smem, st_layout) * LOG2E_C
    p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
    ragged = start_n + BLOCK_N > n_keys
    diagonal = IS_CAUSAL and start_m < start_n + BLOCK_N
    if ragged or diagonal:
        keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
        keep = gl.expand_dims(keys, 1) < n_keys
        if IS_CAUSAL:
            rows = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout))
            keep = keep & (gl.expand_dims(keys, 1) <= gl.expand_dims(rows, 0))
        p_t = gl.where(keep, p_t, 0.0)
    return p_t


@gluon.jit
def _document_probabilities(s_t, lse_smem, start_n, start_m, qk_scale, key_start, key_end,
                            st_layout: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
                            IS_CAUSAL: gl.constexpr):
    """_probabilities with packed documents: P^T zero unless the query lies in the key's document
    [key_start, key_end) (empty for keys past Nk) and, causal, at or after the key."""
    lse2 = _row_vector(lse_smem, st_layout) * LOG2E_C
    p_t = gl.exp2(s_t * qk_scale - gl.expand_dims(lse2, 0))
    rows = gl.expand_dims(start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, st_layout)), 0)
    keep = (rows >= gl.expand_dims(key_start, 1)) & (rows < gl.expand_dims(key_end, 1))
    if IS_CAUSAL:
        keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, st_layout))
        keep = keep & (gl.expand_dims(keys, 1) <= rows)
    return gl.where(keep, p_t, 0.0)


@gluon.jit
def _row_vector(smem, st_layout: gl.constexpr):
    """A (1, BLOCK_M) float32 tile in shared memory as a vector along S^T's columns."""
    return smem.reshape([smem.shape[1]]).load(gl.SliceLayout(0, st_layout))


@gluon.jit
def flash_bwd_gluon_kernel(
    q_desc, k_desc, v_desc, do_desc,  # (B, H, Nq, D), (B, H, Nk, D) x2, (B, H, Nq, D); blocks [1, 1, rows, D]
    dk_desc, dv_desc, dq_desc,  # (B, H, Nk, D) x2 in the input dtype; (BH, Nq, D) float32 accumulator
    lse_desc, delta_desc,  # (BH, Nq) float32 each, blocks [1, rows]: L (natural log) and rowsum(O * dO)
    start_ptr, end_ptr,  # HAS_DOCS: (BH, Nq) int32 each, contiguous: query row i sees keys [start, end); else None
    n_queries, n_keys, n_heads, qk_scale, sm_scale,  # n_heads: K/V heads; qk_scale = sm_scale * log2(e)
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
    IS_CAUSAL: gl.constexpr, EARLY_DP: gl.constexpr, DK_FROM_REGISTERS: gl.constexpr, GROUP: gl.constexpr,
    HAS_DOCS: gl.constexpr,
):
    """dK, dV of BLOCK_N keys of one K/V head; dQ_acc += dS K (unscaled) for each query tile they meet,
    in each of the GROUP query heads that read this K/V head (GQA: Q, dO, dQ, L, Delta have GROUP
    times the heads; query head h_q reads K/V head h_q // GROUP). dQ_acc must hold zeros first (the
    tl preprocess kernel writes them with Delta)."""
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    b, h = bh // n_heads, bh % n_heads  # K/V descriptor coordinates of flat K/V head bh = b * Hkv + h
    start_n = gl.program_id(0) * BLOCK_N

    # Two warpgroups stacked along the key rows for S^T, dP^T, dK, dV; along D for the dQ tile.
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                        instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                        instr_shape=[16, HEAD_DIM, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                        instr_shape=[16, HEAD_DIM // 2, 16])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)

    k_smem = gl.allocate_shared_memory(dtype, [1] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1] + v_desc.block_type.shape, v_desc.layout)
    q_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + q_desc.block_type.shape, q_desc.layout)
    do_smem = gl.allocate_shared_memory(dtype, [NUM_STAGES] + do_desc.block_type.shape, do_desc.layout)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + lse_desc.block_type.shape, lse_desc.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [NUM_STAGES] + delta_desc.block_type.shape, delta_desc.layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, dq_desc.block_type.shape, dq_desc.layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # barrier inits visible to the TMA unit

    mbarrier.expect(kv_ready, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [b, h, start_n, 0], kv_ready, k_smem.index(0))
    tma.async_copy_global_to_shared(v_desc, [b, h, start_n, 0], kv_ready, v_smem.index(0))
    if HAS_DOCS:
        first, n_tiles = _document_query_tiles(bh, start_n, n_queries, start_ptr, end_ptr, BLOCK_M, BLOCK_N,
                                               IS_CAUSAL, GROUP)
    else:
        first, n_tiles = _query_tiles(start_n, n_queries, BLOCK_M, IS_CAUSAL)
    n_steps = n_tiles * GROUP  # query tiles of every query head in the group
    for i in gl.static_range(NUM_STAGES):
        if i < n_steps:
            row, h_q, tile = _query_step(i, 0, first, n_tiles, bh, h, GROUP)
            _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, b, h_q,
                       row, tile, i)

    kv_slot = 0
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    mbarrier.wait(kv_ready, 0)

    for it in range(n_steps):
        stage = it % NUM_STAGES
        row, h_q, tile = _query_step(it, 0, first, n_tiles, bh, h, GROUP)
        start_m = tile * BLOCK_M
        if HAS_DOCS:
            key_start, key_end = _key_bounds(start_ptr, end_ptr, row, start_n, n_keys, st_layout, BLOCK_N)
        mbarrier.wait(ready.index(stage), (it // NUM_STAGES) & 1)
        q2 = q_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])
        # Always 0, but not provably so: the wgmma descriptors of K and V are then rebuilt per tile
        # (a few integer adds) instead of hoisted out of the loop, which spilled them at D = 128.
        kv_slot = (kv_slot + n_keys) % n_keys
        k2 = k_smem.index(kv_slot).reshape([BLOCK_N, HEAD_DIM])
        v2 = v_smem.index(kv_slot).reshape([BLOCK_N, HEAD_DIM])
        do2 = do_smem.index(stage).reshape([BLOCK_M, HEAD_DIM])

        # EARLY_DP: S^T and dP^T issued together, so the exp of S^T runs while dP^T is on the tensor
        # cores; otherwise dP^T after P (32 fewer live registers at the exp; fewer spills at D = 128).
        # (Zero accumulators are made where used: hoisted, they would hold registers across the loop.)
        zero_st = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout)
        st_tok = warpgroup_mma(k2, q2.permute((1, 0)), zero_st, use_acc=False, is_async=True)
        if EARLY_DP:
            dpt_tok = warpgroup_mma(v2, do2.permute((1, 0)), zero_st, use_acc=False, is_async=True)
            s_t = warpgroup_mma_wait(1, deps=(st_tok,))
        else:
            s_t = warpgroup_mma_wait(0, deps=(st_tok,))
        if HAS_DOCS:
            p_t = _document_probabilities(s_t, lse_smem.index(stage), start_n, start_m, qk_scale, key_start, key_end,
                                          st_layout, BLOCK_N, BLOCK_M, IS_CAUSAL)
        else:
            p_t = _probabilities(s_t, lse_smem.index(stage), start_n, start_m, n_keys, qk_scale,
                                 st_layout, BLOCK_N, BLOCK_M, IS_CAUSAL)
        p_op = gl.convert_layout(p_t.to(dtype), a_layout)
        if not EARLY_DP:
            dpt_tok = warpgroup_mma(v2, do2.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_M], gl.float32, st_layout),
                                    use_acc=False, is_async=True)
        dv_tok = warpgroup_mma(p_op, do2, dv, is_async=True)
        delta = _row_vector(delta_smem.index(stage), st_layout)  # read late: fewer live registers
        dp_t = warpgroup_mma_wait(1, deps=(dpt_tok,))

        # dS^T while dV runs, into shared memory: through its transposed view the A operand of dQ,
        # which needs both warpgroups' rows. DK_FROM_REGISTERS: dK takes this warpgroup's rows from
        # registers and is issued before the barrier (it runs while the warpgroups meet, and reads
        # 16 KB less shared memory a tile); otherwise from shared memory after it (fewer registers).
        ds_t = (p_t * (dp_t - gl.expand_dims(delta, 0))).to(dtype)
        ds_smem.store(ds_t)
        if DK_FROM_REGISTERS:
            ds_op = gl.convert_layout(ds_t, a_layout)
            dk_tok = warpgroup_mma(ds_op, q2, dk, is_async=True)
        tma.store_wait(0)  # (the issuing thread) the previous tile's dQ reduction has read dq_smem
        fence_async_shared()
        gl.thread_barrier()  # dS^T complete in shared memory; dq_smem free for every thread
        if not DK_FROM_REGISTERS:
            ds_op = p_op  # (nothing more to keep alive)
            dk_tok = warpgroup_mma(ds_smem, q2, dk, is_async=True)
        zero_dq = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
        dq_tok = warpgroup_mma(ds_smem.permute((1, 0)), k2, zero_dq, use_acc=False, is_async=True)
        dv, dk, dq, p_op, ds_op = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, dq_tok, p_op, ds_op))
        dq_smem.reshape([BLOCK_M, HEAD_DIM]).store(dq)
        fence_async_shared()
        # Both warpgroups are past their last wgmma of this tile: stage and dS^T are free, and the
        # dQ tile is complete in shared memory.
        gl.thread_barrier()
        if it + NUM_STAGES < n_steps:
            next_row, next_h, next_tile = _query_step(it, NUM_STAGES, first, n_tiles, bh, h, GROUP)
            _load_tile(q_desc, do_desc, lse_desc, delta_desc, q_smem, do_smem, lse_smem, delta_smem, ready, b, next_h,
                       next_row, next_tile, stage)
        _reduce_add(dq_desc, [row, start_m, 0], dq_smem)  # rows past Nq dropped

    # dK, dV out through the K and V buffers (their last readers were waited for above).
    k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).store((dk * sm_scale).to(dtype))
    v_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).store(dv.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(dk_desc, [b, h, start_n, 0], k_smem.index(0))  # clipped at Nk
    tma.async_copy_shared_to_global(dv_desc, [b, h, start_n, 0], v_smem.index(0))
    tma.store_wait(0)
