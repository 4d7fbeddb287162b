"""Where the 8B step's device time goes: ours@selective at the 8b-32k widths with few layers, one
step under torch.profiler, kernel time by category. Per layer = (time at L2 - time at L1) / (L2 - L1).

    PYTHONPATH=. python3 .gpu/step_profile.py 2 4
"""
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from cs336_systems.bench.step import StepBenchConfig, ours_setup
from cs336_systems.presets import ModelConfig

CATEGORIES = (  # first match wins: (category, substrings of the kernel name)
    ("attn_fwd", ("flash_fwd",)),
    ("attn_bwd", ("flash_bwd", "_bwd_pre", "bwd_preprocess", "dq_convert", "convert_dq")),
    ("lm_loss", ("lce", "linear_cross", "cross_entropy")),
    ("adamw", ("adam", "multi_tensor")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "wgmma")),
    ("inductor", ("triton_",)),
    ("copy/fill", ("elementwise", "copy", "fill", "memcpy", "memset", "cat", "index")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def profile_layers(layers: int) -> tuple[dict, dict, float]:
    config = StepBenchConfig(model=ModelConfig(preset="8b", vocab_size=151936, attention="flash", num_layers=layers,
                                               context_length=32768),
                             batch=2, ctx=32768)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = config.model.build()
    model.to(torch.bfloat16)
    loss_fn, optimizer = ours_setup(model, config, "selective")
    tokens = torch.randint(0, 151936, (2, 32769), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        optimizer.step()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    wall = start.elapsed_time(end)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    by_cat, by_name = defaultdict(float), defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        t = evt.device_time_total / 1e3  # ms
        if t <= 0:
            continue
        by_cat[category(evt.key)] += t
        by_name[evt.key][0] += t
        by_name[evt.key][1] += evt.count
    torch.compiler.reset()
    torch.cuda.empty_cache()
    return by_cat, by_name, wall


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [2, 4]
    runs = {n: profile_layers(n) for n in counts}
    lo, hi = counts[0], counts[-1]
    cats = sorted(set().union(*(r[0] for r in runs.values())))
    print("| category | " + " | ".join(f"L{n} ms" for n in counts) + " | per layer ms |")
    print("|---|" + "---|" * (len(counts) + 1))
    for cat in cats:
        vals = [runs[n][0].get(cat, 0.0) for n in counts]
        per = (vals[-1] - vals[0]) / (hi - lo)
        print(f"| {cat} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {per:.1f} |")
    busy = [sum(runs[n][0].values()) for n in counts]
    walls = [runs[n][2] for n in counts]
    for label, vals in (("kernels, total", busy), ("step wall (events)", walls)):
        per = (vals[-1] - vals[0]) / (hi - lo)
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {per:.1f} |")
    print(f"\ntop kernels at L{hi} (ms, calls):")
    for name, (t, n) in sorted(runs[hi][1].items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{t:9.1f} {n:5d}  [{category(name)}] {name[:110]}")


if __name__ == "__main__":
    main()
