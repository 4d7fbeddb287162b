"""Data-parallel training step time and communication share, ours against torch DDP.

    python -m cs336_systems bench ddp                     # CPU: gloo, 2 ranks, `small`, batch 1
    python -m cs336_systems bench ddp                     # 2 GPUs: NCCL, `xl`, batch 2 (CS336's setting)
    torchrun --nproc-per-node 2 -m cs336_systems bench ddp --preset xl --batch-size 2

Variants, each timed on the same per-rank batch of the cs336_basics LM with AdamW:
  no-comm          the model alone, no communication: the compute floor
  naive, flat      all-reduce after backward, per gradient / one flattened buffer (ddp_baselines)
  individual       DDPIndividualParameters: per-gradient all-reduce overlapped with backward
  bucketed-N       DDPBucketed with N MiB buckets (CS336's 1, 10, 100, 1000, and torch DDP's 25)
  torch-ddp        torch.nn.parallel.DistributedDataParallel (25 MiB buckets, the first 1 MiB)
Variants run one after another in `rounds` rounds, every other round in reverse order (so slow
drift on a shared machine hits all of them alike); each round rebuilds the model, runs `warmup`
untimed steps, then `steps` timed ones. Ranks start each step together (a barrier outside the
timed region); a step's time is the slowest rank's, reported as the median over steps. `comm_ms` is the time
the step is blocked in finish_gradient_synchronization(): all the communication for naive and
flat, only the part backward did not hide for the overlapping wrappers, and unknown for torch
DDP, which syncs inside backward; `exposed_ms` = step − no-comm step measures all variants alike.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cs336_systems.bench.common import (
    Results,
    check_backend,
    environment,
    free_device_memory,
    is_oom,
    synchronize,
)
from cs336_systems.distributed.collectives import gather_from_ranks
from cs336_systems.distributed.launch import default_backend, run_on_ranks
from cs336_systems.errors import ConfigError, directory, positive_float
from cs336_systems.parallel.ddp import DDPBucketed, DDPIndividualParameters
from cs336_systems.parallel.ddp_baselines import FlatDDP, NaiveDDP
from cs336_systems.presets import PRESETS, VOCAB_SIZE, ModelConfig
from cs336_systems.training.loss import lm_loss

FIXED_VARIANTS = ("no-comm", "naive", "flat", "individual", "torch-ddp")


@dataclass(kw_only=True)
class DDPBenchConfig:
    """One `bench ddp` run."""

    preset: str | None = None
    """Model size, a key of cs336_systems.presets.PRESETS (None: `small` on gloo, `xl` on NCCL)."""
    batch_size: int | None = None
    """Sequences per rank and step (None: 1 on gloo, 2 on NCCL)."""
    context_length: int = 128
    """Tokens per sequence."""
    nproc: int = 2
    """Ranks to spawn (ignored under torchrun)."""
    backend: str = field(default_factory=default_backend)
    """gloo (CPU) or nccl (one GPU per rank)."""
    bucket_sizes_mb: list[float] = field(default_factory=lambda: [1, 10, 25, 100, 1000])
    """DDPBucketed bucket sizes to run, one variant each."""
    variants: list[str] | None = None
    """Subset of the variants to run, in order (None: all)."""
    gradient_as_bucket_view: bool = False
    """Passed to our wrappers and to torch DDP alike."""
    warmup: int = 2
    """Untimed steps per variant and round."""
    steps: int = 5
    """Timed steps per variant and round."""
    rounds: int = 2
    """Times each variant is rebuilt and timed; the step times of all rounds are pooled."""

    def __post_init__(self) -> None:
        on_gpus = self.backend == "nccl"
        self.preset = self.preset or ("xl" if on_gpus else "small")
        self.batch_size = self.batch_size or (2 if on_gpus else 1)
        if self.preset not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {self.preset!r} (choose from {', '.join(PRESETS)})")
        for name in ("batch_size", "context_length", "steps", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0")
        if self.nproc < 2:
            raise ConfigError("--nproc: data parallelism needs at least 2 ranks")
        check_backend(self.backend, self.nproc)
        if any(size <= 0 for size in self.bucket_sizes_mb):
            raise ConfigError("--bucket-sizes-mb must be positive")
        unknown = set(self.variants or ()) - set(self.all_variants)
        if unknown:
            raise ConfigError(f"--variants: unknown {sorted(unknown)} (choose from {', '.join(self.all_variants)})")

    @property
    def all_variants(self) -> list[str]:
        bucketed = [f"bucketed-{size:g}" for size in self.bucket_sizes_mb]
        return [*FIXED_VARIANTS[:4], *bucketed, FIXED_VARIANTS[4]]

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = DDPBenchConfig(backend="gloo")
    parser.add_argument("--preset", help=f"model size: {', '.join(PRESETS)} (default: small on CPU, xl on GPUs)")
    parser.add_argument("--batch-size", type=int, help="sequences per rank (default: 1 on CPU, 2 on GPUs)")
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--nproc", type=int, default=defaults.nproc, help="ranks to spawn (not under torchrun)")
    parser.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl with CUDA GPUs, else gloo")
    parser.add_argument("--bucket-sizes-mb", type=positive_float, nargs="+", default=defaults.bucket_sizes_mb)
    parser.add_argument("--variants", nargs="+", help="subset to run (default: all; see above)")
    parser.add_argument("--gradient-as-bucket-view", action="store_true",
                        help="gradients as views of the communication buffers (ours and torch DDP)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--rounds", type=int, default=defaults.rounds)
    parser.add_argument("--out-dir", type=directory, default="docs/perf", help="where ddp.{md,json,png} go")


# ------------------------------------------------------------------------------ on each rank


def _build(variant: str, config: DDPBenchConfig) -> tuple[nn.Module, torch.optim.Optimizer]:
    from cs336_basics.optimizer import AdamW

    torch.manual_seed(0)
    model = ModelConfig(preset=config.preset, vocab_size=VOCAB_SIZE, context_length=config.context_length)
    module = model.build().to(config.device)
    view = config.gradient_as_bucket_view
    if variant == "naive":
        module = NaiveDDP(module)
    elif variant == "flat":
        module = FlatDDP(module)
    elif variant == "individual":
        module = DDPIndividualParameters(module, gradient_as_bucket_view=view)
    elif variant.startswith("bucketed-"):
        module = DDPBucketed(module, bucket_size_mb=float(variant.removeprefix("bucketed-")),
                             gradient_as_bucket_view=view)
    elif variant == "torch-ddp":
        ids = [config.device.index] if config.device.type == "cuda" else None
        module = nn.parallel.DistributedDataParallel(module, device_ids=ids, gradient_as_bucket_view=view)
    return module, AdamW(module.parameters(), lr=1e-4)


def _elapsed_ms(fn, device: torch.device) -> float:
    """Time `fn()` on the device's clock: CUDA events on the current stream, so an all-reduce that a
    stream merely waits for counts, without a host sync that would serialise the step."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()  # after the wait: the optimizer step has not been queued yet either way
    return start.elapsed_time(end)


