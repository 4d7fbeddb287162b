"""Activation memory per activation-checkpointing policy (the CS336 2026 memory study).

    python -m cs336_systems bench memory                         # CUDA: preset xl, batch 4, ctx 2048, bf16
    python -m cs336_systems bench memory --device cpu --preset tiny --batch-size 2 --context-length 32

Two tables, one model definition (cs336_basics, attention `--attention`, parameters in `--dtype`):

  memory_block   what one block keeps for backward under none, full and selective: the bytes of
                 tensors made during its forward and still alive after it (saved activations,
                 whatever holds them: autograd or the selective cache) plus its input, per token and
                 in units of d_model values
  memory         per policy (none, full, selective, every:K for every divisor K of the layer count):
                 activation bytes alive after the forward (all devices) and, on CUDA, the peak
                 allocated memory of forward + loss + backward and its time. The best group size is
                 the K of every:K with the lowest peak (CPU: the least memory after the forward).

Eager, no compilation: the numbers are what the policy keeps, not what a compiler fuses away.
The default attention is torch's SDPA, whose op the selective policy sees in eager mode; our
"flash" is saved only when compiled (see parallel/activation_checkpointing.py).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from cs336_systems.bench.common import OOM, Results, environment, free_device_memory, is_oom, synchronize
from cs336_systems.errors import ConfigError, directory, flags_renamed
from cs336_systems.parallel.activation_checkpointing import (
    SELECTIVE_SAVED_MATMULS,
    CheckpointedBlocks,
    apply_activation_checkpointing,
)
from cs336_systems.parallel.checkpoint_plan import retained_bytes
from cs336_systems.presets import VOCAB_SIZE, ModelConfig, get_preset
from cs336_systems.runtime import pick_device
from cs336_systems.training.loss import lm_loss

GIB = 2**30
BLOCK_POLICIES = ("none", "full", "selective")


@dataclass(kw_only=True)
class MemoryBenchConfig:
    """One `bench memory` run."""

    model: ModelConfig
    """Model shape and attention (vocabulary and context resolved)."""
    batch_size: int = 4
    """Sequences per step."""
    context_length: int = 2048
    """Tokens per sequence."""
    device: str = "auto"
    """Where to run."""
    dtype: str | None = None
    """Parameter dtype, "float32" or "bfloat16"; None: bfloat16 on CUDA, float32 on CPU."""
    group_sizes: tuple[int, ...] | None = None
    """K of the every:K policies; None: every divisor of the layer count."""

    def __post_init__(self) -> None:
        self.device = str(pick_device(self.device))
        if self.dtype is None:
            self.dtype = "bfloat16" if torch.device(self.device).type == "cuda" else "float32"
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        for name in ("batch_size", "context_length"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        self.model.check_context(self.context_length)
        self.model.check_attention()
        if self.group_sizes is None:
            layers = self.model.num_layers
            self.group_sizes = tuple(k for k in range(1, layers + 1) if layers % k == 0)
        if not all(k >= 1 for k in self.group_sizes):
            raise ConfigError(f"--group-sizes must be positive, got {self.group_sizes}")

    def policies(self) -> list[str]:
        return ["none", "full", "selective", *(f"every:{k}" for k in self.group_sizes)]


def _build(config: MemoryBenchConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device(config.device):  # initialised on the device: an xl model is slow to fill on a CPU
        model = config.model.build()
    return model.to(getattr(torch, config.dtype))


def _tokens(config: MemoryBenchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (config.batch_size, config.context_length + 1)
    tokens = torch.randint(0, config.model.vocab_size, shape, generator=generator).to(config.device)
    return tokens[:, :-1], tokens[:, 1:]


def block_rows(config: MemoryBenchConfig) -> list[dict[str, Any]]:
    """What one block keeps for backward under each of BLOCK_POLICIES."""
    model, rows = _build(config), []
    block, d = model.layers[0], config.model.d_model
    tokens = config.batch_size * config.context_length
    x = torch.randn(config.batch_size, config.context_length, d, device=config.device,
                    dtype=getattr(torch, config.dtype), requires_grad=True)
    for policy in BLOCK_POLICIES:
        region = block if policy == "none" else CheckpointedBlocks(
            [block], first=0, saved_matmuls=SELECTIVE_SAVED_MATMULS if policy == "selective" else None)
        saved, out = retained_bytes(region, x)
        saved += x.nbytes  # the input, which every policy keeps (made before the tracker started)
        out.sum().backward()
        itemsize = x.element_size()
        rows.append({"policy": policy, "saved_mib": saved / 2**20, "bytes_per_token": saved / tokens,
                     "d_model_values_per_token": saved / tokens / itemsize / d})
        del out
        x.grad = None
        model.zero_grad(set_to_none=True)
    return rows


def _measure(config: MemoryBenchConfig, policy: str) -> dict[str, Any]:
    model = apply_activation_checkpointing(_build(config), policy)
    inputs, targets = _tokens(config)
    device = torch.device(config.device)
    lm_loss(model, inputs, targets).backward()  # warm-up: allocator, cuBLAS workspaces
    model.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    synchronize(device)
    start = time.perf_counter()
    lm_loss(model, inputs, targets).backward()
    synchronize(device)
    row: dict[str, Any] = {"policy": policy, "forward_backward_ms": (time.perf_counter() - start) * 1e3}
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        row["peak_over_params_gib"] = (torch.cuda.max_memory_allocated(device) - base) / GIB
    model.zero_grad(set_to_none=True)
    # Untimed: the tracker's per-operator Python work would count in the time above.
    after_forward, loss = retained_bytes(lm_loss, model, inputs, targets)
    row["forward_retained_gib"] = after_forward / GIB
    loss.backward()
    return row


def model_rows(config: MemoryBenchConfig) -> list[dict[str, Any]]:
    """One row per policy; a policy that runs out of memory gets an OOM row."""
    rows = []
    for policy in config.policies():
        try:
            row = _measure(config, policy)
        except RuntimeError as error:
            if not is_oom(error):
                raise
            row = {"policy": policy, "forward_retained_gib": OOM}
        finally:
            gc.collect()
            free_device_memory()
        rows.append(row)
        print(f"{policy}: {row}", flush=True)
    return rows


def best_group_size(rows: list[dict[str, Any]]) -> int | None:
    """K of the every:K row with the least peak (or, without peaks, the least memory after forward)."""
    key = "peak_gib" if any("peak_gib" in row for row in rows) else "forward_retained_gib"
    groups = [row for row in rows if row["policy"].startswith("every:") and isinstance(row.get(key), float)]
    return int(min(groups, key=lambda row: row[key])["policy"].split(":")[1]) if groups else None


def _draw(rows: list[dict[str, Any]]):
    def draw(plt: Any) -> None:
        key = "peak_gib" if any("peak_gib" in row for row in rows) else "forward_retained_gib"
        ok = [row for row in rows if isinstance(row.get(key), float)]
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(ok), 3.5))
        ax.bar([row["policy"] for row in ok], [row[key] for row in ok])
        ax.set(ylabel=key.replace("_", " "), title="activation checkpointing: memory per policy")
        ax.tick_params(axis="x", rotation=45)
    return draw


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--preset", default="xl", help="model size (default: xl)")
    group.add_argument("--layers", type=int, metavar="N", help="number of blocks (default: the preset's)")
    group.add_argument("--vocab-size", type=int, default=VOCAB_SIZE, help=f"vocabulary (default: {VOCAB_SIZE})")
    group.add_argument("--attention", default="sdpa", help="attention implementation (default: sdpa)")
    group = parser.add_argument_group("benchmark")
    group.add_argument("--batch-size", type=int, default=4, help="sequences per step (default: 4)")
    group.add_argument("--context-length", type=int, default=2048, help="tokens per sequence (default: 2048)")
    group.add_argument("--dtype", choices=("float32", "bfloat16"), help="parameter dtype (default: bf16 on CUDA)")
    group.add_argument("--group-sizes", type=int, nargs="+", metavar="K",
                       help="K of the every:K policies (default: every divisor of the layer count)")
    group.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    group.add_argument("--out-dir", type=directory, default="outputs/bench/memory",
                       help="where memory*.{md,json,png} go")


def main(args: argparse.Namespace) -> int:
    get_preset(args.preset)
    with flags_renamed({"--num-layers": "--layers"}):  # ModelConfig names train's flags
        model = ModelConfig(preset=args.preset, num_layers=args.layers, vocab_size=args.vocab_size,
                            context_length=args.context_length, attention=args.attention)
    config = MemoryBenchConfig(model=model, batch_size=args.batch_size, context_length=args.context_length,
                               device=args.device, dtype=args.dtype,
                               group_sizes=tuple(args.group_sizes) if args.group_sizes else None)
    meta = {**environment(config.device), "preset": args.preset, "layers": model.num_layers,
            "d_model": model.d_model, "batch_size": config.batch_size, "context_length": config.context_length,
            "dtype": config.dtype, "attention": model.attention}
    Results("memory_block", meta=meta, rows=block_rows(config)).write(args.out_dir)
    rows = model_rows(config)
    best = best_group_size(rows)
    results = Results("memory", meta={**meta, "best_group_size": best}, rows=rows)
    results.write(args.out_dir)
    results.plot(args.out_dir, _draw(rows))
    print(f"best group size: every:{best}" if best else "best group size: none (every policy ran out of memory)")
    return 0



if __name__ == "__main__":  # python -m cs336_systems.bench.memory [flags], until the CLI lists `bench memory`
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
