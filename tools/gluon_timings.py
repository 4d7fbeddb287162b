"""The Gluon attention kernels at the op level, against the tl kernels and cuDNN (needs an sm_90 GPU).

    python -m tools.gluon_timings              # from the repository root
    python -m tools.gluon_timings --sweep      # also other forward tiles at the target shapes
    python -m tools.gluon_timings --pingpong   # A/B the forward's ping-pong setting
    python -m tools.gluon_timings --backward-tiles   # only the backward: Gluon tile variants vs tl, cuDNN
    python -m tools.gluon_timings --rules      # only the forward at the shapes that decide the dispatch rule
    python -m tools.gluon_timings --launch-profile   # where a small Gluon forward's time goes: host or kernel

For the 8B model's attention layer and the CS336 leaderboard shape: the largest differences of O and L
between the Gluon and tl forwards, and the times of the forward and of forward + backward through the op
(the Gluon backward where dispatch picks it); for the smaller shapes that decide the dispatch rule, the
forward only. Prints one JSON row per shape as it is measured, then a markdown table (ms).
Timings: triton.testing.do_bench medians, bf16, causal, inputs that require grad (as in training).
The timings run in a child process under a time limit, so a kernel that deadlocks on its mbarriers costs
that limit and no more. The CUDA tests of these kernels are tests/ops/flash_attn/test_gluon_cuda.py
(tools/gpu_check.sh runs them).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (name, batch, heads, N, D): the 8B model's layer and the CS336 leaderboard (16 heads x 16384 x 64, batch 1).
TARGETS = [("8B", 2, 32, 32768, 128), ("leaderboard", 1, 16, 16384, 64)]
# --backward-tiles also times grouped-query heads: issue 30's GQA shape, Hq 32 over Hkv 8 (the last field), at
# 32768 and at 4096 tokens, where 256 CTAs of unequal length (causal, GROUP query heads each) share 132 SMs,
# and the same 4096-token shape without GQA.
BACKWARD_SHAPES = [*TARGETS, ("gqa 8B", 1, 32, 32768, 128, 8), ("gqa 4k", 1, 32, 4096, 128, 8),
                   ("4k", 1, 32, 4096, 128)]
# Smaller shapes that decide the dispatch rule (forward only).
RULE_SHAPES = [("64x4096x64", 4, 16, 4096, 64), ("16x4096x128", 1, 16, 4096, 128), ("1x16384x128", 1, 1, 16384, 128),
               ("4x4096x128", 1, 4, 4096, 128), ("16x2048x64", 1, 16, 2048, 64), ("1x8192x64", 1, 1, 8192, 64),
               ("1x4096x64", 1, 1, 4096, 64), ("1x2048x64", 1, 1, 2048, 64)]


def _child(timeout: int, extra: list[str]) -> int:
    """Run the timings in a child process; its exit status (124 when it ran out of time)."""
    cmd = [sys.executable, "-m", "tools.gluon_timings", "--child", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        print((run.stdout + run.stderr)[-6000:], flush=True)
        return run.returncode
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(out[-6000:], f"\n!! timed out after {timeout} s", flush=True)
        return 124


def _set_gluon(on: bool) -> None:
    import ops.flash_attn.gluon as gluon

    os.environ["CS336_GLUON"] = "1" if on else "0"
    gluon.gluon_enabled.cache_clear()


def _bench(fn, grads=()) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=20, rep=100, grad_to_none=list(grads), return_mode="median")


def _cudnn(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


def _time_shape(name: str, b: int, h: int, n: int, d: int, backward: bool, sweep: bool, pingpong: bool) -> dict:
    import torch

    from ops.flash_attn import flash_attn
    from ops.flash_attn.dispatch import attention_forward
    from ops.flash_attn.gluon.launch import FORWARD_TILES, GluonTiles, flash_forward_gluon

    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))  # (B, H, N, D)
    scale = d ** -0.5
    _set_gluon(False)
    o_tl, l_tl = attention_forward(q, k, v, True, scale)
    o_gl, l_gl = flash_forward_gluon(q, k, v, True, scale)
    row = {"shape": name, "diff_O": (o_gl.float() - o_tl.float()).abs().max().item(),
           "diff_L": (l_gl - l_tl).abs().max().item(),
           "fwd_gluon": _bench(lambda: flash_forward_gluon(q, k, v, True, scale)),
           "fwd_tl": _bench(lambda: attention_forward(q, k, v, True, scale)),
           "fwd_cudnn": _bench(lambda: _cudnn(q, k, v))}
    if pingpong:  # the other ping-pong setting, interleaved with the table's: two rounds each
        table = FORWARD_TILES[d]
        other = dataclasses.replace(table, pingpong=not table.pingpong)
        for label, tiles in (("pp_other_1", other), ("pp_table_2", table), ("pp_other_2", other)):
            row[label] = _bench(lambda: flash_forward_gluon(q, k, v, True, scale, tiles=tiles))  # noqa: B023
    if backward:
        dout = torch.randn_like(q)
        for label, on in (("fwdbwd_gluon", True), ("fwdbwd_tl", False)):
            _set_gluon(on)
            row[label] = _bench(lambda: flash_attn(q, k, v, True).backward(dout), (q, k, v))
        row["fwdbwd_cudnn"] = _bench(lambda: _cudnn(q, k, v).backward(dout), (q, k, v))
    print(json.dumps(row), flush=True)
    for bn, stages in ((64, 2), (64, 3), (128, 2), (128, 3), (64, 4)) if sweep else ():
        tiles = GluonTiles(64, bn, stages)
        if stages * 2 * bn * d * 2 + 2 * 64 * d * 2 > 220 * 1024:
            continue  # over sm_90's shared memory
        try:
            ms = _bench(lambda: flash_forward_gluon(q, k, v, True, scale, tiles=tiles))  # noqa: B023
            print(json.dumps({"sweep": name, "tiles": [64, bn, stages], "fwd_gluon": ms}), flush=True)
        except Exception as err:  # a tile that does not compile: report it and go on
            print(json.dumps({"sweep": name, "tiles": [64, bn, stages], "error": str(err)[:300]}), flush=True)
    return row


# Backward tile variants (block_m, block_n, stages, early_dp) per head dim, timed by --backward-tiles
# beside the table's entry: at D = 64, 128-row query steps (half the dQ reductions per FLOP).
BACKWARD_VARIANTS = {64: [(128, 128, 2, True), (128, 128, 2, False), (128, 128, 1, True), (64, 128, 3, True)],
                     128: [(64, 128, 2, False)]}
# The warp-specialised kernel's variants (block_m, block_n, stages): a deeper ring, and at D = 64 128-row
# query steps. Each fits sm_90's 227 KB of shared memory (compile_backward_ws on a CPU: 133, 150, 199 and
# 231 KB); the 128-row and the D = 128 three-stage ones spill (364-384 bytes loaded), the others do not.
WS_VARIANTS = {64: [(64, 128, 3), (64, 128, 4), (128, 128, 2)], 128: [(64, 128, 3)]}


def _backward_tiles(name: str, b: int, h: int, n: int, d: int, kv_heads: int | None = None) -> None:
    """The backward alone (dQ, dK, dV from saved O and L) at one shape: the dispatched kernels, the
    one-pass and the warp-specialised Gluon kernels with the table's tiles and each variant, the tl
    one-pass kernel, and cuDNN's backward (its forward outside the timing)."""
    import torch

    from ops.flash_attn.dispatch import attention_backward, attention_forward
    from ops.flash_attn.gluon.launch_bwd import BACKWARD_TILES, GluonBackwardTiles, flash_backward_gluon
    from ops.flash_attn.gluon.launch_bwd_ws import flash_backward_gluon_ws as ws
    from ops.flash_attn.launch_onepass import flash_backward_onepass

    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(b, kv_heads if i in (1, 2) and kv_heads else h, n, d, device="cuda",
                                 dtype=torch.bfloat16, generator=gen) for i in range(4))  # k, v: (B, Hkv, N, D)
    scale = d ** -0.5
    out, lse = attention_forward(q, k, v, True, scale)
    ref = flash_backward_onepass(dout, q, k, v, out, lse, True, scale, descriptors=True)
    row = {"shape": name, "dispatched": _bench(lambda: attention_backward(dout, q, k, v, out, lse, True, scale)),
           "tl_onepass": _bench(lambda: flash_backward_onepass(dout, q, k, v, out, lse, True, scale,
                                                               descriptors=True))}
    variants = [("gluon_table", flash_backward_gluon, BACKWARD_TILES[d])] + [
        (f"gluon_{bm}x{bn}x{st}{'' if early else 'late'}", flash_backward_gluon,
         GluonBackwardTiles(bm, bn, st, early_dp=early)) for bm, bn, st, early in BACKWARD_VARIANTS[d]] + [
        ("gluon_ws", functools.partial(ws, heads_first=False), BACKWARD_TILES[d]),
        ("gluon_ws_heads_first", functools.partial(ws, heads_first=True), BACKWARD_TILES[d])] + [
        (f"gluon_ws_{bm}x{bn}x{st}", functools.partial(ws, heads_first=False), GluonBackwardTiles(bm, bn, st))
        for bm, bn, st in WS_VARIANTS[d]]
    for label, backward, tiles in variants:
        try:
            grads = backward(dout, q, k, v, out, lse, True, scale, tiles=tiles)
            row[f"{label}_maxdiff"] = max((g.float() - r.float()).abs().max().item() for g, r in zip(grads, ref))
            row[label] = _bench(lambda: backward(dout, q, k, v, out, lse, True, scale, tiles=tiles))  # noqa: B023
        except Exception as err:  # noqa: BLE001 - a variant that does not compile or launch: report it, go on
            row[label] = f"error: {str(err)[:200]}"
    qc, kc, vc = (x.detach().clone().requires_grad_() for x in (q, k, v))
    oc = _cudnn(qc, kc, vc)
    row["cudnn_bwd"] = _bench(lambda: torch.autograd.grad(oc, (qc, kc, vc), dout, retain_graph=True))
    print(json.dumps(row), flush=True)


