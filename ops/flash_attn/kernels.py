"""FlashAttention-2 Triton forward kernel and the tile helpers the backward kernels share.

Layout: every tensor is viewed as (BH, N, D) with arbitrary strides (passed in), so
non-contiguous inputs need no copy. L and D are contiguous (BH, Nq) float32.

Scores are kept in the log2 domain: S2 = (q . k) * scale * log2(e), so softmax uses exp2 and the
log2(e) factor costs nothing extra. The returned L is converted back to natural log.

Causal masking is top-left aligned (query i sees keys j <= i). Key tiles wholly above the diagonal
are never visited; tiles wholly below it take the unmasked path; only diagonal tiles and the
ragged last tile (N not a multiple of the block) pay for masks. Head dims that are not a power of
two are padded to BLOCK_D inside the kernel by masked loads.

Grouped-query attention: K and V may have fewer rows than Q (Hkv = Hq / GROUP heads, heads
innermost in the BH dim), so query row bh reads kv row bh // group.

Packed documents (constexpr HAS_DOCS; no code when off): START/END (BH, N) int32 hold each query's
document [start, end) (documents.py). A query tile visits only the key tiles between its first
row's start and its last row's end (`document_key_ranges`), like the causal skip above the
diagonal; tiles inside every row's document take the unmasked path, the others mask per row.
"""

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # Python float, for launchers
# Kernels may only read globals that are constexpr.
LOG2E_C = tl.constexpr(LOG2E)
LN2_C = tl.constexpr(0.6931471805599453)
# The running max a row starts from when documents are packed: finite, because a row may see no key
# of the first tiles its query tile visits (another document's), and exp2(-inf - (-inf)) is NaN.
NO_SCORE_C = tl.constexpr(-1.0e30)


@triton.jit
def load_rows(base, rows, cols, stride_row, stride_col, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile; rows >= n_rows and cols >= HEAD_DIM read as 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        mask = rows[:, None] < n_rows
        if HEAD_DIM != BLOCK_D:
            mask = mask & (cols[None, :] < HEAD_DIM)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def store_rows(base, tile, rows, cols, stride_row, stride_col, n_rows, HEAD_DIM: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM))


