"""The math FlashAttention must reproduce, written the obvious way (materialises Nq x Nk scores).

Tests call it on float64 copies of the inputs; benchmarks use it as the "naive" implementation.
"""

from __future__ import annotations

import math

import torch

from ops.flash_attn.documents import document_mask


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def causal_keep_mask(n_queries: int, n_keys: int, device: torch.device | str) -> torch.Tensor:
    """(Nq, Nk) bool, True where query i may see key j: j <= i (top-left aligned)."""
    rows = torch.arange(n_queries, device=device)[:, None]
    cols = torch.arange(n_keys, device=device)[None, :]
    return cols <= rows


def repeat_kv_heads(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """k or v (..., Hkv, Nk, D) with each head repeated for its group of q's (..., Hq, Nq, D) heads:
    query head h reads kv head h // (Hq // Hkv). A copy; x itself when the heads already match."""
    if q.shape[:-2] == x.shape[:-2]:
        return x
    return x.repeat_interleave(q.shape[-3] // x.shape[-3], dim=-3)  # (..., Hq, Nk, D)


def attention_scores(q: torch.Tensor, k: torch.Tensor, is_causal: bool = False, scale: float | None = None,
                     document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(..., Hq, Nq, Nk) scaled scores, -inf where a query may not see a key (causal, other document)."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = (q @ repeat_kv_heads(q, k).transpose(-1, -2)) * scale  # (..., Nq, Nk)
    if is_causal:
        scores = scores.masked_fill(~causal_keep_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    if document_ids is not None:
        # (..., Nq, Nk) from ids broadcastable to q.shape[:-1]: right-aligned against the scores' (..., Nq)
        same_document = document_mask(document_ids)
        scores = scores.masked_fill(~same_document, float("-inf"))
    return scores


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, scale: float | None = None,
    document_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (O, L): O (..., Nq, D) and L = logsumexp of the scaled scores (..., Nq), natural log.

    q (..., Hq, Nq, D), k and v (..., Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query heads);
    `document_ids` (broadcastable to q.shape[:-1], Nq == Nk) keeps attention within each document.
    """
    scores = attention_scores(q, k, is_causal, scale, document_ids)  # (..., Nq, Nk)
    lse = torch.logsumexp(scores, dim=-1)  # (..., Nq)
    out = torch.softmax(scores, dim=-1) @ repeat_kv_heads(q, v)  # (..., Nq, D)
    return out, lse