def _launch_profile(shapes=(("1x2048x64", 1, 1, 2048, 64), ("4x4096x128", 1, 4, 4096, 128))) -> None:
    """Small forwards, Gluon and tl, under torch.profiler: per call, the host time of our launcher (CPU
    total of the call's Python and launches) against the kernel's device time (CUDA self time), and
    do_bench's median beside them. A Gluon forward slower than tl at a small shape is then placed:
    host-bound (CPU per call above the kernel time) or a fixed device cost (the kernel itself)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ops.flash_attn.dispatch import attention_forward
    from ops.flash_attn.gluon.launch import flash_forward_gluon

    calls = 20
    for name, b, h, n, d in shapes:
        q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        _set_gluon(False)
        for label, fn in (("gluon", lambda: flash_forward_gluon(q, k, v, True, d ** -0.5)),  # noqa: B023
                          ("tl", lambda: attention_forward(q, k, v, True, d ** -0.5))):  # noqa: B023
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            host_us = (time.perf_counter() - start) / calls * 1e6  # enqueue time per call, no sync
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    fn()
                torch.cuda.synchronize()
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
            device_us = sum(e.self_device_time_total for e in kernels) / calls
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:3]
            print(json.dumps({"shape": name, "impl": label, "host_us_per_call": round(host_us, 1),
                              "device_us_per_call": round(device_us, 1), "do_bench_us": round(_bench(fn) * 1e3, 1),
                              "top_kernels": [(e.key[:60], round(e.self_device_time_total / calls, 1)) for e in top]}),
                  flush=True)


def _timings(sweep: bool, pingpong: bool, rules_only: bool = False) -> None:
    import torch

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    targets = [] if rules_only else TARGETS
    rows = [_time_shape(*shape, backward=True, sweep=sweep, pingpong=pingpong) for shape in targets]
    rows += [_time_shape(*shape, backward=False, sweep=False, pingpong=False) for shape in RULE_SHAPES]
    print("\n| shape | max abs O gl-tl | max abs L | fwd gluon | fwd tl | fwd cuDNN | f+b gluon | f+b tl | f+b cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r.get(key, float('nan')):.3f}" for key in
                 ("fwd_gluon", "fwd_tl", "fwd_cudnn", "fwdbwd_gluon", "fwdbwd_tl", "fwdbwd_cudnn")]
        print(f"| {r['shape']} | {r['diff_O']:.1e} | {r['diff_L']:.1e} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time other tiles at the target shapes")
    parser.add_argument("--pingpong", action="store_true", help="A/B the ping-pong setting at the target shapes")
    parser.add_argument("--backward-tiles", action="store_true",
                        help="only the backward at the target shapes: Gluon tile variants, tl one-pass, cuDNN")
    parser.add_argument("--rules", action="store_true", help="only the forward at the dispatch rule's shapes")
    parser.add_argument("--launch-profile", action="store_true",
                        help="small Gluon and tl forwards under torch.profiler: host time vs kernel time per call")
    parser.add_argument("--shapes", nargs="+", choices=[shape[0] for shape in BACKWARD_SHAPES],
                        help="--backward-tiles: only these shapes, in this order (default: all)")
    parser.add_argument("--timeout", type=int, default=200, help="seconds the timings may take (default: 200)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.launch_profile:
        return _launch_profile()
    if args.child and args.backward_tiles:
        import torch

        print(torch.cuda.get_device_name(), torch.__version__, flush=True)
        shapes = {shape[0]: shape for shape in BACKWARD_SHAPES}
        for name in args.shapes or shapes:
            _backward_tiles(*shapes[name])
        return None
    if args.child:
        return _timings(args.sweep, args.pingpong, args.rules)
    flags = (["--sweep"] * args.sweep + ["--pingpong"] * args.pingpong + ["--backward-tiles"] * args.backward_tiles
             + ["--rules"] * args.rules + ["--launch-profile"] * args.launch_profile
             + (["--shapes", *args.shapes] if args.shapes else []))
    sys.exit(_child(args.timeout, flags))


if __name__ == "__main__":
    main()
