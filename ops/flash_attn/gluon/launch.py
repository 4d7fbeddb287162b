"""Launcher of the Gluon forward (kernels_fwd.flash_fwd_ws_kernel) and its ahead-of-time compile.

Same contract as ops.flash_attn.launch.flash_forward (with GQA: k/v may have Hkv heads dividing q's
Hq; with packed documents: `bounds`): q (..., Nq, D), k/v (..., Nk, D) -> a fresh
O (..., Nq, D) in q.dtype, laid out like q (torch.empty_like), and L (..., Nq) float32 (natural-log
logsumexp). Callers check `ops.flash_attn.gluon.gluon_forward_supported` first.

Inputs and outputs go to the kernels as 4-D (B, H, N, D) descriptors with their own strides
(`tma_view`), so the usual attention layouts need no copies: (B, H, N, D) contiguous, and the
(B, N, H, D) projection output seen through .transpose(1, 2).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ops.flash_attn.gluon.kernels_fwd import NUM_CONSUMERS, flash_fwd_ws_kernel
from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.launch import heads_view, launch_grid
from ops.flash_attn.launch_tma import tma_aligned
from ops.triton_utils.replay import ReplayLauncher

SM90 = GPUTarget("cuda", 90, 32)
NUM_WARPS = 4  # the default partition: consumer warpgroup 0
# 4 + 4 + 1 warps round up to 3 warpgroups, 384 threads: 168 registers each fit the 64K register
# file at launch; setmaxnreg then moves the load warpgroup to 24 and both consumers to 240.
MAXNREG = 168
CONSUMER_REGS = 240
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}
_SIG_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class GluonTiles:
    block_m: int  # query rows per consumer warpgroup (a CTA has NUM_CONSUMERS of them)
    block_n: int  # key rows per K/V tile
    num_stages: int  # K/V ring depth in shared memory
    pingpong: bool = False  # consumers take turns to issue their matmuls (kernels_fwd.py)


# By head dim, from the v11 sweep on an H200 (docs/perf/flash_attention_gluon.md): 128-key tiles won at both
# head dims (64-key tiles +10-15 %); 2 or 3 stages were level at D = 64. Shared memory per CTA:
# 2 Q tiles + NUM_STAGES K and V tiles (D = 128: 160 KB).
FORWARD_TILES = {64: GluonTiles(64, 128, 2), 128: GluonTiles(64, 128, 2)}


# Launches replay Triton's compiled launcher (ops.triton_utils.replay): kernel[grid]'s argument
# binding and cache lookup cost more host time than the launch itself.
_FORWARD = ReplayLauncher(flash_fwd_ws_kernel)


def layout(block_shape: list[int], dtype: torch.dtype, swizzle: int | None = None) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a TMA block: Triton's default for the shape and dtype, or the
    NVMMA layout with `swizzle` bytes (0, 32, 64 or 128). Cached: Triton's default takes ~10 µs of
    host time to work out, and a launch needs four to nine of them."""
    return _layout(tuple(block_shape), dtype, swizzle)


@functools.cache
def _layout(block_shape: tuple[int, ...], dtype: torch.dtype, swizzle: int | None) -> gl.NVMMASharedLayout:
    if swizzle is None:
        return gl.NVMMASharedLayout.get_default_for(list(block_shape), _GL_DTYPES[dtype])
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=dtype.itemsize * 8,
                                rank=len(block_shape))


def descriptor(x: torch.Tensor, rows: int, swizzle: int | None = None, cols: int | None = None) -> TensorDescriptor:
    """Descriptor over x (.., N, D), any rank up to 5, one (1, .., 1, rows, cols) tile per copy (cols
    default D).

    Built without TensorDescriptor's own checks (__post_init__: alignment, strides, a power-of-two
    block), which cost more host time than the rest of a small launch: every tensor a launcher hands
    here has passed them already (tma_view and output_like check TMA's alignment rules, the other
    buffers are fresh and contiguous) and the block shapes come from the tile tables. The fields are
    those the constructor sets, in its order (test_gluon_launchers.py compares the two)."""
    block = [1] * (x.dim() - 2) + [rows, x.shape[-1] if cols is None else cols]
    return unchecked_descriptor(x, block, layout(block, x.dtype, swizzle))


def unchecked_descriptor(x: torch.Tensor, block: list[int], block_layout: gl.NVMMASharedLayout) -> TensorDescriptor:
    """TensorDescriptor(x, shape, strides, block, layout) without its __post_init__ checks, for tensors
    that passed them already (see descriptor)."""
    desc = TensorDescriptor.__new__(TensorDescriptor)
    desc.__dict__.update(base=x, shape=list(x.shape), strides=list(x.stride()), block_shape=block,
                         layout=block_layout, padding="zero")
    return desc


def tma_view(x: torch.Tensor) -> torch.Tensor:
    """x (..., N, D) as the (B, H, N, D) view the kernels' descriptors take: no copy unless its
    strides break TMA's 16-byte rule (e.g. the zero strides of the gradient of .sum())."""
    x4 = heads_view(x)
    return x4 if tma_aligned(x4) else heads_view(x.contiguous())


