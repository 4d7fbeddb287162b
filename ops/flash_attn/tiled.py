"""FlashAttention-2 in pure PyTorch: the same tiles, online softmax and recomputation as the kernels.

This is the op's CPU implementation and the CS336 `FlashAttention2PyTorch` Function. It never
holds more than one (..., TILE, TILE) block of scores, so memory stays O(N * D) like the kernels.
Arithmetic is float32 whatever the input dtype; outputs are cast back.

Grouped-query heads: q (..., Hq, N, D) is viewed as (..., Hkv, G, N, D), G = Hq // Hkv, and each
query tile's G heads are multiplied as one (G * Tq)-row matrix against their kv head's tile, so k
and v are never copied per query head and dK, dV sum over the group inside the matmul.

Packed documents: per tile, the range of positions any of its rows can see (documents.py) bounds
the tile loops, so tiles wholly across documents are skipped; tiles that straddle a document edge
are masked with each row's [start, end).
"""

from __future__ import annotations

import torch

from ops.flash_attn.documents import document_bounds

# Tile edge for the CPU path: large enough that Python-loop overhead is small next to the matmuls.
TILE = 64
# The running max starts here, not at -inf: a row whose first visited key tile lies wholly in
# another document then gets p = exp(-inf - LOWEST) = 0 and alpha = exp(0) = 1, never -inf - -inf.
LOWEST = torch.finfo(torch.float32).min

Bounds = tuple[torch.Tensor, torch.Tensor]  # (start, end) of each query's document, (..., Hkv, G, N) int32


def _kv_heads(k: torch.Tensor) -> torch.Tensor:
    """k or v as (..., Hkv, Nk, D): a head dim of 1 added to a 2-D tensor."""
    return k if k.dim() >= 3 else k.unsqueeze(-3)


