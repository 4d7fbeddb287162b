"""FlashAttention-2 backward in one pass over key tiles, with dQ summed across programs.

The two-pass backward (kernels_bwd.py) recomputes P in both passes: 7 matmuls and two exps per
score. Here each program owns a key tile, as the dK/dV pass does, and for every query tile it visits
also forms that tile's share of dQ, dS K, and adds it into a float32 accumulator: 5 matmuls and
one exp per score. The order of those additions depends on scheduling, so dQ is not bitwise
reproducible from run to run (dK and dV are); dispatch.py uses this kernel only when torch is not
asked for deterministic algorithms.

Two ways to move the streamed tiles (constexpr DESCRIPTORS):
  - descriptors (Hopper, what dispatch.py uses): q and dO tiles arrive by TMA copies and each dQ
    part leaves as one bulk reduction (cp.reduce.async.bulk), done by the copy engine. On an H100
    the backward ran 13 % faster this way than with relaxed per-element atomics (docs/perf/flash_attention.md);
  - pointers: masked loads and `tl.atomic_add(sem="relaxed")`. The interpreter runs only this one
    (it has no bulk reductions), so CI checks the kernel's math through it.

Three launches:
  1. preprocess: DELTA = rowsum(O * dO), and zeros into DQ_ACC (so no separate memset launch);
  2. one-pass: dK and dV stored per key tile; DQ_ACC += dS K (unscaled) per (key tile, query tile);
  3. convert: dQ = scale * DQ_ACC, cast to the input dtype and written with dQ's strides.

Grouped-query attention and packed documents as in kernels_bwd.py: a program owns a key tile of one
K/V row, loops over the G query rows that read it (dK, dV summed in registers, dQ parts added per
query row), and visits only the query tiles of its keys' documents.

DQ_ACC is a contiguous (BH, Nq, HEAD_DIM) float32 buffer. It has the real head dim, not BLOCK_D,
so a padded head dim (e.g. 80 -> 128) spends no atomics on padding columns, and its row stride is
the constexpr HEAD_DIM. The softmax scale is applied at conversion, once per element, instead of
to every dQ part inside the loop.
"""

import triton
import triton.language as tl

from ops.flash_attn.kernels import load_rows, row_documents, store_rows
from ops.flash_attn.kernels_bwd import dkdv_query_ranges, dkdv_step, key_tile, rowsum_product


