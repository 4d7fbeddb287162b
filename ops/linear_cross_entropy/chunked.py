"""The chunked PyTorch path (CPU, or any device without Triton): float32 math, chunk by chunk.

Same structure as the Triton path (launch.py): per chunk of tokens, logits = x_c @ W.T, then the
per-token loss and, when gradients are wanted, dlogits = (softmax - onehot) * scale in place of the
logits, dX_c = dlogits @ W and dW += dlogits.T @ x_c: three matmuls, one chunk of logits alive.
Everything is float32 here, including a float32 copy of W for low-precision inputs (CPU memory is
not what this path is about).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk of tokens


def chunk_rows(vocab: int) -> int:
    """Tokens per chunk: a chunk's float32 logits take at most CHUNK_BYTES (at least one token)."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def loss_and_grads(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, row_scale: Tensor | None,
                   grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token losses and the gradients of sum_i scale_i * loss_i.

    x (N, D), weight (V, D), targets (N,) int64, row_scale (N,) float32 or None (all ones).
    Returns losses (N,) float32 (0 at ignored or out-of-range targets), dx (N, D) in x.dtype or None,
    dw (V, D) float32 or None.
    """
    n, vocab = x.shape[0], weight.shape[0]
    w32 = weight.float()  # (V, D)
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    step = chunk_rows(vocab)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        x_c = x[rows].float()  # (C, D)
        logits = x_c @ w32.T  # (C, V)
        t = targets[rows]  # (C,)
        valid = (t != ignore_index) & (t >= 0) & (t < vocab)  # out-of-range targets count as ignored
        t_safe = torch.where(valid, t, 0)[:, None]  # (C, 1): a column to gather even on ignored rows
        lse = torch.logsumexp(logits, dim=-1)  # (C,)
        losses[rows] = torch.where(valid, lse - logits.gather(1, t_safe).squeeze(1), 0.0)
        if not (grad_x or grad_weight):
            continue
        scale = valid.float() if row_scale is None else torch.where(valid, row_scale[rows], 0.0)  # (C,)
        dlogits = logits.sub_(lse[:, None]).exp_()  # softmax (C, V), in place of the logits
        dlogits.scatter_add_(1, t_safe, dlogits.new_full(t_safe.shape, -1.0))  # - onehot (ignored: x 0 below)
        dlogits.mul_(scale[:, None])
        if dx is not None:
            dx[rows] = dlogits @ w32
        if dw is not None:
            torch.addmm(dw, dlogits.T, x_c, out=dw)
    return losses, dx, dw
