"""The Triton path: cuBLAS matmuls around one Triton kernel per chunk of tokens.

Per group of tokens (a few chunks), with W (V, D) and x_g (G, D):

    for each chunk x_c of the group:
        logits = x_c @ W.T              (C, V) float32: cuBLAS, bf16/fp16 in, fp32 out
        lce_rows_kernel                 loss (C,), dlogits (C, V) in the input dtype into the group buffer
    dX_g  = dlogits_g @ W               (G, D): cuBLAS, straight into dX
    dW   += dlogits_g.T @ x_g           (V, D) float32 accumulator: cuBLAS with beta = 1

Three matmul-equivalents in all. Memory beyond inputs and outputs: one chunk of float32 logits
(LOGITS_BYTES), one group of dlogits (DLOGITS_BYTES) and the float32 dW accumulator (4·V·D bytes,
for bf16/fp16 weights). dlogits are grouped so that the dW matmul, which reads and writes its
float32 accumulator once per call, runs over G = k·C tokens at a time: fewer passes over dW.

Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (then the matmuls are
plain float32 ones: CPU has no mixed-precision gemm).
"""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from ops.linear_cross_entropy.kernels import lce_rows_kernel
from ops.triton_utils import interpreting
from ops.triton_utils.replay import ReplayLauncher

# Chunk and group budgets, measured on an H200 at N = 65536, D = 4096, V = 151936 bf16 (fwd + bwd,
# docs/lm_loss.md): 512 MiB / 1 GiB 434.7 ms, 1 GiB / 1 GiB 412.4 ms (3.4 GiB peak), 1 GiB / 2 GiB
# 407.9 ms (4.3 GiB); longer gemms win, and the second step is not worth its gigabyte.
LOGITS_BYTES = 2**30  # one chunk of float32 logits
DLOGITS_BYTES = 2**30  # one group of dlogits in the input dtype
ROW_ALIGN = 64  # chunk rows: a multiple of the gemm tiles
BLOCK_V = 4096  # vocabulary tile of the kernel (16 KiB of float32 per load)
INTERPRETER_BLOCK_V = 128  # small tiles: the interpreter's numpy is fast on them, and tests cross tile edges
NUM_WARPS = 8
DW_SLICE_ROWS = 8192  # vocabulary rows per dW matmul when cuBLAS cannot accumulate into float32
ROW_PAD = 16  # elements: logits/dlogits rows start 16-element aligned (vector loads; aligned cuBLAS ld)

rows_kernel = ReplayLauncher(lce_rows_kernel)  # ~80 launches at the 8B size: skip Triton's per-call host work


