"""The math FlashAttention must reproduce, written the obvious way (materialises Nq x Nk scores).

Tests call it on float64 copies of the inputs; benchmarks use it as the "naive" implementation.
"""

from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def causal_keep_mask(n_queries: int, n_keys: int, device: torch.device | str) -> torch.Tensor:
    """(Nq, Nk) bool, True where query i may see key j: j <= i (top-left aligned)."""
    rows = torch.arange(n_queries, device=device)[:, None]
    cols = torch.arange(n_keys, device=device)[None, :]
    return cols <= rows


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (O, L): O (..., Nq, D) and L = logsumexp of the scaled scores (..., Nq), natural log."""
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale  # (..., Nq, Nk)
    if is_causal:
        scores = scores.masked_fill(~causal_keep_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (..., Nq)
    out = torch.softmax(scores, dim=-1) @ v  # (..., Nq, D)
    return out, lse