def output_like(ref: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a fresh tensor laid out like ref (torch.empty_like), its (B, H, N, D) view for descriptors);
    contiguous instead where that layout has no TMA-ready view (the op's `like` then restrides)."""
    out = torch.empty_like(ref, dtype=dtype)
    out4 = heads_view(out)
    if out4.data_ptr() != out.data_ptr() or not tma_aligned(out4):  # a copy, or strides TMA cannot take
        out = torch.empty_like(ref, dtype=dtype, memory_format=torch.contiguous_format)
        out4 = heads_view(out)
    return out, out4


def tile_type(rows: int, head_dim: int, dtype: torch.dtype, swizzle: int | None = None) -> str:
    """The signature type of a 4-D (B, H, N, D) descriptor with (1, 1, rows, D) tiles."""
    return descriptor_type([1, 1, rows, head_dim], dtype, swizzle)


def descriptor_type(block: list[int], dtype: torch.dtype, swizzle: int | None = None) -> str:
    """The signature type of a host descriptor with this block, as a launch specialises it."""
    return f"tensordesc<{_SIG_DTYPES[dtype]}[{','.join(map(str, block))}],{layout(block, dtype, swizzle)!r}>"


def _meta(head_dim: int, is_causal: bool, tiles: GluonTiles, group: int, documents: bool) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, NUM_STAGES=tiles.num_stages,
                IS_CAUSAL=is_causal, PINGPONG=tiles.pingpong, CONSUMER_REGS=CONSUMER_REGS, GROUP=group,
                HAS_DOCS=documents)


def bounds_pointers(bounds, q: torch.Tensor) -> tuple:
    """(start, end) as the kernels take them: (BH, N) int32 contiguous each (ops.flash_attn.documents.
    document_bounds), checked against q (..., N, D); (None, None) without documents."""
    if bounds is None:
        return None, None
    rows = (q.shape[:-2].numel(), q.shape[-2])
    for name, x in zip(("start", "end"), bounds):
        if x.dtype != torch.int32 or tuple(x.shape) != rows or not x.is_contiguous() or x.device != q.device:
            raise ValueError(f"flash_attn (Gluon): bounds {name} must be a contiguous int32 {rows} tensor on "
                             f"{q.device}, got {x.dtype} {tuple(x.shape)} on {x.device}")
    return bounds


def query_group(q4: torch.Tensor, k4: torch.Tensor) -> int:
    """G = Hq / Hkv of the (B, H, N, D) views: query head h reads K/V head h // G (GQA; 1 without)."""
    if q4.shape[0] != k4.shape[0] or q4.shape[1] % k4.shape[1]:
        raise ValueError(f"flash_attn (Gluon): k's heads must divide q's, got q {tuple(q4.shape)}, k {tuple(k4.shape)}")
    return q4.shape[1] // k4.shape[1]


def flash_forward_gluon(q, k, v, is_causal: bool, scale: float, bounds=None, *,
                        tiles: GluonTiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q (..., Hq, Nq, D), k/v (..., Hkv, Nk, D) with Hq = G * Hkv -> O (..., Hq, Nq, D) in q.dtype,
    L (..., Hq, Nq) float32.

    `bounds`: packed documents, (start, end) from ops.flash_attn.documents.document_bounds (Nq == Nk).
    `tiles` overrides the table (tools/gluon_timings.py times variants with it).
    """
    start, end = bounds_pointers(bounds, q)
    out, o4 = output_like(q)  # q's layout: for a transposed (B, N, H, D) q, O.transpose(1, 2) is a view
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    q4, k4, v4 = (tma_view(t) for t in (q, k, v))  # (B, Hq, Nq, D), (B, Hkv, Nk, D) x2 views
    _, n_heads, n_q, head_dim = q4.shape
    tiles = tiles or FORWARD_TILES[head_dim]
    grid = launch_grid(n_q, NUM_CONSUMERS.value * tiles.block_m, q4.shape[0] * n_heads)
    _FORWARD[grid](
        descriptor(q4, tiles.block_m), descriptor(k4, tiles.block_n),  # (B, Hq, Nq, D), (B, Hkv, Nk, D)
        descriptor(v4, tiles.block_n), descriptor(o4, tiles.block_m),  # (B, Hkv, Nk, D), (B, Hq, Nq, D)
        lse,  # (..., Nq) float32, contiguous: (BH, Nq)
        start, end,  # (BH, Nq) int32 each, or None
        n_q, k4.shape[2], n_heads, scale * LOG2E,
        **_meta(head_dim, is_causal, tiles, query_group(q4, k4), start is not None), num_warps=NUM_WARPS,
        maxnreg=MAXNREG)
    return out, lse


def compile_forward(head_dim: int, is_causal: bool, dtype: torch.dtype = torch.bfloat16,
                    tiles: GluonTiles | None = None, target: GPUTarget = SM90, group: int = 1,
                    documents: bool = False):
    """Compile the forward for `target` without a GPU (ptxas ships with Triton): the CompiledKernel,
    whose .asm holds "ttgir", "ptx" and "cubin". The signature is the one a launch specialises to."""
    tiles = tiles or FORWARD_TILES[head_dim]

    q_type, k_type = (tile_type(rows, head_dim, dtype) for rows in (tiles.block_m, tiles.block_n))
    meta = _meta(head_dim, is_causal, tiles, group, documents)
    bounds = {name: "*i32" if documents else "constexpr" for name in ("start_ptr", "end_ptr")}
    signature = {"q_desc": q_type, "k_desc": k_type, "v_desc": k_type, "o_desc": q_type, "lse_ptr": "*fp32",
                 **bounds, "n_queries": "i32", "n_keys": "i32", "n_heads": "i32", "qk_scale": "fp32",
                 **{name: "constexpr" for name in meta}}
    constexprs = {**meta, **({} if documents else {"start_ptr": None, "end_ptr": None})}
    source = GluonASTSource(flash_fwd_ws_kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
