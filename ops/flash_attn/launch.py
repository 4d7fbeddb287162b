"""Launchers: allocate outputs, view inputs as (BH, N, D) with their strides, pick blocks, launch.

Outputs are always fresh contiguous tensors (never views of inputs), as torch.library requires.
Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from ops.flash_attn.kernels import LOG2E, flash_fwd_kernel
from ops.flash_attn.kernels_bwd import flash_bwd_dkdv_kernel, flash_bwd_dq_kernel
from ops.triton_replay import ReplayLauncher

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, where batch*heads goes
# The kernels small calls spend their host time on: launched without Triton's per-call bookkeeping.
forward_kernel = ReplayLauncher(flash_fwd_kernel)
dq_kernel = ReplayLauncher(flash_bwd_dq_kernel)
dkdv_kernel = ReplayLauncher(flash_bwd_dkdv_kernel)


@dataclass(frozen=True)
class Blocks:
    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class KernelConfigs:
    """Tile shapes of the main kernels; the backward passes are tuned apart from the forward.

    The dK/dV pass owns a key tile and streams query tiles (a tall key tile, short query steps);
    the dQ pass is the mirror image; the single-pass backward (launch_fused) owns key tiles too.
    """

    forward: Blocks
    dkdv: Blocks
    dq: Blocks
    fused: Blocks


@functools.cache
def interpreting() -> bool:
    """TRITON_INTERPRET=1, read once: Triton itself decides at import (when @triton.jit wraps our
    kernels) whether they run in the interpreter, so a later change would not take effect anyway."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_d(head_dim: int) -> int:
    """The head dim padded to a power of two, at least 16 (tl.dot's smallest K)."""
    # Plain Python: triton.next_power_of_2 is a jit function in newer triton, microseconds a call.
    return max(16, 1 << (head_dim - 1).bit_length())


# Small tiles under the interpreter, so small test shapes still cross tile edges.
_INTERPRETER = KernelConfigs(*[Blocks(16, 16, 1, 1)] * 4)
# float32 inputs. With three-TF32 products (see _precision) by padded head dim: tiles from an
# offline sm_90 compile survey (those with no or the fewest register spills; the spilling FMA kernels
# ran 6-8x slower than torch's efficient backend at D = 128), then the fastest of them and a few wider
# ones in `flash_tune --dtype fp32` on an H100 (D = 128 forward -33 %, D = 64 each kernel -4 to -9 %).
# At D = 32 the survey's backward tiles stayed ahead (2.77 vs 3.23 ms at 1 x 16384, same machine);
# docs/perf/flash_attention.md.
_FP32_TUNED_64 = KernelConfigs(Blocks(32, 64, 4, 3), Blocks(64, 32, 4, 1), Blocks(64, 64, 4, 1), Blocks(32, 32, 4, 1))
_FP32_TF32X3 = {
    16: _FP32_TUNED_64,
    32: dataclasses.replace(_FP32_TUNED_64, dkdv=Blocks(32, 32, 4, 2), dq=Blocks(64, 32, 4, 1)),
    64: _FP32_TUNED_64,
    128: KernelConfigs(Blocks(32, 64, 4, 2), Blocks(64, 32, 4, 1), Blocks(32, 32, 4, 2), Blocks(32, 32, 4, 1)),
}
# With plain FMA products (head dim 256, GPUs without TF32 tensor cores), by padded head dim up to
# 128 / 256. At 256 the tiles that D <= 128 uses spilled 11-17 KB of registers per thread in an
# offline sm_90 compile; 16 x 16 tiles spill 0-184 bytes (on an H100: 2.35 ms forward + backward at
# 1 x 1024, 3.2x torch's efficient backend; correct, not fast).
_FP32_FMA = {
    128: KernelConfigs(Blocks(64, 32, 4, 2), Blocks(32, 32, 4, 1), Blocks(32, 32, 4, 1), Blocks(32, 32, 4, 1)),
    256: KernelConfigs(Blocks(16, 16, 4, 1), Blocks(16, 16, 4, 1), Blocks(16, 16, 8, 1), Blocks(16, 16, 4, 1)),
}
FP32_TENSOR_CORE_MAX_D = 128  # wider fp32 tiles do not fit three-TF32 products in registers
# 16-bit inputs, by (padded head dim BLOCK_D, long sequence). Measured on an H100 with
# cs336_systems.bench.flash_tune; the numbers are in docs/perf/flash_attention.md. The single
# pass is timed with descriptors; dispatch.py uses it at D = 64 only (at D = 128 it lost at every tile).
LONG_SEQUENCE = 8192  # query rows from which the long-sequence forward tiles win
_HALF = {
    (64, False): KernelConfigs(Blocks(128, 64, 8, 4), Blocks(32, 64, 4, 3), Blocks(128, 64, 8, 3),
                               Blocks(64, 64, 4, 4)),
    (64, True): KernelConfigs(Blocks(64, 128, 4, 3), Blocks(32, 64, 4, 3), Blocks(128, 64, 8, 3),
                              Blocks(64, 64, 4, 4)),
    (128, False): KernelConfigs(Blocks(64, 64, 4, 3), Blocks(64, 128, 8, 3), Blocks(128, 64, 8, 3),
                                Blocks(64, 128, 8, 3)),
    (128, True): KernelConfigs(Blocks(128, 128, 8, 3), Blocks(64, 128, 8, 3), Blocks(128, 64, 8, 3),
                               Blocks(64, 128, 8, 3)),
    # The single pass holds k, v, dK and dV of its key tile: short tiles at D = 256.
    (256, False): KernelConfigs(Blocks(64, 32, 4, 2), Blocks(32, 32, 4, 1), Blocks(32, 32, 4, 1),
                                Blocks(32, 32, 4, 1)),
}
_HALF[256, True] = _HALF[256, False]
# Few query rows in all (batch * heads * Nq, e.g. the CS336 sweep's one head): the tables above,
# tuned with 16-128 heads, leave most of an H100's 132 SMs idle there, and the time is the longest
# program's serial loop. 64-row tiles give more, shorter programs: at B*H = 1 and 4, N = 1024-8192,
# GPU time -10 to -40 % per kernel (docs/perf/flash_attention.md, "Few heads"). At D = 128 the
# backward's 64-row tiles lost at 16384 rows of short sequences (4 x 4096: +15 %, 16 x 1024: +34 %)
# and won at 16384 rows of long ones (1 x 16384: -24 %), hence the lower limit there. Only padded
# head dims 64 and 128 were measured; 16, 32 and 256 keep the tables above.
SMALL_GRID_ROWS = 16384
SMALL_GRID_ROWS_D128_SHORT = 8192
_HALF_SMALL_GRID = {
    64: KernelConfigs(Blocks(64, 128, 4, 3), Blocks(64, 64, 4, 3), Blocks(64, 64, 4, 3), Blocks(64, 64, 4, 4)),
    128: KernelConfigs(Blocks(64, 64, 4, 3), Blocks(64, 64, 4, 3), Blocks(64, 64, 4, 3), Blocks(64, 128, 8, 3)),
}