def _time_steps(variant: str, config: DDPBenchConfig) -> tuple[list[float], list[float]]:
    """(step ms, blocked-in-finish ms) of each timed step of one freshly built variant."""
    model, opt = _build(variant, config)
    g = torch.Generator().manual_seed(dist.get_rank())  # every rank its own batch
    tokens = torch.randint(0, VOCAB_SIZE, (config.batch_size, config.context_length + 1), generator=g)
    x, y = tokens[:, :-1].to(config.device), tokens[:, 1:].to(config.device)
    begin = getattr(model, "on_train_batch_start", lambda: None)
    finish = getattr(model, "finish_gradient_synchronization", lambda: None)
    steps, comm = [], []
    for i in range(config.warmup + config.steps):
        synchronize(config.device)
        dist.barrier()  # all ranks start the step together: no rank's head start counts as communication
        start = time.perf_counter()
        begin()
        # Bucket views survive only if gradients are zeroed in place (ours and torch DDP's alike).
        opt.zero_grad(set_to_none=not config.gradient_as_bucket_view)
        lm_loss(model, x, y).backward()
        finish_ms = _elapsed_ms(finish, config.device)
        opt.step()
        synchronize(config.device)
        if i >= config.warmup:
            steps.append((time.perf_counter() - start) * 1e3)
            comm.append(finish_ms)
    return steps, comm


