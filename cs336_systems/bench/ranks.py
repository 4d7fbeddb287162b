"""What the multi-rank memory benchmarks (`bench sharding`, `bench fsdp`) share: the configuration
of a run over spawned ranks, its flags, and per-rank measurement helpers."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from cs336_systems.bench.common import check_backend
from cs336_systems.distributed.launch import default_backend
from cs336_systems.errors import ConfigError, check_float, positive_float
from cs336_systems.presets import PRESETS, get_preset

MIB = 2**20


@dataclass(kw_only=True)
class RankBenchConfig:
    """A benchmark that builds a model on several ranks and trains each variant for a few rounds."""

    VARIANTS: ClassVar[tuple[str, ...]] = ()
    """The variants a subclass knows; `variants` picks among them."""

    preset: str = "mini"
    """Model size, a key of cs336_systems.presets.PRESETS."""
    batch_size: int = 8
    """Sequences per rank and step."""
    context_length: int = 128
    """Tokens per sequence."""
    nproc: int = 2
    """Ranks to spawn (ignored under torchrun)."""
    backend: str = field(default_factory=default_backend)
    """gloo (CPU) or nccl (one GPU per rank)."""
    variants: list[str] = field(default_factory=list)
    """Variants to run, in order (default: all); the first is the reference for the weight comparison."""
    lr: float = 1e-3
    """AdamW learning rate: large enough that diverging variants show in the weights."""
    warmup: int = 2
    """Untimed iterations per variant and round."""
    steps: int = 5
    """Timed iterations per variant and round."""
    rounds: int = 3
    """Times each variant is rebuilt and timed; the times of all rounds are pooled."""

    def __post_init__(self) -> None:
        get_preset(self.preset)  # a ConfigError naming --preset and the choices
        self.variants = list(self.variants or self.VARIANTS)
        # nproc: with one rank there is nothing to shard.
        minimums = {"batch_size": 1, "context_length": 1, "steps": 1, "rounds": 1, "warmup": 0, "nproc": 2}
        for name, least in minimums.items():
            if getattr(self, name) < least:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(self, name)}")
        check_float(self.lr, "--lr", "positive")
        check_backend(self.backend, self.nproc)
        unknown = set(self.variants) - set(self.VARIANTS)
        if unknown:
            raise ConfigError(f"--variants: unknown {sorted(unknown)} (choose from {', '.join(self.VARIANTS)})")

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def add_rank_arguments(parser: argparse.ArgumentParser, defaults: RankBenchConfig) -> None:
    """The flags of every RankBenchConfig field, defaults from `defaults`."""
    parser.add_argument("--preset", default=defaults.preset, help=f"model size: {', '.join(PRESETS)}")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per rank")
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="ranks to spawn (not under torchrun)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl with CUDA GPUs, else gloo")
    parser.add_argument("--variants", nargs="+", default=defaults.variants,
                        help=f"subset to run, in order: {', '.join(defaults.VARIANTS)}")
    parser.add_argument("--lr", type=positive_float, default=defaults.lr)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)


def rss_mib() -> float | None:
    """Resident memory of this process now (Linux), or None where /proc is missing."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / MIB


def slowest(per_rank: list[list[float]]) -> list[float]:
    """Each iteration at its slowest rank: a step with collectives is done when its last rank is."""
    return [max(times) for times in zip(*per_rank, strict=True)]


def memory_rows(variants: list[str], gathered: list[tuple], points: tuple[str, ...]) -> list[dict]:
    """One row per variant and point from every rank's `(times, memory, ...)` tuple, whose memory is
    {variant: {point: {column: MiB or None}}}; each column the largest rank's value."""
    rows = []
    for variant in variants:
        for point in points:
            per_rank = [rank[1][variant][point] for rank in gathered]
            row: dict = {"variant": variant, "point": point}
            for key in per_rank[0]:
                values = [m[key] for m in per_rank if m[key] is not None]
                row[key] = max(values) if values else None
            rows.append(row)
    return rows