@triton.jit
def key_ranges(start_m, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """For the query tile starting at start_m: (end of unmasked key tiles, end of all visible keys)."""
    if IS_CAUSAL:
        # A key tile is fully visible when its last key <= the tile's first query.
        full_end = (tl.minimum(start_m, n_keys) // BLOCK_N) * BLOCK_N
        end = tl.minimum(start_m + BLOCK_M, n_keys)
    else:
        full_end = (n_keys // BLOCK_N) * BLOCK_N
        end = n_keys
    return full_end, end


@triton.jit
def document_key_ranges(full_end, end, start_base, end_base, start_m, n_queries,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile-level skipping for packed documents: narrow key_ranges' (full_end, end) for the query
    tile at start_m to (lo, full_lo, full_end, end). Key tiles [lo, full_lo) and [full_end, end)
    are masked, [full_lo, full_end) lie inside every row's document (unmasked), and tiles outside
    [lo, end) hold no key of these rows' documents: they are never visited.

    start_base/end_base point at this head's (N,) document bounds; starts and ends never decrease
    along the sequence, so the first and last rows of the tile bound all of them."""
    last = tl.minimum(start_m + BLOCK_M, n_queries) - 1
    first_start, last_start = tl.load(start_base + start_m), tl.load(start_base + last)
    first_end, last_end = tl.load(end_base + start_m), tl.load(end_base + last)
    lo = (first_start // BLOCK_N) * BLOCK_N
    end = tl.minimum(end, last_end)  # causal: end <= last + 1 <= last_end already
    full_lo = tl.minimum(tl.cdiv(last_start, BLOCK_N) * BLOCK_N, end)
    full_end = tl.maximum(tl.minimum(full_end, (first_end // BLOCK_N) * BLOCK_N), full_lo)
    return lo, full_lo, full_end, end


@triton.jit
def row_documents(start_base, end_base, rows, n_rows, HAS_DOCS: tl.constexpr):
    """(start, end) of each row's document, (len(rows),) int32 (rows >= n_rows: [0, n_rows)), or
    (0, 0) placeholders without documents."""
    if HAS_DOCS:
        start = tl.load(start_base + rows, mask=rows < n_rows, other=0)
        end = tl.load(end_base + rows, mask=rows < n_rows, other=n_rows)
    else:
        start, end = 0, 0
    return start, end


@triton.jit
def query_tile(BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """(head index, first row, rows) of this program's query tile, for grids (query tiles, BH)."""
    pid_m = tl.program_id(0)
    if IS_CAUSAL:
        pid_m = tl.num_programs(0) - 1 - pid_m  # the longest causal rows launch first
    bh = tl.program_id(1).to(tl.int64)
    start_m = pid_m * BLOCK_M
    return bh, start_m, start_m + tl.arange(0, BLOCK_M)


@triton.jit
def visible(rows, keys, n_keys, row_start, row_end, IS_CAUSAL: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(len(rows), len(keys)) bool: key exists, when causal is not after the query, and with
    documents lies in the query's document [row_start, row_end) (each (len(rows),))."""
    keep = keys[None, :] < n_keys
    if IS_CAUSAL:
        keep = keep & (keys[None, :] <= rows[:, None])
    if HAS_DOCS:
        keep = keep & (keys[None, :] >= row_start[:, None]) & (keys[None, :] < row_end[:, None])
    return keep


@triton.jit
def fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               rows, row_start, row_end, cols_d, lo, hi, n_keys, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr):
    """Online softmax over key tiles [lo, hi): returns the updated (acc, l_i, m_i)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        keys = start_n + offs_n
        k = load_rows(k_base, keys, cols_d, stride_kn, stride_kd, n_keys, HEAD_DIM, BLOCK_D, MASKED)
        v = load_rows(v_base, keys, cols_d, stride_vn, stride_vd, n_keys, HEAD_DIM, BLOCK_D, MASKED)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # (BLOCK_M, BLOCK_N), unscaled
        if MASKED:
            s = tl.where(visible(rows, keys, n_keys, row_start, row_end, IS_CAUSAL, HAS_DOCS), s, float("-inf"))
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, qk_scale, PRECISION)
    return acc, l_i, m_i


@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DOCS: tl.constexpr):
    """(acc, l_i, m_i) before the first key tile."""
    if HAS_DOCS:
        m_i = tl.full([BLOCK_M], NO_SCORE_C, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    return tl.zeros([BLOCK_M, BLOCK_D], tl.float32), tl.zeros([BLOCK_M], tl.float32), m_i


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, qk_scale, PRECISION: tl.constexpr):
    """Fold one key tile's raw scores s (BLOCK_M, BLOCK_N) and values v into (acc, l_i, m_i).

    The running max m_i is kept in log2 units. Scaling (qk_scale > 0) commutes with max, so the raw
    tile max is scaled once per row and the softmax argument is a single FMA per score.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the previous max
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def flash_fwd_kernel(
    Q, K, V, O, LSE,  # (BH, Nq, D), (BHkv, Nk, D), (BHkv, Nk, D), (BH, Nq, D), (BH, Nq) float32
    START, END,  # (BH, Nq) int32: each query's document [start, end) (read only with HAS_DOCS)
    stride_qb, stride_qn, stride_qd, stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd, stride_ob, stride_on, stride_od,
    n_queries, n_keys, group, qk_scale,  # group = BH / BHkv; qk_scale = softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr = False,
):
    """O = softmax(Q K^T * scale) V and L = logsumexp for one BLOCK_M query tile of one head."""
    bh, start_m, rows = query_tile(BLOCK_M, IS_CAUSAL)
    cols_d = tl.arange(0, BLOCK_D)
    kv = bh // group  # the K/V row this query row shares with the rest of its group
    k_base, v_base = K + kv * stride_kb, V + kv * stride_vb
    start_base, end_base = START + bh * n_queries, END + bh * n_queries
    row_start, row_end = row_documents(start_base, end_base, rows, n_queries, HAS_DOCS)

    q = load_rows(Q + bh * stride_qb, rows, cols_d, stride_qn, stride_qd, n_queries, HEAD_DIM, BLOCK_D, True)
    acc, l_i, m_i = softmax_init(BLOCK_M, BLOCK_D, HAS_DOCS)
    full_end, end = key_ranges(start_m, n_keys, BLOCK_M, BLOCK_N, IS_CAUSAL)
    full_lo = 0
    if HAS_DOCS:  # skips the key tiles of other documents; masks the tiles on document edges
        lo, full_lo, full_end, end = document_key_ranges(full_end, end, start_base, end_base, start_m,
                                                         n_queries, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                   rows, row_start, row_end, cols_d, lo, full_lo, n_keys, qk_scale,
                                   HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               rows, row_start, row_end, cols_d, full_lo, full_end, n_keys, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, False, PRECISION, HAS_DOCS)
    acc, l_i, m_i = fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                               rows, row_start, row_end, cols_d, full_end, end, n_keys, qk_scale,
                               HEAD_DIM, BLOCK_D, BLOCK_N, IS_CAUSAL, True, PRECISION, HAS_DOCS)
    acc = acc / l_i[:, None]
    store_rows(O + bh * stride_ob, acc, rows, cols_d, stride_on, stride_od, n_queries, HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * LN2_C  # back to natural log
    tl.store(LSE + bh * n_queries + rows, lse, mask=rows < n_queries)
