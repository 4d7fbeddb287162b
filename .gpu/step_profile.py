"""Where the 8B step's device time goes, per layer: ours@selective at the 8b-32k widths with two layer
counts, one step each under torch.profiler (cs336_systems.bench.kernel_profile), kernel time by
category; per layer = (time at L2 - time at L1) / (L2 - L1).

    PYTHONPATH=. python3 .gpu/step_profile.py 2 4

(The numbers in docs/perf/train_step.md came from this script's first version, which had the same
categories inline; `bench step --profile` gives one layer count's table.)
"""
import sys

import torch

from cs336_systems.bench.kernel_profile import kernel_times
from cs336_systems.bench.step import StepBenchConfig, ours_setup
from cs336_systems.presets import ModelConfig


def profile_layers(layers: int) -> dict[str, float]:
    model_config = ModelConfig(preset="8b", vocab_size=151936, attention="flash", num_layers=layers,
                               context_length=32768)
    config = StepBenchConfig(model=model_config, batch=2, ctx=32768)
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
    times = kernel_times(step, "cuda")
    torch.compiler.reset()
    return times


def main() -> None:
    counts = [int(a) for a in sys.argv[1:]] or [2, 4]
    runs = {n: profile_layers(n) for n in counts}
    lo, hi = counts[0], counts[-1]
    labels = list(dict.fromkeys(label for n in counts for label in runs[n]))
    print("| category | " + " | ".join(f"L{n} ms" for n in counts) + " | per layer ms |")
    print("|---|" + "---|" * (len(counts) + 1))
    for label in labels:
        vals = [runs[n].get(label, 0.0) for n in counts]
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {(vals[-1] - vals[0]) / (hi - lo):.1f} |")


if __name__ == "__main__":
    main()
