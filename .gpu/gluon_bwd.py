"""Dev check of the Gluon backward: correctness vs float64 and the tl backward, then timings (ms, do_bench median)."""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from ops.flash_attn import attention_reference
from ops.flash_attn.gluon.launch import flash_forward_gluon
from ops.flash_attn.gluon.launch_bwd import BACKWARD_TILES, GluonBackwardTiles, flash_backward_gluon
from ops.flash_attn.launch import flash_backward
from ops.flash_attn.launch_onepass import flash_backward_onepass

torch.manual_seed(0)
dev = "cuda"


def grads_ref(q, k, v, causal, do):
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    o, _ = attention_reference(qd, kd, vd, causal, q.shape[-1] ** -0.5)
    o.backward(do.double())
    return qd.grad, kd.grad, vd.grad


def check(b, h, nq, nk, d, causal, tiles=None, dtype=torch.bfloat16):
    q = torch.randn(b, h, nq, d, device=dev, dtype=dtype)
    k = torch.randn(b, h, nk, d, device=dev, dtype=dtype)
    v = torch.randn(b, h, nk, d, device=dev, dtype=dtype)
    do = torch.randn(b, h, nq, d, device=dev, dtype=dtype)
    scale = d ** -0.5
    o, lse = flash_forward_gluon(q, k, v, causal, scale) if d in (64, 128) else (None, None)
    g = flash_backward_gluon(do, q, k, v, o, lse, causal, scale, tiles)
    t = flash_backward(do, q, k, v, o, lse, causal, scale)
    r = grads_ref(q, k, v, causal, do)
    torch.cuda.synchronize()
    errs = {}
    for name, a, bb, rr in zip("qkv", g, t, r):
        e_g = (a.double() - rr).abs().max().item()
        e_t = (bb.double() - rr).abs().max().item()
        errs[name] = (e_g, e_t, bool(torch.isfinite(a).all()))
    ok = all(eg <= 2 * et + 1e-2 and fin for eg, et, fin in errs.values())
    print(json.dumps({"check": [b, h, nq, nk, d, causal], "tiles": str(tiles), "ok": ok,
                      "err(gluon,tl,finite)": errs}), flush=True)
    return ok


def cudnn_fb(q, k, v, do):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)


def cudnn_f(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench(name, b, h, n, d, variants):
    q, k, v, do = (torch.randn(b, h, n, d, device=dev, dtype=torch.bfloat16) for _ in range(4))
    scale = d ** -0.5
    o, lse = flash_forward_gluon(q, k, v, True, scale)
    ms = lambda f: do_bench(f, warmup=10, rep=60, return_mode="median")
    row = {"shape": name}
    row["bwd_tl2pass"] = ms(lambda: flash_backward(do, q, k, v, o, lse, True, scale))
    if d == 64:
        row["bwd_tl1pass"] = ms(lambda: flash_backward_onepass(do, q, k, v, o, lse, True, scale, descriptors=True))
    for label, tiles in variants:
        try:
            row[label] = ms(lambda: flash_backward_gluon(do, q, k, v, o, lse, True, scale, tiles))
        except Exception as err:
            row[label] = str(err)[:200]
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    fb = ms(lambda: cudnn_fb(qg, kg, vg, do))
    f = ms(lambda: cudnn_f(q, k, v))
    row["bwd_cudnn(fb-f)"] = fb - f
    flops = 2 * 2 * b * h * n * n * d / 2 * 2.5  # causal backward: 2.5x the forward's 4*B*H*N^2*D/2
    row["tflops_best_gluon"] = max(flops / row[l] / 1e9 for l, _ in variants if isinstance(row[l], float))
    print(json.dumps(row), flush=True)
    return row


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "all"
    print(torch.cuda.get_device_name(), flush=True)
    if mode in ("all", "check"):
        ok = True
        for d in (64, 128):
            for causal in (True, False):
                for shp in [(1, 2, 200, 333), (1, 1, 1000, 1000), (2, 1, 77, 1030), (1, 1, 1030, 77), (1, 3, 1, 129),
                            (1, 2, 4096, 4096)]:
                    ok &= check(*shp, d, causal)
        for tiles in (GluonBackwardTiles(64, 128, 2, False), GluonBackwardTiles(64, 128, 3, True)):
            for d in (64, 128):
                ok &= check(1, 2, 1030, 1030, d, True, tiles)
        ok &= check(1, 2, 1030, 1030, 128, True, None, torch.float16)
        print("ALL CHECKS", "OK" if ok else "FAILED", flush=True)
    if mode in ("dkr", "dqsw"):  # a tile variant against the table: float64 checks, then an interleaved A/B (8B)
        import dataclasses
        # dkr: the other dK operand source than the table's (the table took registers after this A/B)
        change = {"dkr": dict(dk_from_registers=not BACKWARD_TILES[128].dk_from_registers),
                  "dqsw": dict(dq_swizzle=32)}[mode]
        ok = True
        for d in (64, 128):
            tiles = dataclasses.replace(BACKWARD_TILES[d], **change)
            for causal in (True, False):
                for shp in [(1, 2, 200, 333), (2, 1, 77, 1030), (1, 2, 1031, 1031)]:
                    ok &= check(*shp, d, causal, tiles)
        ok &= check(1, 2, 1030, 777, 128, True, tiles, torch.float16)
        print(mode.upper(), "CHECKS", "OK" if ok else "FAILED", flush=True)
        base = BACKWARD_TILES[128]
        v = [("table_1", base), ("variant_1", tiles), ("table_2", base), ("variant_2", tiles)]
        r = bench("8B B2H32N32768D128", 2, 32, 32768, 128, v)
        print(" | ".join(f"{k}={x:.3f}" if isinstance(x, float) else f"{k}={x}" for k, x in r.items()), flush=True)
    if mode in ("all", "bench"):
        v128 = [("gl", GluonBackwardTiles(64, 128, 2, True))]
        rows = [bench(f"{b}x{h}x{n}x128", b, h, n, 128, v128)
                for b, h, n in ((1, 16, 4096), (1, 1, 16384), (1, 4, 4096), (4, 32, 8192))]
        for r in rows:
            print(" | ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
