"""FlashAttention-2 in pure PyTorch: the same tiles, online softmax and recomputation as the kernels.

This is the op's CPU implementation and the CS336 `FlashAttention2PyTorch` Function. It never
holds more than one (..., TILE, TILE) block of scores, so memory stays O(N * D) like the kernels.
Arithmetic is float32 whatever the input dtype; outputs are cast back.
"""

from __future__ import annotations

import torch

# Tile edge for the CPU path: large enough that Python-loop overhead is small next to the matmuls.
TILE = 64


def _diagonal_mask(q_start: int, k_start: int, n_q: int, n_k: int, device) -> torch.Tensor | None:
    """(n_q, n_k) bool keep-mask for a causal tile, or None when every key is visible."""
    if k_start + n_k - 1 <= q_start:
        return None
    rows = torch.arange(q_start, q_start + n_q, device=device)[:, None]
    cols = torch.arange(k_start, k_start + n_k, device=device)[None, :]
    return cols <= rows


def _key_stop(q_start: int, tile_q: int, n_keys: int, is_causal: bool) -> int:
    """One past the last key a query tile can see (causal: key tiles above the diagonal are skipped)."""
    return min(n_keys, q_start + tile_q) if is_causal else n_keys


def tiled_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale: float, tile: int = TILE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 of FlashAttention-2. q (..., Nq, D), k/v (..., Nk, D) -> O (..., Nq, D), L (..., Nq)."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for i in range(0, n_q, tile):
        q_i = q[..., i : i + tile, :].float() * scale  # (..., Tq, D)
        rows = q_i.shape[-2]
        m = torch.full(q_i.shape[:-1], float("-inf"), device=q.device)  # running row max (..., Tq)
        l = torch.zeros_like(m)  # running softmax denominator (..., Tq)
        acc = torch.zeros_like(q_i)  # unnormalised output (..., Tq, D)
        for j in range(0, _key_stop(i, rows, n_k, is_causal), tile):
            k_j, v_j = k[..., j : j + tile, :].float(), v[..., j : j + tile, :].float()
            s = q_i @ k_j.transpose(-1, -2)  # (..., Tq, Tk)
            keep = _diagonal_mask(i, j, rows, k_j.shape[-2], q.device) if is_causal else None
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))  # finite: every row sees key 0 first
            p = torch.exp(s - m_new[..., None])
            alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
            l = alpha * l + p.sum(dim=-1)
            acc = alpha[..., None] * acc + p @ v_j
            m = m_new
        out[..., i : i + tile, :] = (acc / l[..., None]).to(q.dtype)
        lse[..., i : i + tile] = m + torch.log(l)
    return out, lse


def tiled_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, is_causal: bool, scale: float, tile: int = TILE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward by recomputing P = exp(S - L) tile by tile; D = rowsum(dO * O) is computed once."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    delta = (grad_out.float() * out.float()).sum(dim=-1)  # (..., Nq)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=q.device)
    for j in range(0, n_k, tile):
        k_j, v_j = k[..., j : j + tile, :].float(), v[..., j : j + tile, :].float()
        first_q = (j // tile) * tile if is_causal else 0  # query tiles above the diagonal see no key here
        for i in range(first_q, n_q, tile):
            q_i, do_i = q[..., i : i + tile, :].float(), grad_out[..., i : i + tile, :].float()
            s = (q_i @ k_j.transpose(-1, -2)) * scale  # (..., Tq, Tk)
            keep = _diagonal_mask(i, j, q_i.shape[-2], k_j.shape[-2], q.device) if is_causal else None
            if keep is not None:
                s = s.masked_fill(~keep, float("-inf"))
            p = torch.exp(s - lse[..., i : i + tile, None])  # (..., Tq, Tk), exactly the forward's P
            dv[..., j : j + tile, :] += p.transpose(-1, -2) @ do_i
            dp = do_i @ v_j.transpose(-1, -2)  # (..., Tq, Tk)
            ds = p * (dp - delta[..., i : i + tile, None])  # softmax Jacobian applied row-wise
            dq[..., i : i + tile, :] += (ds @ k_j) * scale
            dk[..., j : j + tile, :] += (ds.transpose(-1, -2) @ q_i) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
