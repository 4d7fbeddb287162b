"""Tile tables of the Triton attention kernels and the rule that picks one for an input.

Every number here was measured (`python -m tools.tune_flash_tiles`, docs/perf/flash_attention.md);
the launchers only ask `kernel_configs` and `precision`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from ops.triton_utils import interpreting, tf32_tensor_cores


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
    the dQ pass is the mirror image; the one-pass backward (launch_onepass) owns key tiles too.
    """

    forward: Blocks
    dkdv: Blocks
    dq: Blocks
    onepass: Blocks


def block_d_for(head_dim: int) -> int:
    """The head dim padded to a power of two, at least 16 (tl.dot's smallest K)."""
    # Plain Python: triton.next_power_of_2 is a jit function in newer triton, microseconds a call.
    return max(16, 1 << (head_dim - 1).bit_length())


# Small tiles under the interpreter, so small test shapes still cross tile edges.
_INTERPRETER = KernelConfigs(*[Blocks(16, 16, 1, 1)] * 4)
# float32 inputs. With three-TF32 products (see precision) by padded head dim: tiles from an
# offline sm_90 compile survey (those with no or the fewest register spills; the spilling FMA kernels
# ran 6-8x slower than torch's efficient backend at D = 128), then the fastest of them and a few wider
# ones in `python -m tools.tune_flash_tiles --dtype fp32` on an H100 (D = 128 forward -33 %, D = 64 each
# kernel -4 to -9 %).
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
# tools/tune_flash_tiles.py; the numbers are in docs/perf/flash_attention.md. The single
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
    # The one-pass backward holds k, v, dK and dV of its key tile: short tiles at D = 256.
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
    block_d = block_d_for(head_dim)
    return _configs(block_d, dtype, n_queries >= LONG_SEQUENCE, small_grid(heads, n_queries, block_d),
                    precision(dtype, block_d))


@functools.cache  # a dict lookup instead of this logic on every call (host time of small calls)
def _configs(block_d: int, dtype: torch.dtype, long_sequence: bool, small: bool, precision: str) -> KernelConfigs:
    if interpreting():
        return _INTERPRETER
    if dtype == torch.float32:
        return _FP32_TF32X3[block_d] if precision == "tf32x3" else _FP32_FMA[max(128, block_d)]
    if small and block_d in _HALF_SMALL_GRID:
        return _HALF_SMALL_GRID[block_d]
    return _HALF[max(64, block_d), long_sequence]


def precision(dtype: torch.dtype, block_d: int) -> str:
    """tl.dot's input_precision. 16-bit inputs ignore it (their products are exact in float32).

    float32 inputs must meet float32 tolerances, so never plain TF32 (10-bit mantissa). On GPUs with
    TF32 tensor cores (sm_80+) each product is three TF32 products, "tf32x3" (hi*hi + hi*lo + lo*hi:
    about float32's error, measured below 2e-5 absolute against float64 by the CUDA tests) at
    several times the speed of plain FMA products, "ieee", which the interpreter and head dim 256 use.
    """
    if dtype != torch.float32:
        return "tf32"
    if interpreting() or block_d > FP32_TENSOR_CORE_MAX_D or not tf32_tensor_cores():
        return "ieee"
    return "tf32x3"
