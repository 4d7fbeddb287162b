"""FlashAttention-2 backward kernels: one pass owning query tiles (dQ, and D = rowsum(O * dO)),
then one owning key tiles (dK, dV).

Each program writes only its own tile of the output, so there are no atomics and results are
deterministic. P is recomputed from L (saved by the forward): P = exp2(S2 - L * log2(e)).
"""

import triton
import triton.language as tl

from ops.flash_attn.kernels import LOG2E_C, key_ranges, load_rows, query_tile, store_rows, visible


@triton.jit
def rowsum_product(o, do):
    """D = rowsum(O * dO) in float32 for (rows, BLOCK_D) tiles: the softmax-Jacobian term of each query row."""
    return tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)


@triton.jit
def key_tile(K, V, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn, stride_vd, n_keys,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """(head, first key, keys, columns, k, v) of this program's key tile, for grids (key tiles, BH)."""
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
def visible_t(keys, rows, n_keys, n_queries, IS_CAUSAL: tl.constexpr):
    """(len(keys), len(rows)) bool, the transpose of kernels.visible with query rows checked too."""
    keep = (keys[:, None] < n_keys) & (rows[None, :] < n_queries)
    if IS_CAUSAL:
        keep = keep & (keys[:, None] <= rows[None, :])
    return keep


@triton.jit
def dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                stride_qn, stride_qd, stride_don, stride_dod, keys, cols_d, lo, hi, n_queries, n_keys, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), working on transposed scores."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q = load_rows(q_base, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, MASKED)
        do = load_rows(do_base, rows, cols_d, stride_don, stride_dod, n_queries, HEAD_DIM, BLOCK_D, MASKED)
        dk, dv, _ = dkdv_step(dk, dv, k, v, q, do, lse_base, delta_base, keys, rows, n_queries, n_keys,
                               qk_scale, IS_CAUSAL, MASKED, PRECISION)
    return dk, dv


@triton.jit
def dkdv_step(dk, dv, k, v, q, do, lse_base, delta_base, keys, rows, n_queries, n_keys, qk_scale,
               IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one query tile (q, do) into the key tile's dK, dV; also returns dS^T (BLOCK_N, BLOCK_M)
    in q's dtype, from which the one-pass backward forms its dQ part."""
    p_t, delta = probabilities_t(k, q, lse_base, delta_base, rows, n_queries, qk_scale, MASKED, PRECISION)
    if MASKED:
        # Padded keys have k = 0 but P = exp2(-L), which may overflow; inf * 0 would poison dQ.
        p_t = tl.where(visible_t(keys, rows, n_keys, n_queries, IS_CAUSAL), p_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)  # one cast for the dK and dQ dots
    dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
    return dk, dv, ds_t


@triton.jit
def flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,  # (BH,Nq,D) (BH,Nk,D) (BH,Nk,D) (BH,Nq,D) (BH,Nq) (BH,Nq) (BH,Nk,D) x2
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
    stride_dkb, stride_dkn, stride_dkd, stride_dvb, stride_dvn, stride_dvd,
    n_queries, n_keys, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV = P^T dO and dK = scale * dS^T Q for one BLOCK_N key tile of one head.

    Rows of dK/dV do not mix and padded key rows (>= Nk) are never stored, so the masks (the same
    as the one-pass backward's, visible_t) only need to be right for real keys.
    """
    bh, start_n, keys, cols_d, k, v = key_tile(K, V, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn,
                                                stride_vd, n_keys, HEAD_DIM, BLOCK_D, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    q_base, do_base = Q + bh * stride_qb, DO + bh * stride_dob
    lse_base, delta_base = LSE + bh * n_queries, DELTA + bh * n_queries

    lo, diag_end, full_end, q_end = query_ranges(start_n, n_queries, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                         stride_don, stride_dod, keys, cols_d, lo, diag_end, n_queries, n_keys, qk_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                         stride_don, stride_dod, keys, cols_d, diag_end, full_end, n_queries, n_keys, qk_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, False, PRECISION)
    dk, dv = dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qn, stride_qd,
                         stride_don, stride_dod, keys, cols_d, full_end, q_end, n_queries, n_keys, qk_scale,
                         HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION)
    store_rows(DK + bh * stride_dkb, dk * sm_scale, keys, cols_d, stride_dkn, stride_dkd, n_keys, HEAD_DIM)
    store_rows(DV + bh * stride_dvb, dv, keys, cols_d, stride_dvn, stride_dvd, n_keys, HEAD_DIM)


@triton.jit
def dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              rows, cols_d, lo, hi, n_keys, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr):
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
            p = tl.where(visible(rows, keys, n_keys, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def flash_bwd_dq_kernel(
    Q, K, V, O, DO, LSE, DELTA, DQ,  # DELTA (BH, Nq) float32 is written here, for the dK/dV pass
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od, stride_dob, stride_don, stride_dod,
    stride_dqb, stride_dqn, stride_dqd,
    n_queries, n_keys, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ = scale * dS K for one BLOCK_M query tile of one head, and D = rowsum(O * dO) of its rows.

    This pass owns query rows, so it computes their D itself and stores it for the dK/dV pass,
    which runs after it: no separate preprocess launch (a launch costs tens of microseconds of
    host time, as much as the whole kernel at small sizes).
    """
    bh, start_m, rows = query_tile(BLOCK_M, IS_CAUSAL)
    cols_d = tl.arange(0, BLOCK_D)
    q = load_rows(Q + bh * stride_qb, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, True)
    do = load_rows(DO + bh * stride_dob, rows, cols_d, stride_don, stride_dod, n_queries, HEAD_DIM, BLOCK_D, True)
    o = load_rows(O + bh * stride_ob, rows, cols_d, stride_on, stride_od, n_queries, HEAD_DIM, BLOCK_D, True)
    delta = rowsum_product(o, do)
    tl.store(DELTA + bh * n_queries + rows, delta, mask=rows < n_queries)
    lse2 = tl.load(LSE + bh * n_queries + rows, mask=rows < n_queries, other=0.0) * LOG2E_C
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base, v_base = K + bh * stride_kb, V + bh * stride_vb
    full_end, end = key_ranges(start_m, n_keys, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   rows, cols_d, 0, full_end, n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False,
                   PRECISION)
    dq = dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                   rows, cols_d, full_end, end, n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True,
                   PRECISION)
    store_rows(DQ + bh * stride_dqb, dq * sm_scale, rows, cols_d, stride_dqn, stride_dqd, n_queries, HEAD_DIM)