def _split_heads(x: torch.Tensor, hkv: int, dim: int) -> torch.Tensor:
    """x's query-head dim `dim` (-3 for (..., Hq, N, D), -2 for (..., Hq, N)) as (Hkv, G): a view."""
    if x.dim() < -dim:  # no head dim: one head
        x = x.unsqueeze(dim)
    return x.unflatten(dim, (hkv, x.shape[dim] // hkv if hkv else 1))


def _scores(q_i: torch.Tensor, k_j: torch.Tensor) -> torch.Tensor:
    """q_i (..., Hkv, G, Tq, D) @ k_j (..., Hkv, Tk, D)^T -> (..., Hkv, G, Tq, Tk), one matmul per kv head."""
    return (q_i.flatten(-3, -2) @ k_j.transpose(-1, -2)).unflatten(-2, q_i.shape[-3:-1])


def _times(p: torch.Tensor, x_j: torch.Tensor) -> torch.Tensor:
    """p (..., Hkv, G, Tq, Tk) @ x_j (..., Hkv, Tk, D) -> (..., Hkv, G, Tq, D)."""
    return (p.flatten(-3, -2) @ x_j).unflatten(-2, p.shape[-3:-1])


def _transposed_times(p: torch.Tensor, x_i: torch.Tensor) -> torch.Tensor:
    """p^T @ x_i summed over the group: p (..., Hkv, G, Tq, Tk), x_i (..., Hkv, G, Tq, D) -> (..., Hkv, Tk, D)."""
    return p.flatten(-3, -2).transpose(-1, -2) @ x_i.flatten(-3, -2)


def _bounds(document_ids: torch.Tensor | None, q: torch.Tensor, q5: torch.Tensor) -> Bounds | None:
    if document_ids is None:
        return None
    start, end = document_bounds(document_ids, q.shape[:-1])  # (R, N) each
    return start.view(q5.shape[:-1]), end.view(q5.shape[:-1])


def _tile_spans(bounds: Bounds | None, n: int, tile: int) -> list[list[int]] | None:
    """Per tile [t0, t1) of the sequence, over all rows: [lo, hi, inner_lo, inner_hi], where the
    tile's positions see others only in [lo, hi) and, in every row, all of [inner_lo, inner_hi).
    Ids are nondecreasing, so start and end are too: the extremes sit at t0 and t1 - 1.

    None (visit every tile, mask every tile with documents) without documents, and when traced by
    torch.compile (FlashAttention2PyTorch compiled): the spans are data, and reading them would
    break the graph."""
    if bounds is None or bounds[0].numel() == 0 or torch.compiler.is_compiling():
        return None
    start, end = (b.reshape(-1, n) for b in bounds)  # (R, N)
    first = torch.arange(0, n, tile, device=start.device)  # (T,)
    last = (first + tile).clamp(max=n) - 1
    spans = torch.stack([start[:, first].amin(0), end[:, last].amax(0), start[:, last].amax(0),
                         end[:, first].amin(0)], dim=1)  # (T, 4)
    return spans.tolist()  # one host read for the whole call


def _span(spans: list[list[int]] | None, position: int, tile: int, n_other: int) -> list[int]:
    """The span of the tile at `position`; without spans all of [0, n_other), none of it surely visible."""
    return [0, n_other, n_other, 0] if spans is None else spans[position // tile]


def _keep_mask(i: int, j: int, n_q: int, n_k: int, is_causal: bool, bounds: Bounds | None,
               inner: list[int], device) -> torch.Tensor | None:
    """Keep-mask for the scores of query tile [i, i + n_q) against key tile [j, j + n_k), broadcastable
    to (..., Hkv, G, n_q, n_k), or None when every key is visible to every row."""
    keep = _diagonal_mask(i, j, n_q, n_k, device) if is_causal else None
    if bounds is not None and not (inner[2] <= j and j + n_k <= inner[3]):
        start, end = (b[..., i : i + n_q, None] for b in bounds)  # (..., Hkv, G, Tq, 1)
        cols = torch.arange(j, j + n_k, device=device)  # (Tk,)
        same_document = (cols >= start) & (cols < end)  # (..., Hkv, G, Tq, Tk)
        keep = same_document if keep is None else same_document & keep
    return keep


def _diagonal_mask(q_start: int, k_start: int, n_q: int, n_k: int, device) -> torch.Tensor | None:
    """(n_q, n_k) bool keep-mask for a causal tile, or None when every key is visible."""
    if k_start + n_k - 1 <= q_start:
        return None
    rows = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    cols = torch.arange(k_start, k_start + n_k, device=device)[None, :]
    return cols <= rows


def tiled_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float,
    document_ids: torch.Tensor | None = None, tile: int = TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of FlashAttention-2. q (..., Hq, Nq, D), k/v (..., Hkv, Nk, D) -> O (..., Hq, Nq, D),
    L (..., Hq, Nq)."""
    k, v = _kv_heads(k), _kv_heads(v)
    q5 = _split_heads(q, k.shape[-3], -3)  # (..., Hkv, G, Nq, D)
    n_q, n_k = q.shape[-2], k.shape[-2]
    bounds = _bounds(document_ids, q, q5)
    spans = _tile_spans(bounds, n_q, tile)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    out5, lse5 = out.view(q5.shape), lse.view(q5.shape[:-1])
    for i in range(0, n_q, tile):
        q_i = q5[..., i : i + tile, :].float() * scale  # (..., Hkv, G, Tq, D)
        rows = q_i.shape[-2]
        m = torch.full(q_i.shape[:-1], LOWEST, device=q.device)  # running row max (..., Hkv, G, Tq)
        l = torch.zeros_like(m)  # running softmax denominator
        acc = torch.zeros_like(q_i)  # unnormalised output (..., Hkv, G, Tq, D)
        span = _span(spans, i, tile, n_k)
        stop = min(span[1], i + rows) if is_causal else span[1]  # key tiles above the diagonal are skipped
        for j in range(span[0] // tile * tile, min(stop, n_k), tile):
            k_j, v_j = k[..., j : j + tile, :].float(), v[..., j : j + tile, :].float()  # (..., Hkv, Tk, D)
            s = _scores(q_i, k_j)  # (..., Hkv, G, Tq, Tk)
            keep = _keep_mask(i, j, rows, k_j.shape[-2], is_causal, bounds, span, q.device)
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + _times(p, v_j)
            m = m_new
        out5[..., i : i + tile, :] = (acc / l[..., None]).to(q.dtype)  # every row sees its own key: l > 0
        lse5[..., i : i + tile] = m + torch.log(l)
    return out, lse


def tiled_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, is_causal: bool, scale: float, document_ids: torch.Tensor | None = None, tile: int = TILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward by recomputing P = exp(S - L) tile by tile; D = rowsum(dO * O) is computed once."""
    k_shape, v_shape = k.shape, v.shape
    k, v = _kv_heads(k), _kv_heads(v)
    hkv = k.shape[-3]
    q5, do5 = _split_heads(q, hkv, -3), _split_heads(grad_out, hkv, -3)  # (..., Hkv, G, Nq, D)
    lse5 = _split_heads(lse, hkv, -2)  # (..., Hkv, G, Nq)
    delta = (do5.float() * _split_heads(out, hkv, -3).float()).sum(dim=-1)  # (..., Hkv, G, Nq)
    n_q, n_k = q.shape[-2], k.shape[-2]
    bounds = _bounds(document_ids, q, q5)
    spans = _tile_spans(bounds, n_q, tile)  # Nq == Nk with documents: the same spans serve key tiles
    dq = torch.zeros(q5.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for j in range(0, n_k, tile):
        k_j, v_j = k[..., j : j + tile, :].float(), v[..., j : j + tile, :].float()  # (..., Hkv, Tk, D)
        span = _span(spans, j, tile, n_q)  # the queries that see these keys lie in [span[0], span[1])
        first = max(span[0], j if is_causal else 0)  # causal: query tiles above the diagonal see no key here
        for i in range(first // tile * tile, min(span[1], n_q), tile):
            q_i, do_i = q5[..., i : i + tile, :].float(), do5[..., i : i + tile, :].float()  # (..., Hkv, G, Tq, D)
            # Scaled before the product, as in the forward: the same tiles then give the forward's S bit for
            # bit, and a row that sees one key gets P = exp(0) = 1 exactly, as the softmax does.
            s = _scores(q_i * scale, k_j)  # (..., Hkv, G, Tq, Tk)
            keep = _keep_mask(i, j, q_i.shape[-2], k_j.shape[-2], is_causal, bounds,
                              _span(spans, i, tile, n_k), q.device)
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            p = torch.exp(s - lse5[..., i : i + tile, None])  # (..., Hkv, G, Tq, Tk)
            dv[..., j : j + tile, :] += _transposed_times(p, do_i)
            dp = _scores(do_i, v_j)  # (..., Hkv, G, Tq, Tk)
            ds = p * (dp - delta[..., i : i + tile, None])  # softmax Jacobian applied row-wise
            dq[..., i : i + tile, :] += _times(ds, k_j) * scale
            dk[..., j : j + tile, :] += _transposed_times(ds, q_i) * scale
    return dq.view(q.shape).to(q.dtype), dk.view(k_shape).to(k.dtype), dv.view(v_shape).to(v.dtype)