def chunk_rows(vocab: int, itemsize: int) -> tuple[int, int]:
    """(C, G): tokens per chunk of float32 logits (<= LOGITS_BYTES unless V alone is larger) and per
    group of dlogits (a multiple of C, <= DLOGITS_BYTES when C allows)."""
    chunk = max(ROW_ALIGN, LOGITS_BYTES // (4 * vocab) // ROW_ALIGN * ROW_ALIGN)
    return chunk, chunk * max(1, DLOGITS_BYTES // (itemsize * vocab * chunk))


@functools.cache
def mixed_precision_gemms(device: torch.device, dtype: torch.dtype) -> bool:
    """True when cuBLAS takes `dtype` operands into float32 outputs here, both as `mm` (the logits)
    and as `addmm` accumulating into a float32 `out` (dW): torch's `out_dtype` gemms. Probed once
    on tiny matrices; without it the slower fallbacks below run (same results, one more rounding)."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(64, 64, generator=gen, device=device).to(dtype) for _ in range(2))
    try:
        logits = torch.mm(a, b, out_dtype=torch.float32)
        acc = logits.clone()
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    exact = a.float() @ b.float()
    return bool(torch.allclose(logits, exact, atol=1e-3) and torch.allclose(acc, 2 * exact, atol=2e-3))


def _logits_into(out: Tensor, x_c: Tensor, weight: Tensor, w32: Tensor | None) -> None:
    """out (C, V) float32 = x_c (C, D) @ weight.T, accumulated in float32."""
    if w32 is not None:  # CPU (interpreter runs): float32 math
        torch.mm(x_c.float(), w32.T, out=out)
    elif x_c.dtype == torch.float32:
        torch.mm(x_c, weight.T, out=out)
    elif mixed_precision_gemms(x_c.device, x_c.dtype):
        torch.mm(x_c, weight.T, out_dtype=torch.float32, out=out)
    else:  # logits rounded to the input dtype once: what plain PyTorch gets
        out.copy_(torch.mm(x_c, weight.T))


def _accumulate_dw(dw: Tensor, dlogits: Tensor, x_g: Tensor) -> None:
    """dw (V, D) float32 += dlogits.T (V, G) @ x_g (G, D)."""
    if dlogits.dtype == torch.float32:
        torch.addmm(dw, dlogits.T, x_g, out=dw)
    elif not dlogits.is_cuda:
        torch.addmm(dw, dlogits.T.float(), x_g.float(), out=dw)
    elif mixed_precision_gemms(dlogits.device, dlogits.dtype):
        torch.addmm(dw, dlogits.T, x_g, out_dtype=torch.float32, out=dw)
    else:  # vocabulary slices keep the low-precision temporary small
        for v0 in range(0, dw.shape[0], DW_SLICE_ROWS):
            dw[v0:v0 + DW_SLICE_ROWS].add_(torch.mm(dlogits[:, v0:v0 + DW_SLICE_ROWS].T, x_g))


def _padded_rows(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised (rows, V) view of a (rows, V') buffer, V' = V rounded up to ROW_PAD: with an
    odd V (50257) every row would start misaligned, so Triton could not vectorise and cuBLAS would
    take its unaligned-leading-dimension kernels."""
    return torch.empty(rows, -(-vocab // ROW_PAD) * ROW_PAD, dtype=dtype, device=device)[:, :vocab]


def launch_rows(logits: Tensor, dlogits: Tensor | None, targets: Tensor, row_scale: Tensor | None,
                losses: Tensor, ignore_index: int) -> None:
    """lce_rows_kernel over the R rows of `logits` (R, V): losses (R,) and, given a buffer, dlogits (R, V)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    write_grad = dlogits is not None
    block_v = INTERPRETER_BLOCK_V if interpreting() else min(BLOCK_V, triton.next_power_of_2(vocab))
    rows_kernel[(rows,)](
        logits, dlogits if write_grad else logits, targets, losses if row_scale is None else row_scale, losses,
        logits.stride(0), dlogits.stride(0) if write_grad else 0, ignore_index,
        VOCAB=vocab, BLOCK_V=block_v, HAS_ROW_SCALE=row_scale is not None, WRITE_GRAD=write_grad, num_warps=NUM_WARPS)


def loss_and_grads(x: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, row_scale: Tensor | None,
                   grad_x: bool, grad_weight: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Per-token losses and the gradients of sum_i scale_i * loss_i (the contract of chunked.py).

    x (N, D), weight (V, D), targets (N,) int64 contiguous, row_scale (N,) float32 contiguous or None.
    Returns losses (N,) float32, dx (N, D) in x.dtype or None, dw (V, D) float32 or None.
    """
    n, vocab = x.shape[0], weight.shape[0]
    grads = grad_x or grad_weight
    chunk, group = chunk_rows(vocab, x.element_size())
    group = group if grads else chunk
    losses = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if grad_x else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if grad_weight else None
    w32 = None if x.is_cuda else weight.float()  # (V, D)
    logits = _padded_rows(min(chunk, n), vocab, torch.float32, x.device)  # (C, V)
    dlogits = _padded_rows(min(group, n), vocab, x.dtype, x.device) if grads else None  # (G, V)
    for g0 in range(0, n, group):
        g1 = min(g0 + group, n)
        for c0 in range(g0, g1, chunk):
            c1 = min(c0 + chunk, g1)
            _logits_into(logits[:c1 - c0], x[c0:c1], weight, w32)
            launch_rows(logits[:c1 - c0], dlogits[c0 - g0:c1 - g0] if grads else None, targets[c0:c1],
                        None if row_scale is None else row_scale[c0:c1], losses[c0:c1], ignore_index)
        if dx is not None:
            torch.mm(dlogits[:g1 - g0], weight, out=dx[g0:g1])
        if dw is not None:
            _accumulate_dw(dw, dlogits[:g1 - g0], x[g0:g1])
    return losses, dx, dw
