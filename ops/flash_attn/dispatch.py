"""Which Triton kernels run: the measured choice among the forward and backward variants.

Forward: on sm_90 with 16-bit inputs, head dim 64 or 128 and enough work, the warp-specialised
Gluon kernel (gluon/; off with CS336_GLUON=0). Otherwise the pointer-arithmetic kernel (launch.flash_forward), or
for head dim 128 and long sequences the tensor-descriptor (TMA) kernel (launch_tma), which measured
4-7 % faster there on an H100 and no faster elsewhere.

Backward: on sm_90 at head dim 64 or 128 with enough work and rows, the warp-specialised Gluon
backward (gluon/kernels_bwd_ws.py; same rule and switch as the Gluon forward, and like the tl
one-pass backward not under `torch.use_deterministic_algorithms(True)`). Otherwise the two-pass
kernels (launch.flash_backward: 7 matmuls and two exps per score, no atomics, bitwise
deterministic), or the one-pass backward with dQ summed by bulk (TMA) reductions (launch_onepass: 5
matmuls and one exp per score; dQ's last bits depend on the order of the additions), which wins for
head dim 64 once there are enough keys where Gluon does not run; the numbers are in
docs/perf/flash_attention.md. Like torch's own attention backends, the faster nondeterministic
backward is the default and `torch.use_deterministic_algorithms(True)` selects the deterministic one.

Grouped-query attention (k, v with Hkv = Hq / G heads) and packed documents (`document_ids`) run
on every variant that supports them (all the tl kernels do; the Gluon rules say for theirs). The
rules count query rows as batch_heads(q); the launchers size the dK/dV grids by batch_heads(k).
"""

from __future__ import annotations

import torch

from ops.flash_attn.documents import document_bounds
from ops.flash_attn.gluon import use_gluon_backward, use_gluon_forward
from ops.flash_attn.launch import batch_heads, flash_backward, flash_forward
from ops.flash_attn.launch_onepass import flash_backward_onepass
from ops.flash_attn.launch_tma import flash_forward_tma, tma_supported
from ops.flash_attn.tiles import LONG_SEQUENCE, small_grid

TMA_FORWARD_HEAD_DIMS = (128,)
ONEPASS_BACKWARD_HEAD_DIMS = (64,)
ONEPASS_BACKWARD_MIN_KEYS = 4096  # at 2048 keys the two-pass backward was faster (0.224 vs 0.248 ms)


def use_tma_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The descriptor forward: on Hopper, 16-bit inputs, head dim 128, long queries, many rows (for
    few rows the pointer kernel's small-grid tiles were faster)."""
    return (q.is_cuda and q.shape[-1] in TMA_FORWARD_HEAD_DIMS and q.shape[-2] >= LONG_SEQUENCE
            and q.dtype != torch.float32 and not small_grid(batch_heads(q), q.shape[-2], q.shape[-1])
            and tma_supported(q, k, v))


def use_onepass_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The one-pass backward: on Hopper (bulk reductions), 16-bit inputs, head dim 64, long keys,
    unless torch is asked for deterministic algorithms."""
    return (q.is_cuda and q.dtype != torch.float32 and q.shape[-1] in ONEPASS_BACKWARD_HEAD_DIMS
            and k.shape[-2] >= ONEPASS_BACKWARD_MIN_KEYS and not torch.are_deterministic_algorithms_enabled()
            and tma_supported(q, k, v))


def attention_forward(q, k, v, is_causal: bool, scale: float,
                      document_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, L) from the fastest forward kernel for these inputs; `document_ids` (broadcastable to
    q.shape[:-1], checked by the op) restricts each query to the keys of its document."""
    bounds = None if document_ids is None else document_bounds(document_ids, q.shape[:-1])
    if use_gluon_forward(q, k, v, documents=bounds is not None):  # sm_90, 16-bit, D 64 / 128 (gluon/__init__.py)
        from ops.flash_attn.gluon.launch import flash_forward_gluon  # imports Gluon only where it runs

        return flash_forward_gluon(q, k, v, is_causal, scale, bounds=bounds)
    if use_tma_forward(q, k, v):
        return flash_forward_tma(q, k, v, is_causal, scale, bounds=bounds)
    return flash_forward(q, k, v, is_causal, scale, bounds=bounds)


def attention_backward(grad_out, q, k, v, out, lse, is_causal: bool, scale: float,
                       document_ids: torch.Tensor | None = None):
    """(dQ, dK, dV) from the fastest backward kernels allowed for these inputs."""
    bounds = None if document_ids is None else document_bounds(document_ids, q.shape[:-1])
    if use_gluon_backward(q, k, v, documents=bounds is not None):
        from ops.flash_attn.gluon.launch_bwd_ws import flash_backward_gluon_ws  # imports Gluon only where it runs

        return flash_backward_gluon_ws(grad_out, q, k, v, out, lse, is_causal, scale, bounds=bounds)
    if use_onepass_backward(q, k, v):
        return flash_backward_onepass(grad_out, q, k, v, out, lse, is_causal, scale, descriptors=True, bounds=bounds)
    return flash_backward(grad_out, q, k, v, out, lse, is_causal, scale, bounds=bounds)