@triton.jit
def atomic_add_rows(base, tile, rows, cols, n_rows,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """base[rows, cols] += tile in a contiguous (N, HEAD_DIM) float32 buffer; skips rows >= n_rows
    and cols >= HEAD_DIM. Relaxed: only the final sums matter, read after the kernel ends."""
    ptrs = base + rows[:, None] * HEAD_DIM + cols[None, :]
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (cols[None, :] < HEAD_DIM)
        tl.atomic_add(ptrs, tile, mask=mask, sem="relaxed")
    elif HEAD_DIM != BLOCK_D:
        tl.atomic_add(ptrs, tile, mask=cols[None, :] < HEAD_DIM, sem="relaxed")
    else:
        tl.atomic_add(ptrs, tile, sem="relaxed")


@triton.jit
def _onepass_query_ranges(start_n, n_queries, n_keys, start_base, end_base, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """kernels_bwd.dkdv_query_ranges (with its document skipping), except that a ragged last key
    tile masks every query tile."""
    lo, diag_end, full_end, q_end = dkdv_query_ranges(start_n, n_queries, n_keys, start_base, end_base,
                                                      BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_DOCS)
    # Unlike in the dK/dV pass, padded keys matter here (dQ sums over keys), so the ragged last key
    # tile masks every query tile it visits. It is one program of cdiv(Nk, BLOCK_N).
    ragged = start_n + BLOCK_N > n_keys
    diag_end = tl.where(ragged, tl.maximum(lo, q_end), diag_end)
    full_end = tl.where(ragged, diag_end, full_end)
    return lo, diag_end, full_end, q_end


@triton.jit
def _onepass_inner(dk, dv, k, v, Q, DO, DQ_ACC, bh, lse_base, delta_base, stride_qn, stride_qd, stride_don,
                   stride_dod, keys, key_start, key_end, cols_d, lo, hi, n_queries, n_keys, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                   DESCRIPTORS: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Accumulate dK, dV of one key tile over query tiles [lo, hi), and add each query tile's dQ
    part (dS K, unscaled) into DQ_ACC. Q, DO, DQ_ACC: descriptors over (BH, N, D) if DESCRIPTORS
    (bh is then the int32 head index), else pointers to this head's rows."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        if DESCRIPTORS:  # rows >= n_queries come back as zeros
            q = Q.load([bh, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = DO.load([bh, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            q = load_rows(Q, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, MASKED)
            do = load_rows(DO, rows, cols_d, stride_don, stride_dod, n_queries, HEAD_DIM, BLOCK_D, MASKED)
        dk, dv, ds_t = dkdv_step(dk, dv, k, v, q, do, lse_base, delta_base, keys, key_start, key_end, rows,
                                  n_queries, n_keys, qk_scale, IS_CAUSAL, MASKED, PRECISION, HAS_DOCS)
        dq_part = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)  # (BLOCK_M, BLOCK_D)
        if DESCRIPTORS:  # one bulk reduction by the copy engine; rows >= n_queries are dropped
            DQ_ACC.atomic_add([bh, start_m, 0], dq_part.reshape(1, BLOCK_M, BLOCK_D))
        else:
            atomic_add_rows(DQ_ACC, dq_part, rows, cols_d, n_queries, HEAD_DIM, BLOCK_D, MASKED)
    return dk, dv


@triton.jit
def _onepass_query_row(dk, dv, k, v, q_in, do_in, acc, head, lse_base, delta_base, start_base, end_base,
                       stride_qn, stride_qd, stride_don, stride_dod, start_n, keys, cols_d, n_queries, n_keys,
                       qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                       DESCRIPTORS: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Every query tile of one query row (a head of the group) that sees this key tile: dK, dV
    accumulated, dQ parts added. Masked [lo, diag_end), unmasked [diag_end, full_end), masked
    [full_end, q_end)."""
    key_start, key_end = row_documents(start_base, end_base, keys, n_keys, HAS_DOCS)
    lo, diag_end, full_end, q_end = _onepass_query_ranges(start_n, n_queries, n_keys, start_base, end_base,
                                                          BLOCK_M, BLOCK_N, IS_CAUSAL, HAS_DOCS)
    dk, dv = _onepass_inner(dk, dv, k, v, q_in, do_in, acc, head, lse_base, delta_base, stride_qn, stride_qd,
                            stride_don, stride_dod, keys, key_start, key_end, cols_d, lo, diag_end, n_queries,
                            n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION, DESCRIPTORS,
                            HAS_DOCS)
    dk, dv = _onepass_inner(dk, dv, k, v, q_in, do_in, acc, head, lse_base, delta_base, stride_qn, stride_qd,
                            stride_don, stride_dod, keys, key_start, key_end, cols_d, diag_end, full_end, n_queries,
                            n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, False, PRECISION, DESCRIPTORS,
                            HAS_DOCS)
    dk, dv = _onepass_inner(dk, dv, k, v, q_in, do_in, acc, head, lse_base, delta_base, stride_qn, stride_qd,
                            stride_don, stride_dod, keys, key_start, key_end, cols_d, full_end, q_end, n_queries,
                            n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, IS_CAUSAL, True, PRECISION, DESCRIPTORS,
                            HAS_DOCS)
    return dk, dv


@triton.jit
def flash_bwd_onepass_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,  # (BH,Nq,D) (BHkv,Nk,D) x2 (BH,Nq,D) (BH,Nq) x2 (BHkv,Nk,D) x2
    START, END,  # (BH, Nq) int32: each query's document [start, end) (read only with HAS_DOCS)
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,  # DQ_ACC: (BH,Nq,HEAD_DIM) f32
    stride_vb, stride_vn, stride_vd, stride_dob, stride_don, stride_dod,
    stride_dkb, stride_dkn, stride_dkd, stride_dvb, stride_dvn, stride_dvd,
    n_queries, n_keys, group, qk_scale, sm_scale,  # group = BH / BHkv
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, DESCRIPTORS: tl.constexpr = False,
    HAS_DOCS: tl.constexpr = False,
):
    """dV = P^T dO and dK = scale * dS^T Q for one BLOCK_N key tile of one K/V row (summed over the
    `group` query rows that read it), and DQ_ACC += dS K for every query tile it sees. DQ_ACC must
    hold zeros (the preprocess kernel writes them).

    With DESCRIPTORS, Q, DO and DQ_ACC are tensor descriptors with blocks [1, BLOCK_M, D] (TMA on
    Hopper: the streamed tiles need no address arithmetic in registers, and dQ parts go out as bulk
    reductions) and the Q/dO strides are unused; otherwise all three are pointers."""
    kv, start_n, keys, cols_d, k, v = key_tile(K, V, stride_kb, stride_kn, stride_kd, stride_vb, stride_vn,
                                                stride_vd, n_keys, HEAD_DIM, BLOCK_D, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(group):
        bh = kv * group + g  # heads are innermost: K/V row kv serves query rows kv*G .. kv*G + G-1
        if DESCRIPTORS:
            q_in, do_in, acc, head = Q, DO, DQ_ACC, bh.to(tl.int32)  # descriptor offsets are int32
        else:
            q_in, do_in, acc, head = Q + bh * stride_qb, DO + bh * stride_dob, DQ_ACC + bh * n_queries * HEAD_DIM, bh
        dk, dv = _onepass_query_row(dk, dv, k, v, q_in, do_in, acc, head, LSE + bh * n_queries,
                                    DELTA + bh * n_queries, START + bh * n_queries, END + bh * n_queries,
                                    stride_qn, stride_qd, stride_don, stride_dod, start_n, keys, cols_d, n_queries,
                                    n_keys, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, IS_CAUSAL, PRECISION,
                                    DESCRIPTORS, HAS_DOCS)
    store_rows(DK + kv * stride_dkb, dk * sm_scale, keys, cols_d, stride_dkn, stride_dkd, n_keys, HEAD_DIM)
    store_rows(DV + kv * stride_dvb, dv, keys, cols_d, stride_dvn, stride_dvd, n_keys, HEAD_DIM)


@triton.jit
def flash_bwd_onepass_preprocess_kernel(
    O, DO, DELTA, DQ_ACC,  # (B, H, Nq, D) x2 any strides, (BH, Nq) float32, (BH, Nq, HEAD_DIM) float32
    stride_ob, stride_oh, stride_on, stride_od, stride_dob, stride_doh, stride_don, stride_dod, n_queries, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DELTA = rowsum(O * dO), and zeros into this tile's rows of the dQ accumulator. O and dO come
    as (B, H) pairs of strides (program bh is head bh % H of batch bh // H), so a (B, N, H, D)
    layout seen through .transpose(1, 2) needs no copy; a (BH, N, D) array passes H = BH, stride_b 0."""
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    o = load_rows(O + b * stride_ob + h * stride_oh, rows, cols_d, stride_on, stride_od, n_queries, HEAD_DIM,
                  BLOCK_D, True)
    do = load_rows(DO + b * stride_dob + h * stride_doh, rows, cols_d, stride_don, stride_dod, n_queries,
                   HEAD_DIM, BLOCK_D, True)
    tl.store(DELTA + bh * n_queries + rows, rowsum_product(o, do), mask=rows < n_queries)
    zeros = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    store_rows(DQ_ACC + bh * n_queries * HEAD_DIM, zeros, rows, cols_d, HEAD_DIM, 1,
                n_queries, HEAD_DIM)


@triton.jit
def flash_bwd_onepass_dq_kernel(
    DQ_ACC, DQ,  # (BH, Nq, HEAD_DIM) float32 contiguous, (B, H, Nq, D) any strides (as the preprocess's O)
    stride_dqb, stride_dqh, stride_dqn, stride_dqd, n_queries, n_heads, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dQ = scale * DQ_ACC in dQ's dtype: the scale the one-pass kernel left out of its atomics."""
    bh = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols_d = tl.arange(0, BLOCK_D)
    acc = load_rows(DQ_ACC + bh * n_queries * HEAD_DIM, rows, cols_d, HEAD_DIM, 1, n_queries,
                     HEAD_DIM, BLOCK_D, True)  # (BLOCK_M, BLOCK_D)
    dq = DQ + (bh // n_heads) * stride_dqb + (bh % n_heads) * stride_dqh
    store_rows(dq, acc * sm_scale, rows, cols_d, stride_dqn, stride_dqd, n_queries, HEAD_DIM)
