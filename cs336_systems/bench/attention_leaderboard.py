"""`bench attention --leaderboard`: the CS336 leaderboard timing, ours against SDPA's backends and FlexAttention.

    python -m cs336_systems bench attention --leaderboard    # 16 x 16384 x 64 bf16 causal: ours vs SDPA
    python -m cs336_systems bench attention --leaderboard --repeats 3 --rep-ms 1000   # interleaved rounds

As the CS336 script times it: torch.compile(FlashAttention2Triton.apply) on (heads, N, D) views of one
leaf, forward and o.sum().backward(); the other contenders take the same tensors as (1, heads, N, D).
Output: leaderboard.md and leaderboard.json (each time the median of the rounds, every round's time kept).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch

from cs336_systems.bench.common import OOM, Results, environment, interleaved_rounds, is_oom, time_ms

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def leaderboard(args: argparse.Namespace, others: dict[str, AttentionFn]) -> Results:
    """The CS336 leaderboard timing: torch.compile(FlashAttention2Triton.apply), o.sum().backward(), and
    the same for `others` (name -> causal attention over (1, heads, N, D))."""
    from ops.flash_attn import FlashAttention2Triton

    heads, n, d, device = *args.leaderboard_shape, args.device
    qkv = torch.randn(3, heads, n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = qkv  # (heads, N, D) each: views of one leaf, as in the CS336 script
    compiled = torch.compile(FlashAttention2Triton.apply)
    contenders: dict[str, AttentionFn] = {"ours": lambda q, k, v: compiled(q, k, v, True), **others}
    results = Results("leaderboard", meta={**environment(device), "shape": f"{heads}x{n}x{d}", "dtype": "bfloat16",
                                           "causal": True, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
                                           "repeats": args.repeats})
    # Each row keeps every round's time and reports the median.
    runs = interleaved_rounds(contenders, args.repeats,
                              lambda name: _leaderboard_times(name, contenders[name], q, k, v, device, args))
    results.rows = [_leaderboard_row(name, times) for name, times in runs.items()]
    ours = results.rows[0]
    for row in results.rows:
        for key in ("forward_ms", "fwd_bwd_ms"):
            if row[key] is not None and ours[key] is not None:
                row[key.replace("_ms", "_ours_over_this")] = ours[key] / row[key]
    return results


def _leaderboard_times(name: str, fn: AttentionFn, q, k, v, device: str, args: argparse.Namespace) -> dict[str, Any]:
    four_d = name != "ours"  # SDPA backends and FlexAttention want (B, H, N, D)
    call = (lambda: fn(q[None], k[None], v[None])) if four_d else (lambda: fn(q, k, v))

    def forward_backward() -> None:
        call().sum().backward()

    times: dict[str, Any] = {}
    for key, run in (("forward_ms", call), ("fwd_bwd_ms", forward_backward)):
        try:
            times[key] = time_ms(run, device, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
        except Exception as error:  # noqa: BLE001 - a backend that cannot run is a row, not a crash
            reason = OOM if is_oom(error) else f"unsupported: {str(error).splitlines()[0][:80]}"
            times[key], times["status"] = None, reason
    print(f"{name:>15}: forward {_ms(times['forward_ms'])}, forward+backward {_ms(times['fwd_bwd_ms'])}", flush=True)
    return times


def _leaderboard_row(name: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each time over the rounds (None if any round failed), and the rounds' times."""
    row: dict[str, Any] = {"impl": name}
    for key in ("forward_ms", "fwd_bwd_ms"):
        values = [r[key] for r in rounds]
        row[key] = None if None in values else statistics.median(values)
        row[key.replace("_ms", "_runs_ms")] = values
    status = next((r["status"] for r in rounds if "status" in r), None)
    if status is not None:
        row["status"] = status
    return row


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"
