"""Launcher of the warp-specialised Gluon backward (kernels_bwd_ws.flash_bwd_ws_kernel) and its compile.

Same contract as launch_bwd.flash_backward_gluon, whose preprocess and dQ conversion it shares; only
the middle launch differs: 4 + 4 + 1 warps (two MMA warpgroups and a load warp), dK and dV stored per
64-key half, each dQ tile added as two BLOCK_M x D/2 halves. dispatch.attention_backward calls it
wherever the Gluon backward runs; the one-pass kernel (launch_bwd) stays for comparison (tools/gluon_timings.py).
"""

from __future__ import annotations

import torch
import triton
from triton.experimental.gluon._runtime import GluonASTSource

from ops.flash_attn.gluon.kernels_bwd_ws import KEYS, flash_bwd_ws_kernel
from ops.flash_attn.gluon.launch import (
    SM90,
    bounds_pointers,
    descriptor,
    descriptor_type,
    query_group,
    tile_type,
)
from ops.flash_attn.gluon.launch_bwd import (
    BACKWARD_TILES,
    BackwardViews,
    GluonBackwardTiles,
    gluon_backward,
    row_descriptor,
)
from ops.flash_attn.kernels import LOG2E
from ops.flash_attn.launch import MAX_GRID_Y, launch_grid
from ops.triton_utils import sm_count
from ops.triton_utils.replay import ReplayLauncher

NUM_WARPS = 4  # the default partition: MMA warpgroup 0
# 4 + 4 + 1 warps round up to 3 warpgroups, 384 threads: 168 registers each fit the 64K register file at
# launch; setmaxnreg then gives both MMA warpgroups 240 and the load warpgroup 24 (as the forward).
MAXNREG = 168
MMA_REGS = 240
HEADS_FIRST_MAX_WAVES = 8  # heads_first_rule: wins measured at 2 waves, a tie and a win at 8, losses at 16
_KERNEL = ReplayLauncher(flash_bwd_ws_kernel)


def _meta(head_dim: int, is_causal: bool, tiles: GluonBackwardTiles, group: int, documents: bool,
          heads_first: bool = False) -> dict:
    return dict(HEAD_DIM=head_dim, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, NUM_STAGES=tiles.num_stages,
                IS_CAUSAL=is_causal, GROUP=group, HAS_DOCS=documents, MMA_REGS=MMA_REGS, HEADS_FIRST=heads_first)


def heads_first_rule(is_causal: bool, ctas: int, device: torch.device) -> bool:
    """Launch heads first where the causal CTAs' unequal lengths would leave a tail: the CTA of the first
    key tile walks every query tile (GROUP times with GQA) and the last almost none, so the longest CTA is
    about 2 / waves of an SM's share of the work (waves = CTAs / SMs). Tiles first, the long CTAs of the
    last heads start late and run alone at the end; heads first, they start first. On long grids heads
    first loses the L2 reuse of CTAs of one head walking the same query tiles (2x slower at the 8B layer).
    Measured on one H100 (docs/perf/flash_attention_gluon.md, "Launch order"): GQA 1 x 32/8 x 4096 x 128,
    256 CTAs, 0.85 vs 1.02 ms; 1024 CTAs a tie and an 8 % win; 2048 a 1 % and an 11 % loss."""
    if not is_causal or device.type != "cuda":
        return False
    return ctas <= HEADS_FIRST_MAX_WAVES * sm_count(device.index)


def _grid(n_keys: int, block_n: int, kv_bh: int, heads_first: bool) -> tuple[int, int]:
    """(key tiles, K/V heads), or with `heads_first` (K/V heads, key tiles): kernels_bwd_ws._cta."""
    if not heads_first:
        return launch_grid(n_keys, block_n, kv_bh)
    tiles = -(-n_keys // block_n)
    if tiles > MAX_GRID_Y:
        raise ValueError(f"flash_attn (Gluon): at most {MAX_GRID_Y * block_n} keys, got {n_keys}")
    return kv_bh, tiles


def flash_backward_gluon_ws(grad_out, q, k, v, out, lse, is_causal: bool, scale: float, bounds=None, *,
                            tiles: GluonBackwardTiles | None = None, heads_first: bool | None = None):
    """(dQ, dK, dV) as launch_bwd.flash_backward_gluon returns them, from the warp-specialised kernel.
    `heads_first`: launch the CTAs key tile by key tile across the heads (kernels_bwd_ws._cta); None:
    where heads_first_rule says."""
    start, end = bounds_pointers(bounds, q)
    head_dim = q.shape[-1]
    tiles = tiles or BACKWARD_TILES[head_dim]

    def middle(t: BackwardViews) -> None:
        n_q, n_k, kv_heads = t.q4.shape[2], t.k4.shape[2], t.k4.shape[1]
        kv_bh = t.k4.shape[0] * kv_heads
        first = heads_first
        if first is None:
            first = heads_first_rule(is_causal, kv_bh * -(-n_k // tiles.block_n), q.device)
        _KERNEL[_grid(n_k, tiles.block_n, kv_bh, first)](
            descriptor(t.q4, tiles.block_m), descriptor(t.k4, tiles.block_n),
            descriptor(t.v4, tiles.block_n), descriptor(t.do4, tiles.block_m),
            descriptor(t.dk4, KEYS.value), descriptor(t.dv4, KEYS.value),  # stored per 64-key half
            descriptor(t.dq_acc, tiles.block_m, cols=head_dim // 2),  # float32, added per BLOCK_M x D/2 half
            row_descriptor(t.lse, tiles.block_m), row_descriptor(t.delta, tiles.block_m),
            start, end,  # (BH, Nq) int32 each, or None
            n_q, n_k, kv_heads, scale * LOG2E, scale,
            **_meta(head_dim, is_causal, tiles, query_group(t.q4, t.k4), start is not None, first),
            num_warps=NUM_WARPS, maxnreg=MAXNREG)

    return gluon_backward(grad_out, q, k, v, out, lse, scale, middle)


def compile_backward_ws(head_dim: int, is_causal: bool, dtype: torch.dtype = torch.bfloat16,
                        tiles: GluonBackwardTiles | None = None, target=SM90, group: int = 1, documents: bool = False,
                        heads_first: bool = False):
    """Compile the warp-specialised backward for `target` without a GPU (see launch.compile_forward)."""
    tiles = tiles or BACKWARD_TILES[head_dim]
    meta = _meta(head_dim, is_causal, tiles, group, documents, heads_first)
    bounds = {name: "*i32" if documents else "constexpr" for name in ("start_ptr", "end_ptr")}
    rows = (tiles.block_m, tiles.block_n, KEYS.value)
    q_type, k_type, half_type = (tile_type(n, head_dim, dtype) for n in rows)
    row_type = descriptor_type([1, tiles.block_m], torch.float32)
    signature = {"q_desc": q_type, "k_desc": k_type, "v_desc": k_type, "do_desc": q_type, "dk_desc": half_type,
                 "dv_desc": half_type,
                 "dq_desc": descriptor_type([1, tiles.block_m, head_dim // 2], torch.float32),
                 "lse_desc": row_type, "delta_desc": row_type, **bounds, "n_queries": "i32", "n_keys": "i32",
                 "n_heads": "i32", "qk_scale": "fp32", "sm_scale": "fp32", **{name: "constexpr" for name in meta}}
    constexprs = {**meta, **({} if documents else {"start_ptr": None, "end_ptr": None})}
    source = GluonASTSource(flash_bwd_ws_kernel, signature, constexprs=constexprs)
    return triton.compile(source, target=target, options={"num_warps": NUM_WARPS, "maxnreg": MAXNREG})
