"""FlashAttention-2 backward kernels: one pass owning query tiles (dQ, and D = rowsum(O * dO)),
then one owning key tiles (dK, dV).

Each program writes only its own tile of the output, so there are no atomics and results are
deterministic. P is recomputed from L (saved by the forward): P = exp2(S2 - L * log2(e)).

Grouped-query attention (G = group query rows per K/V row): the dQ pass reads K/V row bh // G, as
the forward does; a dK/dV program owns a key tile of one K/V row and loops over its G query rows,
summing their parts in registers (still no atomics, still deterministic). Packed documents
(HAS_DOCS): a key tile visits only the query tiles of its keys' documents (`document_query_ranges`,
the mirror of kernels.document_key_ranges), with the same symmetric per-tile masks.
"""

import triton
import triton.language as tl

from ops.flash_attn.kernels import (
    LOG2E_C,
    document_key_ranges,
    key_ranges,
    load_rows,
    query_tile,
    row_documents,
    store_rows,
    visible,
)


@triton.jit
def rowsum_product(o, do):
    """D = rowsum(O * dO) in float32 for (rows, BLOCK_D) tiles: the softmax-Jacobian term of each query row."""
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def key_tile(K, V, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, n_keys,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(K/V row, first key, keys, columns, k, v) of this program's key tile, for grids (key tiles, BHkv)."""
    bh = tl.program_id(1).to(tl.int64)
    start_n = tl.program_id(0) * BLOCK_N
    keys = start_n + tl.arange(0, BLOCK_N)
    cols_d = tl.arange(0, BLOCK_D)
    k = load_rows(K + bh * stride_kb, keys, cols_d, stride_kn, stride_kd, n_keys, HEAD_DIM, BLOCK_D, True)
    v = load_rows(V + bh * stride_vb, keys, cols_d, stride_vn, stride_vd, n_keys, HEAD_DIM, BLOCK_D, True)
    return bh, start_n, keys, cols_d, k, v


@triton.jit
def query_ranges(start_n, n_queries, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(lo, diag_end, full_end, q_end) for the key tile at start_n: query tiles [lo, diag_end) and
    [full_end, q_end) need masks, [diag_end, full_end) need none."""
    q_end = tl.cdiv(n_queries, BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # Query tiles before `lo` see none of these keys; [lo, diag_end) straddle the diagonal.
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_end = tl.maximum(lo, tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, q_end))
    else:
        lo = 0
        diag_end = 0
    full_end = tl.maximum(diag_end, (n_queries // BLOCK_M) * BLOCK_M)  # tiles wholly inside Nq
    return lo, diag_end, full_end, q_end


@triton.jit
def document_query_ranges(lo, diag_end, full_end, q_end, start_base, end_base, start_n, n_keys,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile-level skipping for packed documents: narrow query_ranges' four bounds for the key tile
    at start_n to the queries of its keys' documents. Query i sees key j iff they share a document,
    so the queries seeing key j are [start[j], end[j]) (start_base/end_base: this query row's (N,)
    bounds; Nq == Nk): tiles before the first key's start or after the last key's end are never
    visited, and [diag_end, full_end) keeps only the tiles inside every key's document (unmasked)."""
    last = tl.minimum(start_n + BLOCK_N, n_keys) - 1
    first_start, last_start = tl.load(start_base + start_n), tl.load(start_base + last)
    first_end, last_end = tl.load(end_base + start_n), tl.load(end_base + last)
    lo = tl.maximum(lo, (first_start // BLOCK_M) * BLOCK_M)  # causal: lo <= start_n already
    q_end = tl.minimum(q_end, tl.cdiv(last_end, BLOCK_M) * BLOCK_M)
    diag_end = tl.minimum(tl.maximum(diag_end, tl.cdiv(last_start, BLOCK_M) * BLOCK_M), q_end)
    full_end = tl.maximum(tl.minimum(full_end, (first_end // BLOCK_M) * BLOCK_M), diag_end)
    return lo, diag_end, full_end, q_end


@triton.jit
def dkdv_query_ranges(start_n, n_queries, n_keys, start_base, end_base,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """query_ranges, narrowed to the key tile's documents with HAS_DOCS."""
    lo, diag_end, full_end, q_end = query_ranges(start_n, n_queries, BLOCK_M, BLOCK_N, IS_CAUSAL)
    if HAS_DOCS:  # skips the query tiles of other documents
        lo, diag_end, full_end, q_end = document_query_ranges(lo, diag_end, full_end, q_end, start_base, end_base,
                                                              start_n, n_keys, BLOCK_M, BLOCK_N)
    return lo, diag_end, full_end, q_end


@triton.jit
def probabilities_t(k, q, lse_base, delta_base, rows, n_queries, qk_scale,
                     MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """(P^T (BLOCK_N, BLOCK_M) recomputed from L, unmasked; D of the query rows (BLOCK_M,))."""
    if MASKED:
        lse2 = tl.load(lse_base + rows, mask=rows < n_queries, other=0.0) * LOG2E_C
        delta = tl.load(delta_base + rows, mask=rows < n_queries, other=0.0)
    else:
        lse2 = tl.load(lse_base + rows) * LOG2E_C
        delta = tl.load(delta_base + rows)
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
    return tl.exp2(s_t - lse2[None, :]), delta


@triton.jit
def visible_t(keys, rows, n_keys, n_queries, key_start, key_end, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(len(keys), len(rows)) bool, the transpose of kernels.visible with query rows checked too;
    with documents, query i sees key j iff key_start[j] <= i < key_end[j] (the key's own document)."""
    keep = (keys[:, None] < n_keys) & (rows[None, :] < n_queries)
    if IS_CAUSAL:
        keep = keep & (keys[:, None] <= rows[None, :])
    if HAS_DOCS:
        keep = keep & (rows[None, :] >= key_start[:, None]) & (rows[None, :] < key_end[:, None])
    return keep


@triton.jit
def dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don, stride_dod,
                keys, key_start, key_end, cols_d, lo, hi, n_queries, n_keys, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), working on transposed scores."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_rows(q_base, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, MASKED)
        do = load_rows(do_base, rows, cols_d, stride_don, stride_dod, n_queries, HEAD_DIM, BLOCK_D, MASKED)
        dk, dv, _ = dkdv_step(dk, dv, k, v, q, do, lse_base, delta_base, keys, key_start, key_end, rows,
                               n_queries, n_keys, qk_scale, IS_CAUSAL, MASKED, PRECISION, HAS_DOCS)
    return dk, dv


@triton.jit
def dkdv_step(dk, dv, k, v, q, do, lse_base, delta_base, keys, key_start, key_end, rows, n_queries, n_keys,
               qk_scale, IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
               HAS_DOCS: tl.constexpr):
    """Fold one query tile (q, do) into the key tile's dK, dV; also returns dS^T (BLOCK_N, BLOCK_M)
    in q's dtype, from which the one-pass backward forms its dQ part."""
    p_t, delta = probabilities_t(k, q, lse_base, delta_base, rows, n_queries, qk_scale, MASKED, PRECISION)
    if MASKED:
        # Padded keys have k = 0 but P = exp2(-L), which may overflow; inf * 0 would poison dQ.
        p_t = tl.where(visible_t(keys, rows, n_keys, n_queries, key_start, key_end, IS_CAUSAL, HAS_DOCS), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # one cast for the dK and dQ dots
    dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    return dk, dv, ds_t


@triton.jit
def dkdv_query_row(dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_base, end_base,
                    stride_qn, stride_qd, stride_don, stride_dod, start_n, keys, cols_d, n_queries, n_keys, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Fold into the key tile's dK, dV every query tile of one query row (a head of the group) that
    sees its keys: masked [lo, diag_end), unmasked [diag_end, full_end), masked [full_end, q_end)."""
    key_start, key_end = row_documents(start_base, end_base, keys, n_keys, HAS_DOCS)
    lo, diag_end, full_end, q_end = dkdv_query_ranges(start_n, n_queries, n_keys, start_base, end_base,
                                                      BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_DOCS)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don,
                         stride_dod, keys, key_start, key_end, cols_d, lo, diag_end, n_queries, n_keys, qk_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don,
                         stride_dod, keys, key_start, key_end, cols_d, diag_end, full_end, n_queries, n_keys,
                         qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, False, PRECISION, HAS_DOCS)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd, stride_don,
                         stride_dod, keys, key_start, key_end, cols_d, full_end, q_end, n_queries, n_keys, qk_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    return dk, dv


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # (BH,Nq,D) (BHkv,Nk,D) x2 (BH,Nq,D) (BH,Nq) (BH,Nq) (BHkv,Nk,D) x2
    START, END,  # (BH, Nq) int32: each query's document [start, end) (read only with HAS_DOCS)
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
    stride_dkb, stride_dkn, stride_dkd, stride_dvb, stride_dvn, stride_dvd,
    n_queries, n_keys, group, qk_scale, sm_scale,  # group = BH / BHkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr = False,
):
    """dV = P^T dO and dK = scale * dS^T Q for one BLOCK_N key tile of one K/V row, summed over the
    `group` query rows that read it (in a fixed order, in registers: deterministic).

    Rows of dK/dV do not mix and padded key rows (>= Nk) are never stored, so the masks (the same
    as the one-pass backward's, visible_t) only need to be right for real keys.
    """
    kv, start_n, keys, cols_d, k, v = key_tile(K, V, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn,
                                                stride_vd, n_keys, HEAD_DIM, BLOCK_D, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        bh = kv * group + g  # heads are innermost: K/V row kv serves query rows kv*G .. kv*G + G-1
        dk, dv = dkdv_query_row(dk, dv, k, v, Q + bh * stride_qb, DO + bh * stride_dob, LSE + bh * n_queries,
                                 DELTA + bh * n_queries, START + bh * n_queries, END + bh * n_queries,
                                 stride_qn, stride_qd, stride_don, stride_dod, start_n, keys, cols_d, n_queries,
                                 n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, PRECISION,
                                 HAS_DOCS)
    store_rows(DK + kv * stride_dkb, dk * sm_scale, keys, cols_d, stride_dkn, stride_dkd, n_keys, HEAD_DIM)
    store_rows(DV + kv * stride_dvb, dv, keys, cols_d, stride_dvn, stride_dvd, n_keys, HEAD_DIM)


@triton.jit
def dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              rows, row_start, row_end, cols_d, lo, hi, n_keys, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        k = load_rows(k_base, keys, cols_d, stride_kn, stride_kd, n_keys, HEAD_DIM, BLOCK_D, MASKED)
        v = load_rows(v_base, keys, cols_d, stride_vn, stride_vd, n_keys, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            # Padded keys must be zeroed here: their P could overflow and dQ sums over keys.
            p = tl.where(visible(rows, keys, n_keys, row_start, row_end, IS_CAUSAL, HAS_DOCS), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,  # DELTA (BH, Nq) float32 is written here, for the dK/dV pass; K, V (BHkv, Nk, D)
    START, END,  # (BH, Nq) int32: each query's document [start, end) (read only with HAS_DOCS)
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od, stride_dob, stride_don, stride_dod,
    stride_dqb, stride_dqn, stride_dqd,
    n_queries, n_keys, group, qk_scale, sm_scale,  # group = BH / BHkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr = False,
):
    """dQ = scale * dS K for one BLOCK_M query tile of one head, and D = rowsum(O * dO) of its rows.

    This pass owns query rows, so it computes their D itself and stores it for the dK/dV pass,
    which runs after it: no separate preprocess launch (a launch costs tens of microseconds of
    host time, as much as the whole kernel at small sizes).
    """
    bh, start_m, rows = query_tile(BLOCK_M, IS_CAUSAL)
    cols_d = tl.arange(0, BLOCK_D)
    start_base, end_base = START + bh * n_queries, END + bh * n_queries
    row_start, row_end = row_documents(start_base, end_base, rows, n_queries, HAS_DOCS)
    q = load_rows(Q + bh * stride_qb, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, True)
    do = load_rows(DO + bh * stride_dob, rows, cols_d, stride_don, stride_dod, n_queries, HEAD_DIM, BLOCK_D, True)
    o = load_rows(O + bh * stride_ob, rows, cols_d, stride_on, stride_od, n_queries, HEAD_DIM, BLOCK_D, True)
    delta = rowsum_product(o, do)
    tl.store(DELTA + bh * n_queries + rows, delta, mask=rows < n_queries)
    lse2 = tl.load(LSE + bh * n_queries + rows, mask=rows < n_queries, other=0.0) * LOG2E_C
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv = bh // group  # this query row's K/V row (grouped-query attention)
    k_base, v_base = K + kv * stride_kb, V + kv * stride_vb
    full_end, end = key_ranges(start_m, n_keys, BLOCK_M, BLOCK_N, IS_CAUSAL)
    full_lo = 0
    if HAS_DOCS:  # skips the key tiles of other documents; masks the tiles on document edges
        lo, full_lo, full_end, end = document_key_ranges(full_end, end, start_base, end_base, start_m,
                                                         n_queries, BLOCK_M, BLOCK_N)
        dq = dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, rows,
                       row_start, row_end, cols_d, lo, full_lo, n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                       IS_CAUSAL, True, PRECISION, HAS_DOCS)
    dq = dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, rows,
                   row_start, row_end, cols_d, full_lo, full_end, n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                   IS_CAUSAL, False, PRECISION, HAS_DOCS)
    dq = dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, rows,
                   row_start, row_end, cols_d, full_end, end, n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N,
                   IS_CAUSAL, True, PRECISION, HAS_DOCS)
    store_rows(DQ + bh * stride_dqb, dq * sm_scale, rows, cols_d, stride_dqn, stride_dqd, n_queries, HEAD_DIM)