def small_grid(heads: int, n_queries: int, block_d: int) -> bool:
    """True when heads * n_queries rows are few enough for the small-grid tiles (0 heads: unknown)."""
    short_d128 = block_d == 128 and n_queries < LONG_SEQUENCE
    return 0 < heads * n_queries <= (SMALL_GRID_ROWS_D128_SHORT if short_d128 else SMALL_GRID_ROWS)


def kernel_configs(head_dim: int, dtype: torch.dtype, n_queries: int = 0, heads: int = 0) -> KernelConfigs:
    """The tile shapes used for inputs of this head dim, dtype, query length and batch * heads
    (0: the tables tuned for many heads)."""
    block_d = _block_d(head_dim)
    return _configs(block_d, dtype, n_queries >= LONG_SEQUENCE, small_grid(heads, n_queries, block_d),
                    _precision(dtype, block_d))


@functools.cache  # a dict lookup instead of this logic on every call (host time of small calls)
def _configs(block_d: int, dtype: torch.dtype, long_sequence: bool, small: bool, precision: str) -> KernelConfigs:
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float32:
        return _FP32_TF32X3[block_d] if precision == "tf32x3" else _FP32_FMA[max(128, block_d)]
    if small and block_d in _HALF_SMALL_GRID:
        return _HALF_SMALL_GRID[block_d]
    return _HALF[max(64, block_d), long_sequence]


