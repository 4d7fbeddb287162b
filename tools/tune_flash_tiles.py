"""Tile-shape search for the FlashAttention-2 kernels (needs CUDA; run from the repository root).

    python -m tools.tune_flash_tiles --head-dims 64 128 --out-dir outputs/bench/flash_tune
    python -m tools.tune_flash_tiles --dtype fp32                      # float32 tiles

For each head dim, every candidate tile shape of each kernel (forward, dK/dV pass, dQ pass, and the
one-pass backward "onepass") is first checked against fp32 attention on a ragged causal shape, then
timed on the target shapes of that head dim; the two backward passes are timed inside a full
backward whose other pass keeps the current configuration, so the differences are theirs. The
winners go into `ops/flash_attn/tiles.py` by hand, with the numbers in
docs/perf/flash_attention.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from cs336_systems.bench.common import environment, time_ms

# (heads, N) per head dim: the target shapes (batch and heads merged; D given by the key).
TARGETS = {
    16: [(1, 16384), (1, 65536)],
    32: [(1, 16384), (1, 65536)],
    64: [(16, 16384), (64, 4096), (128, 1024)],
    128: [(8, 16384), (16, 4096)],
}
# (block_m, block_n, num_warps, num_stages) candidates per kernel: round 2, around round 1's winners
# (the winners are in docs/perf/flash_attention.md; both rounds' raw logs, flash_tune_round{1,2}_h100.jsonl, in
# docs/perf/ before commit 13ee397).
FORWARD = [(64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4), (128, 128, 8, 4),
           (128, 64, 8, 5), (64, 64, 4, 3), (128, 128, 8, 3)]
DKDV = [(32, 64, 4, 3), (32, 64, 4, 5), (16, 64, 4, 3), (16, 64, 2, 4), (32, 64, 2, 3), (64, 128, 8, 4),
        (64, 128, 8, 3), (32, 128, 8, 4), (64, 64, 4, 4)]
DQ = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 4), (128, 64, 8, 5), (64, 32, 4, 4),
      (128, 128, 8, 3), (64, 64, 4, 3)]
# The one-pass backward with descriptors (launch_onepass; Hopper only): round 2, around round 1's (64, 64, 4, 3).
ONEPASS = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 64, 4, 5), (64, 64, 8, 3), (64, 32, 4, 3),
         (32, 64, 4, 4), (128, 64, 4, 3), (64, 128, 8, 3)]
# float32 (three-TF32 products): the tiles that spilled least in an offline sm_90 compile survey,
# and a few wider ones that only fit at D <= 64.
FP32 = {"forward": [(64, 32, 4, 1), (32, 32, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3),
                    (64, 64, 4, 2)],
        "dkdv": [(32, 32, 4, 2), (32, 32, 4, 1), (64, 32, 4, 1), (32, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 1)],
        "dq": [(64, 32, 4, 1), (32, 32, 4, 1), (128, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 1)]}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_REL_ERROR = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # against fp32 attention computed by torch


def _inputs(bh: int, n: int, d: int, seed: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(bh, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(4)]


def _reference(q, k, v, do):
    """fp32 attention output and gradients (the math path, upcast inputs)."""
    from ops.flash_attn import attention_reference

    q32, k32, v32 = (x.float().requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q32, k32, v32, True)
    out.backward(do.float())
    return out, lse, q32.grad, k32.grad, v32.grad


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _runner(kind: str, blocks, q, k, v, do, scale: float):
    """A zero-argument call of the kernel(s) under test, with `blocks` swapped in for `kind`.

    For the backward kinds the forward runs once here, outside what is timed.
    """
    from ops.flash_attn.launch import flash_backward, flash_forward, kernel_configs
    from ops.flash_attn.launch_onepass import flash_backward_onepass

    if kind == "forward":
        return lambda: flash_forward(q, k, v, True, scale, blocks=blocks)
    out, lse = flash_forward(q, k, v, True, scale)
    if kind == "onepass":
        return lambda: flash_backward_onepass(do, q, k, v, out, lse, True, scale, blocks, descriptors=True)
    configs = dataclasses.replace(kernel_configs(q.shape[-1], q.dtype, q.shape[-2]), **{kind: blocks})
    return lambda: flash_backward(do, q, k, v, out, lse, True, scale, configs=configs)


def check(kind: str, blocks, d: int, dtype: torch.dtype) -> float:
    """Largest relative error of the kernel's outputs against fp32 on a ragged causal shape."""
    q, k, v, do = _inputs(3, 1000, d, seed=1, dtype=dtype)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = _reference(q, k, v, do)
    ours = _runner(kind, blocks, q, k, v, do, d**-0.5)()
    expected = (ref_out, ref_lse) if kind == "forward" else (ref_dq, ref_dk, ref_dv)
    return max(_rel_error(a, b) for a, b in zip(ours, expected))


