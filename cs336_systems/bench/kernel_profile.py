"""Where one training step's time goes: kernel time by category, from torch.profiler.

`kernel_times(step, device)` runs `step()` once under the profiler and sums, per category, the
device time of every CUDA kernel (on a CPU, the self time of every operator). Categories come from
kernel names (first match wins, CATEGORIES): our attention kernels, cuBLAS/CUTLASS matmuls,
inductor's fused Triton kernels, the fused LM loss, the optimizer, copies. `bench step --profile`
reports them per contender; run it at two layer counts and take the difference for one layer's
share (docs/perf/train_step.md does this at 2 and 4 layers).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from cs336_systems.bench.common import synchronize

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # ours (Gluon and tl), FlashAttention-2 in torch (flash_fwd/bwd), cuDNN (fprop/bprop), xFormers-style
    # memory-efficient kernels (fmha_cutlassF/B): before "matmul", whose patterns some of them contain.
    ("attention forward", ("flash_fwd", "flash_attn_fwd", "fprop", "fmha_cutlassf")),
    ("attention backward", ("flash_bwd", "flash_attn_bwd", "bprop", "fmha_cutlassb", "dq_convert")),
    ("lm loss", ("lce_", "linear_cross_entropy", "cross_entropy", "log_softmax", "nll_loss")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")),
    ("copy / fill", ("copy", "fill", "memcpy", "memset", "clone", "contiguous", "aten::cat")),
)
INDUCTOR = "fused pointwise (inductor)"  # kernels named triton_*: inductor's (RoPE fused around attention too)
OTHER = "other"


def category(name: str) -> str:
    """The category of a kernel (or, on a CPU, an operator) name."""
    low = name.lower()
    if low.startswith("triton_"):  # before the patterns: inductor names kernels after the ops they fuse
        return INDUCTOR
    for label, keys in CATEGORIES:
        if any(key in low for key in keys):
            return label
    return OTHER


def kernel_times(step: Callable[[], Any], device: str) -> dict[str, float]:
    """ms per category for one call of `step`, largest first, plus "total". CUDA: kernel device time
    (activity CUDA only, so no operator is counted twice); CPU: operators' self time."""
    cuda = torch.device(device).type == "cuda"
    synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        synchronize(device)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            totals[category(event.key)] += us / 1e3
    times = dict(sorted(totals.items(), key=lambda item: -item[1]))
    times["total"] = sum(totals.values())
    return times


def kernel_table(rows: Sequence[dict[str, Any]], key: str = "kernel_ms") -> str:
    """Markdown: one column per contender row that has `key`, one line per category (ms)."""
    rows = [row for row in rows if isinstance(row.get(key), dict)]
    if not rows:
        return ""
    labels = [label for label, _ in CATEGORIES] + [INDUCTOR, OTHER, "total"]
    present = [label for label in labels if any(label in row[key] for row in rows)]
    lines = ["| category (ms) | " + " | ".join(row["contender"] for row in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for label in present:
        cells = [f"{row[key][label]:.1f}" if label in row[key] else "" for row in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
