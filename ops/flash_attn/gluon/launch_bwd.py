"""Launcher of the Gluon one-pass backward (kernels_bwd.flash_bwd_gluon_kernel) and its ahead-of-time compile.

Same contract as ops.flash_attn.launch.flash_backward: gradients (dQ, dK, dV) in the input dtypes.
Three launches, as in the tl one-pass backward (launch_onepass.py), whose preprocess (Delta, and
zeros into the float32 dQ accumulator) and conversion (dQ = scale * accumulator) kernels are reused:
only the middle, matmul-bound launch is Gluon. Callers check `ops.flash_attn.gluon.use_gluon_backward`
(or at least `gluon_forward_supported`) first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ops.flash_attn.gluon.kernels_bwd import flash_bwd_gluon_kernel
from ops.flash_attn.gluon.launch import (
    SM90,
    bounds_pointers,
    descriptor,
    descriptor_type,
    layout,
    output_like,
    query_group,
    tile_type,
    tma_view,
    unchecked_descriptor,
)
from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.launch import heads_view, launch_grid, row_buffers
from ops.flash_attn.launch_onepass import ROW_BLOCK, dq_convert_kernel, preprocess_kernel
from ops.flash_attn.launch_tma import tma_aligned
from ops.triton_utils.replay import ReplayLauncher

NUM_WARPS = 8  # two warpgroups: 64 key rows each (kernels_bwd.py)
_BACKWARD = ReplayLauncher(flash_bwd_gluon_kernel)  # replayed launches, as the forward's (launch.py)


@dataclass(frozen=True)
class GluonBackwardTiles:
    block_m: int  # query rows per step (one wgmma M extent for the dQ tile)
    block_n: int  # key rows per CTA (64 per warpgroup)
    num_stages: int  # Q / dO ring depth in shared memory
    early_dp: bool = True  # issue dP^T with S^T (more overlap, more live registers; kernels_bwd.py)
    dk_from_registers: bool = True  # dK's A operand from registers, issued before the barrier
    # Swizzle (bytes) of the float32 dQ tile in shared memory and of its reduction's descriptor. With
    # Triton's default (None: 128) the wgmma-layout store has 2-way bank conflicts, with 32 none
    # (gl.bank_conflicts), but the reduction then goes out in 8-column copies instead of 32-column
    # ones: 32 measured 11-14 % slower (8B layer, H200: 96.9 / 99.2 vs 86.9 / 87.1 ms), so None.
    dq_swizzle: int | None = None


# Shared memory per CTA at D = 128: K, V 64 KB + stages * (Q, dO, L, Delta) 32.5 KB + dS^T 16 KB + dQ tile
# 32 KB = 177 KB at two stages.
BACKWARD_TILES = {64: GluonBackwardTiles(64, 128, 2), 128: GluonBackwardTiles(64, 128, 2)}


def _meta(head_dim: int, is_causal: bool, tiles: GluonBackwardTiles, group: int, documents: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, NUM_STAGES=tiles.num_stages,
                IS_CAUSAL=is_causal, EARLY_DP=tiles.early_dp,
                DK_FROM_REGISTERS=tiles.dk_from_registers, GROUP=group, HAS_DOCS=documents)


@dataclass(frozen=True)
class BackwardViews:
    """What the middle launch of a Gluon backward takes (gluon_backward makes them)."""

    q4: torch.Tensor  # (B, Hq, Nq, D)
    k4: torch.Tensor  # (B, Hkv, Nk, D)
    v4: torch.Tensor  # (B, Hkv, Nk, D)
    do4: torch.Tensor  # (B, Hq, Nq, D)
    dk4: torch.Tensor  # (B, Hkv, Nk, D): written by the kernel
    dv4: torch.Tensor  # (B, Hkv, Nk, D)
    dq_acc: torch.Tensor  # (BH, Nq, D) float32, zeros: dS K is added into it
    lse: torch.Tensor  # (BH, Nq) float32, L
    delta: torch.Tensor  # (BH, Nq) float32, rowsum(O * dO)


def gluon_backward(grad_out, q, k, v, out, lse, scale: float, middle: Callable[[BackwardViews], None]):
    """(dQ, dK, dV) in the input dtypes, each laid out like its input: the three launches around a
    Gluon backward kernel, the tl preprocess (Delta, and zeros into the float32 dQ accumulator),
    `middle(views)` (the Gluon kernel), and the conversion dQ = scale * accumulator."""
    q4, k4, v4, do4 = (tma_view(t) for t in (q, k, v, grad_out))  # (B, Hq, Nq, D), (B, Hkv, Nk, D) x2, (B, Hq, Nq, D)
    o4 = heads_view(out)  # read by pointers (the preprocess): any strides
    (dq, dq4), (dk, dk4), (dv, dv4) = (output_like(x) for x in (q, k, v))
    batch, n_heads, n_q, head_dim = q4.shape
    bh = batch * n_heads
    lse, delta = row_buffers(lse)
    dq_acc = torch.empty((bh, n_q, head_dim), dtype=torch.float32, device=q.device)  # zeroed by preprocess
    row_meta = {"HEAD_DIM": head_dim, "BLOCK_D": head_dim, "BLOCK_M": ROW_BLOCK}
    preprocess_kernel[launch_grid(n_q, ROW_BLOCK, bh)](
        o4, do4, delta, dq_acc, *o4.stride(), *do4.stride(), n_q, n_heads, **row_meta)
    middle(BackwardViews(q4, k4, v4, do4, dk4, dv4, dq_acc, lse.view(bh, n_q), delta.view(bh, n_q)))
    dq_convert_kernel[launch_grid(n_q, ROW_BLOCK, bh)](dq_acc, dq4, *dq4.stride(), n_q, n_heads, scale, **row_meta)
    return dq, dk, dv


def flash_backward_gluon(grad_out, q, k, v, out, lse, is_causal: bool, scale: float, bounds=None, *,
                         tiles: GluonBackwardTiles | None = None):
    """(dQ, dK, dV) in the input dtypes, each laid out like its input (torch.empty_like); dO may have
    any strides (it is copied only if TMA cannot read it). GQA: k/v (..., Hkv, Nk, D) with Hq = G * Hkv;
    one CTA walks all G query heads of its K/V head, so dK and dV need no atomics.

    `bounds`: packed documents, (start, end) as the forward took them (Nq == Nk).
    `tiles` overrides the table (the tests run variants with it).
    """
    start, end = bounds_pointers(bounds, q)
    head_dim = q.shape[-1]
    tiles = tiles or BACKWARD_TILES[head_dim]

    def middle(t: BackwardViews) -> None:
        n_q, n_k, kv_heads = t.q4.shape[2], t.k4.shape[2], t.k4.shape[1]
        _BACKWARD[launch_grid(n_k, tiles.block_n, t.k4.shape[0] * kv_heads)](  # a CTA per K/V head and key tile
            descriptor(t.q4, tiles.block_m), descriptor(t.k4, tiles.block_n),
            descriptor(t.v4, tiles.block_n), descriptor(t.do4, tiles.block_m),
            descriptor(t.dk4, tiles.block_n), descriptor(t.dv4, tiles.block_n),
            descriptor(t.dq_acc, tiles.block_m, tiles.dq_swizzle),
            row_descriptor(t.lse, tiles.block_m), row_descriptor(t.delta, tiles.block_m),
            start, end,  # (BH, Nq) int32 each, or None
            n_q, n_k, kv_heads, scale * LOG2E, scale,
            **_meta(head_dim, is_causal, tiles, query_group(t.q4, t.k4), start is not None), num_warps=NUM_WARPS)

    return gluon_backward(grad_out, q, k, v, out, lse, scale, middle)


def row_descriptor(x2: torch.Tensor, rows: int) -> TensorDescriptor:
    """Descriptor over a (BH, Nq) float32 array, one (1, rows) block per copy. TMA needs 16-byte
    row strides: for Nq not a multiple of 4 the rows are copied into a wider buffer first (the
    descriptor keeps the logical width, so columns past Nq still read as zero)."""
    n = x2.shape[1]
    if n % 4 or not tma_aligned(x2):
        x2 = torch.nn.functional.pad(x2, (0, -n % 4))[:, :n]  # (BH, Nq) view, row stride a multiple of 4
    return unchecked_descriptor(x2, [1, rows], layout([1, rows], x2.dtype))  # TMA-aligned: checked above


def compile_backward(head_dim: int, is_causal: bool, dtype: torch.dtype = torch.bfloat16,
                     tiles: GluonBackwardTiles | None = None, target=SM90, group: int = 1, documents: bool = False):
    """Compile the backward's Gluon kernel for `target` without a GPU (see launch.compile_forward)."""
    tiles = tiles or BACKWARD_TILES[head_dim]
    meta = _meta(head_dim, is_causal, tiles, group, documents)
    bounds = {name: "*i32" if documents else "constexpr" for name in ("start_ptr", "end_ptr")}
    q_type, k_type = (tile_type(rows, head_dim, dtype) for rows in (tiles.block_m, tiles.block_n))
    row_type = descriptor_type([1, tiles.block_m], torch.float32)
    signature = {"q_desc": q_type, "k_desc": k_type, "v_desc": k_type, "do_desc": q_type, "dk_desc": k_type,
                 "dv_desc": k_type,
                 "dq_desc": descriptor_type([1, tiles.block_m, head_dim], torch.float32, tiles.dq_swizzle),
                 "lse_desc": row_type, "delta_desc": row_type, **bounds, "n_queries": "i32", "n_keys": "i32",
                 "n_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32", **{name: "constexpr" for name in meta}}
    constexprs = {**meta, **({} if documents else {"start_ptr": None, "end_ptr": None})}
    source = GluonASTSource(flash_bwd_gluon_kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": NUM_WARPS})