def tune(d: int, kind: str, candidates: list[tuple[int, int, int, int]], rep_ms: float,
         dtype: torch.dtype = torch.bfloat16) -> list[dict[str, Any]]:
    """One row per candidate (the configuration in use first): its error and its time per target shape."""
    from ops.flash_attn.launch import Blocks, kernel_configs

    current = dataclasses.astuple(getattr(kernel_configs(d, dtype, max(n for _, n in TARGETS[d])), kind))
    rows = []
    for candidate in dict.fromkeys([current, *candidates]):
        blocks = Blocks(*candidate)
        row: dict[str, Any] = dict(head_dim=d, kernel=kind, dtype=str(dtype).removeprefix("torch."),
                                   blocks=list(candidate), current=candidate == current)
        try:
            row["rel_error"] = check(kind, blocks, d, dtype)
            for bh, n in TARGETS[d]:
                q, k, v, do = _inputs(bh, n, d, seed=2, dtype=dtype)
                row[f"{bh}x{n}"] = time_ms(_runner(kind, blocks, q, k, v, do, d**-0.5), "cuda", rep_ms=rep_ms)
                del q, k, v, do
        except Exception as error:  # noqa: BLE001 - e.g. a shape that needs too much shared memory
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[str]:
    """Best candidate per (head dim, kernel, shape) and the current configuration's time."""
    lines = []
    for (d, kind) in dict.fromkeys((r["head_dim"], r["kernel"]) for r in rows):
        group = [r for r in rows if (r["head_dim"], r["kernel"]) == (d, kind) and "error" not in r
                 and r["rel_error"] < MAX_REL_ERROR[getattr(torch, r["dtype"])]]
        for bh, n in TARGETS[d]:
            key = f"{bh}x{n}"
            if not group:
                continue
            best = min(group, key=lambda r: r[key])
            current = next((r for r in group if r["current"]), None)
            lines.append(f"D={d:>3} {kind:>8} {key:>10}: best {best['blocks']} {best[key]:.3f} ms"
                         + (f" (current {current['blocks']} {current[key]:.3f} ms)" if current else ""))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128], choices=list(TARGETS))
    parser.add_argument("--kernels", nargs="+", choices=["forward", "dkdv", "dq", "onepass"],
                        help="default: all four (bf16), all but onepass (fp32)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                        help="input dtype (fp32: the three-TF32 kernels; the one pass is 16-bit only)")
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--out-dir", default="outputs/bench/flash_tune")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the kernels are tuned for the GPU they will run on)")
    dtype = DTYPES[args.dtype]
    args.kernels = args.kernels or ["forward", "dkdv", "dq"] + (["onepass"] if dtype != torch.float32 else [])
    if dtype == torch.float32 and "onepass" in args.kernels:
        parser.error("--kernels onepass: the one-pass backward runs for 16-bit inputs only; drop it with --dtype fp32")
    candidates = FP32 if dtype == torch.float32 else {"forward": FORWARD, "dkdv": DKDV, "dq": DQ, "onepass": ONEPASS}
    rows = [r for d in args.head_dims for kind in args.kernels
            for r in tune(d, kind, candidates[kind], args.rep_ms, dtype)]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flash_tune.json").write_text(json.dumps({"meta": environment("cuda"), "rows": rows}, indent=1))
    print("\n".join(summarize(rows)))


if __name__ == "__main__":
    main()