def _as_bhnd(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (BH, N, D); a view whenever the leading dims can be merged."""
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _precision(dtype: torch.dtype, block_d: int) -> str:
    """tl.dot's input_precision. 16-bit inputs ignore it (their products are exact in float32).

    float32 inputs must meet float32 tolerances, so never plain TF32 (10-bit mantissa). On GPUs with
    TF32 tensor cores (sm_80+) each product is three TF32 products, "tf32x3" (hi*hi + hi*lo + lo*hi:
    about float32's error, measured below 2e-5 absolute against float64 by the CUDA tests) at
    several times the speed of plain FMA products, "ieee", which the interpreter and head dim 256 use.
    """
    if dtype != torch.float32:
        return "tf32"
    if interpreting() or block_d > FP32_TENSOR_CORE_MAX_D or not _tf32_tensor_cores():
        return "ieee"
    return "tf32x3"


@functools.cache
def _device_capability(index: int | None) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _tf32_tensor_cores() -> bool:
    return torch.cuda.is_available() and _device_capability(torch.cuda.current_device()) >= (8, 0)


def _grid(n_rows: int, block: int, bh: int) -> tuple[int, int]:
    if bh > MAX_GRID_Y:
        raise ValueError(f"flash_attn supports at most {MAX_GRID_Y} batch*heads, got {bh}")
    return (-(-n_rows // block), bh)  # ceil division; triton.cdiv costs a jit call in newer triton


def _fresh_like(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous tensor of x's shape, dtype and device (empty_like parses its
    arguments in about half the host time of torch.empty(shape, dtype=, device=))."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def forward_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What every forward launcher allocates: O (..., Nq, D) in q.dtype and L (..., Nq) float32."""
    return _fresh_like(q), torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)


def backward_outputs(q, k, v, lse) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
    """What every backward launcher allocates: fresh (dQ, dK, dV) in the input dtypes, L made
    contiguous, and room for D = rowsum(O * dO), (..., Nq) float32."""
    lse = lse.contiguous()
    return (_fresh_like(q), _fresh_like(k), _fresh_like(v)), lse, torch.empty_like(lse)


def _operand(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """x (..., N, D) as the pointer kernels take it, a (BH, N, D) array: a tensor to take the data
    pointer of, and its three strides. A contiguous x goes as it is: a reshape costs about a
    microsecond of host time, and a forward + backward reshaped twelve tensors."""
    if x.is_contiguous():
        n, d = x.shape[-2], x.shape[-1]
        return x, (n * d, d, 1)
    x3 = _as_bhnd(x)
    return x3, x3.stride()


def _heads(x: torch.Tensor) -> int:
    """BH: the product of the leading dims of x (..., N, D)."""
    return x.shape[:-2].numel()


def flash_forward(q, k, v, is_causal: bool, scale: float,
                  blocks: Blocks | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., Nq, D), k/v (..., Nk, D) -> O (..., Nq, D) in q.dtype, L (..., Nq) float32.

    `blocks` overrides the tuned tile shapes (the tuning script uses it).
    """
    out, lse = forward_outputs(q)
    bh, n_q, head_dim = _heads(q), q.shape[-2], q.shape[-1]
    if bh == 0:
        return out, lse
    blocks = blocks or kernel_configs(head_dim, q.dtype, n_q, bh).forward
    (q_, sq), (k_, sk), (v_, sv), (o_, so) = map(_operand, (q, k, v, out))
    forward_kernel[_grid(n_q, blocks.block_m, bh)](
        q_, k_, v_, o_, lse, *sq, *sk, *sv, *so,
        n_q, k.shape[-2], scale * LOG2E, **_meta(blocks, head_dim, _block_d(head_dim), is_causal, q.dtype))
    return out, lse


def flash_backward(grad_out, q, k, v, out, lse, is_causal: bool, scale: float,
                   configs: KernelConfigs | None = None):
    """Gradients (dQ, dK, dV) in the input dtypes; dO may have any strides (even 0, from .sum())."""
    (dq, dk, dv), lse, delta = backward_outputs(q, k, v, lse)
    bh, n_q, n_k, head_dim = _heads(q), q.shape[-2], k.shape[-2], q.shape[-1]
    if bh == 0:
        return dq, dk, dv
    block_d = _block_d(head_dim)
    configs = configs or kernel_configs(head_dim, q.dtype, n_q, bh)
    (q_, sq), (k_, sk), (v_, sv), (o_, so), (do_, sdo) = map(_operand, (q, k, v, out, grad_out))
    sdq, sdk, sdv = (_operand(x)[1] for x in (dq, dk, dv))
    # The dQ pass goes first: it also writes D = rowsum(O * dO), which the dK/dV pass reads.
    dq_blocks = configs.dq
    dq_kernel[_grid(n_q, dq_blocks.block_m, bh)](
        q_, k_, v_, o_, do_, lse, delta, dq, *sq, *sk, *sv, *so, *sdo, *sdq,
        n_q, n_k, scale * LOG2E, scale, **_meta(dq_blocks, head_dim, block_d, is_causal, q.dtype))
    dkdv = configs.dkdv
    dkdv_kernel[_grid(n_k, dkdv.block_n, bh)](
        q_, k_, v_, do_, lse, delta, dk, dv, *sq, *sk, *sv, *sdo, *sdk, *sdv,
        n_q, n_k, scale * LOG2E, scale, **_meta(dkdv, head_dim, block_d, is_causal, q.dtype))
    return dq, dk, dv


def _meta(blocks: Blocks, head_dim: int, block_d: int, is_causal: bool, dtype: torch.dtype) -> dict:
    """Compile-time arguments shared by the attention kernels (one dict per distinct set, shared:
    callers only unpack it)."""
    return _meta_for(blocks, head_dim, block_d, is_causal, _precision(dtype, block_d))


@functools.cache
def _meta_for(blocks: Blocks, head_dim: int, block_d: int, is_causal: bool, precision: str) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n,
                IS_CAUSAL=is_causal, PRECISION=precision, num_warps=blocks.num_warps, num_stages=blocks.num_stages)