def _run(config: DDPBenchConfig) -> list[dict[str, Any]]:
    """On every rank: every variant, `rounds` times; one aggregated row per variant."""
    variants = config.variants or config.all_variants
    times: dict[str, list[tuple[list[float], list[float]]]] = {v: [] for v in variants}
    failed: dict[str, str] = {}
    gc.freeze()  # what exists now (torch's modules) is never garbage: keep each gc.collect() below short
    for round_ in range(config.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            if variant in failed:
                continue
            try:
                times[variant].append(_time_steps(variant, config))
            except RuntimeError as error:  # an OOM is an OOM row, not a crashed benchmark
                if not is_oom(error):
                    raise
                failed[variant] = "OOM"
            # The wrappers' hooks close over the wrapper, a reference cycle: collect it now so the
            # next variant does not find the previous model still holding memory.
            gc.collect()
            free_device_memory()
    gathered = gather_from_ranks(times)  # [rank][variant][round] -> (steps, comm)
    return [_aggregate(v, [rank[v] for rank in gathered], failed.get(v)) for v in variants]


def _aggregate(variant: str, per_rank: list[list[tuple[list[float], list[float]]]], failure: str | None) -> dict:
    """Each step counts at its slowest rank; medians over all rounds' steps, and per round."""
    if failure or not per_rank[0]:
        return dict(variant=variant, step_ms=failure or "n/a")
    rounds = [  # per round: (slowest-rank ms of each step, slowest-rank finish ms of each step)
        ([max(s) for s in zip(*(r[i][0] for r in per_rank))], [max(s) for s in zip(*(r[i][1] for r in per_rank))])
        for i in range(len(per_rank[0]))
    ]
    steps, comm = [t for r in rounds for t in r[0]], [t for r in rounds for t in r[1]]
    overlaps = variant not in ("naive", "flat", "no-comm")
    return dict(variant=variant, step_ms=statistics.median(steps),
                step_std_ms=statistics.stdev(steps) if len(steps) > 1 else 0.0,
                comm_ms=float("nan") if variant == "torch-ddp" else statistics.median(comm),
                comm_is={"no-comm": "none", "torch-ddp": "unknown"}.get(variant, "exposed" if overlaps else "all"),
                round_ms=[statistics.median(r[0]) for r in rounds])


def _finalise(rows: list[dict[str, Any]]) -> None:
    """Add the columns that compare rows: exposed communication and the ratio to torch DDP.

    The ratio is paired by round (this variant's round median over torch DDP's in the same
    round), then the median over rounds: load from other processes drifts between rounds, and
    pairing cancels most of it.
    """
    by_name = {r["variant"]: r for r in rows if isinstance(r.get("step_ms"), float)}
    floor, ddp = by_name.get("no-comm"), by_name.get("torch-ddp")
    for row in by_name.values():
        row["comm_share"] = row["comm_ms"] / row["step_ms"]
        if floor:
            row["exposed_ms"] = row["step_ms"] - floor["step_ms"]
        if ddp:
            row["vs_torch_ddp"] = statistics.median(a / b for a, b in zip(row["round_ms"], ddp["round_ms"]))


def _draw(rows: list[dict[str, Any]]):
    def draw(plt: Any) -> None:
        timed = [r for r in rows if isinstance(r.get("step_ms"), float)]
        names = [r["variant"] for r in timed]
        comm = [0.0 if r["comm_ms"] != r["comm_ms"] else r["comm_ms"] for r in timed]  # nan: torch DDP
        _, ax = plt.subplots(figsize=(8, 4))
        ax.bar(names, [r["step_ms"] - c for r, c in zip(timed, comm)], label="compute (+ hidden comm)")
        ax.bar(names, comm, bottom=[r["step_ms"] - c for r, c in zip(timed, comm)],
               label="blocked in finish_gradient_synchronization")
        if "torch-ddp" in names:
            ax.axhline(timed[names.index("torch-ddp")]["step_ms"], color="black", linestyle="--", linewidth=1,
                       label="torch DDP")
        ax.set(ylabel="ms per step", title="DDP variants: time per training step",
               ylim=(0, 1.3 * max(r["step_ms"] for r in timed)))  # headroom for the legend
        ax.tick_params(axis="x", rotation=30)
        ax.legend(loc="upper left", ncols=3, fontsize="small")
    return draw


def main(args: argparse.Namespace) -> int:
    config = DDPBenchConfig(
        preset=args.preset, batch_size=args.batch_size, context_length=args.context_length, nproc=args.nproc,
        backend=args.backend or default_backend(), bucket_sizes_mb=args.bucket_sizes_mb, variants=args.variants,
        gradient_as_bucket_view=args.gradient_as_bucket_view, warmup=args.warmup, steps=args.steps,
        rounds=args.rounds,
    )
    rows = run_on_ranks(_run, config.nproc, config.backend, config)
    if rows is None:  # a torchrun rank other than 0
        return 0
    _finalise(rows)
    meta = {**environment("cuda" if config.backend == "nccl" else "cpu"), **asdict(config),
            "world_size": dist.get_world_size() if dist.is_initialized() else config.nproc}
    results = Results("ddp", meta=meta, rows=rows)
    results.write(args.out_dir, columns=["variant", "step_ms", "step_std_ms", "comm_ms", "comm_is", "comm_share",
                                         "exposed_ms", "vs_torch_ddp"])
    results.plot(args.out_dir, _draw(rows))
    return 0
