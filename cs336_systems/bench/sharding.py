"""Optimizer state sharding: memory per rank and time per iteration, ours against torch's ZeRO.

    python -m cs336_systems bench sharding                               # CPU: gloo, 2 spawned ranks, `mini`
    python -m cs336_systems bench sharding --preset xl --batch-size 2    # 2 GPUs: NCCL (CS336's setting)
    torchrun --nproc-per-node 2 -m cs336_systems bench sharding --preset xl --batch-size 2

Every variant trains the cs336_basics LM inside DDPBucketed (gradients as views of its buckets,
so the gradients counted below are all the gradient memory) with torch.optim.AdamW, from the same
weights on the same per-rank batches:
  unsharded          AdamW over every parameter: the whole optimizer state on every rank
  sharded            cs336_systems.parallel.sharded_optimizer.ShardedOptimizer: one all-gather per step
  torch-zero         torch.distributed.optim.ZeroRedundancyOptimizer, defaults (one broadcast per parameter)
  torch-zero-bucket  the same with parameters_as_bucket_view=True (one broadcast per rank)

Writes two tables. sharding.{md,json}, one row per variant: median time per iteration and per
optimizer step (a step counts at its slowest rank), the step time over torch-zero's (paired by
round: each round runs every variant once, so load drifting between rounds cancels), and the max
abs difference of the final weights from the first variant's (unsharded). sharding_memory.{md,json},
per variant after model init and directly before and after the last optimizer step: bytes of
parameters, gradients and optimizer state computed from the tensors (the largest rank's), the
process RSS (informational: the allocator keeps what earlier variants freed), and on CUDA the
allocated memory and its peak during model init, the last forward+backward and the last step.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

from cs336_systems.bench.common import Results, environment, free_device_memory, synchronize
from cs336_systems.bench.ranks import MIB, RankBenchConfig, add_rank_arguments, memory_rows, rss_mib, slowest
from cs336_systems.distributed.collectives import gather_from_ranks
from cs336_systems.distributed.launch import default_backend, run_on_ranks
from cs336_systems.errors import ConfigError, directory, positive_float
from cs336_systems.parallel.ddp import DDPBucketed
from cs336_systems.parallel.sharded_optimizer import ShardedOptimizer, state_bytes
from cs336_systems.presets import VOCAB_SIZE, ModelConfig
from cs336_systems.training.loss import lm_loss

VARIANTS = ("unsharded", "sharded", "torch-zero", "torch-zero-bucket")
POINTS = ("init", "before_step", "after_step")


@dataclass(kw_only=True)
class ShardingBenchConfig(RankBenchConfig):
    """One `bench sharding` run."""

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS
    bucket_size_mb: float = 25.0
    """DDPBucketed bucket size (the gradient all-reduce, the same in every variant)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.bucket_size_mb > 0:
            raise ConfigError(f"--bucket-size-mb must be positive, got {self.bucket_size_mb}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ShardingBenchConfig(backend="gloo")
    add_rank_arguments(parser, defaults)
    parser.add_argument("--bucket-size-mb", type=positive_float, default=defaults.bucket_size_mb)
    parser.add_argument("--out-dir", type=directory, default="docs/perf", help="where sharding{,_memory}.{md,json} go")


# ------------------------------------------------------------------------------ on each rank


def _build(variant: str, config: ShardingBenchConfig) -> tuple[DDPBucketed, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = ModelConfig(preset=config.preset, vocab_size=VOCAB_SIZE, context_length=config.context_length)
    ddp = DDPBucketed(model.build().to(config.device), bucket_size_mb=config.bucket_size_mb,
                      gradient_as_bucket_view=True)
    params, adamw = ddp.parameters(), torch.optim.AdamW
    if variant == "unsharded":
        return ddp, adamw(params, lr=config.lr)
    if variant == "sharded":
        return ddp, ShardedOptimizer(params, adamw, lr=config.lr)
    bucketed = variant == "torch-zero-bucket"
    return ddp, ZeroRedundancyOptimizer(params, optimizer_class=adamw, parameters_as_bucket_view=bucketed, lr=config.lr)


def _local_state(opt: torch.optim.Optimizer) -> dict:
    """The state this rank holds: the local optimizer's for the sharded ones."""
    if isinstance(opt, ShardedOptimizer):
        return opt.local_optimizer.state
    if isinstance(opt, ZeroRedundancyOptimizer):
        return opt.optim.state
    return opt.state


def _memory(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device) -> dict[str, float | None]:
    """This rank's memory now, in MiB; on CUDA also the peak since the last reset, which it resets."""
    params = list(model.parameters())
    tensors = {
        "params_MiB": sum(p.numel() * p.element_size() for p in params) / MIB,
        "grads_MiB": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None) / MIB,
        "state_MiB": state_bytes(_local_state(opt)) / MIB,
    }
    row = {**tensors, "tensors_MiB": sum(tensors.values()), "rss_MiB": rss_mib()}
    if device.type == "cuda":
        row["cuda_allocated_MiB"] = torch.cuda.memory_allocated(device) / MIB
        row["cuda_peak_MiB"] = torch.cuda.max_memory_allocated(device) / MIB
        torch.cuda.reset_peak_memory_stats(device)
    return row


def _train_variant(variant: str, config: ShardingBenchConfig) -> dict[str, Any]:
    """Build and train one variant: times of the timed iterations, memory at POINTS, final weights."""
    device = config.device
    gc.collect()  # the previous variant's wrapper hooks form reference cycles: free its memory first
    free_device_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, opt = _build(variant, config)
    memory = {"init": _memory(model, opt, device)}
    g = torch.Generator().manual_seed(dist.get_rank())  # every rank its own batch
    tokens = torch.randint(0, VOCAB_SIZE, (config.batch_size, config.context_length + 1), generator=g)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    iterations, steps = [], []
    for i in range(config.warmup + config.steps):
        last = i == config.warmup + config.steps - 1
        synchronize(device)
        if last and device.type == "cuda":  # before_step's peak: this iteration's forward and backward
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)  # in place: the gradients stay views of DDP's buckets
        model.on_train_batch_start()
        lm_loss(model, x, y).backward()
        model.finish_gradient_synchronization()
        synchronize(device)
        backward_end = time.perf_counter()
        if last:
            memory["before_step"] = _memory(model, opt, device)
        step_start = time.perf_counter()  # the memory probe stays out of both timings
        opt.step()
        synchronize(device)
        step_ms = (time.perf_counter() - step_start) * 1e3
        if last:
            memory["after_step"] = _memory(model, opt, device)
        if i >= config.warmup:
            iterations.append((backward_end - start) * 1e3 + step_ms)
            steps.append(step_ms)
    weights = [p.detach().to("cpu", copy=True) for p in model.parameters()]
    return {"iteration_ms": iterations, "step_ms": steps, "memory": memory, "weights": weights}


def _max_abs_diff(ours: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(ours, reference, strict=True))


def _run(config: ShardingBenchConfig) -> dict[str, list[dict[str, Any]]]:
    """On every rank: every variant, `rounds` times; the rows of both tables, aggregated over ranks.

    Each rank compares its final weights with its own run of the first variant: with DDP every
    rank of a correct variant ends with the same weights, so a rank whose all-gather missed an
    update shows up as a difference on that rank.
    """
    times: dict[str, list[tuple[list[float], list[float]]]] = {v: [] for v in config.variants}
    memory: dict[str, dict[str, dict]] = {}
    diffs: dict[str, float] = {}
    reference = None
    for _ in range(config.rounds):
        for variant in config.variants:
            result = _train_variant(variant, config)
            times[variant].append((result["iteration_ms"], result["step_ms"]))
            memory[variant] = result["memory"]  # tensor bytes repeat exactly: the last round's will do
            reference = reference or result["weights"]
            diffs[variant] = max(diffs.get(variant, 0.0), _max_abs_diff(result["weights"], reference))
    gathered = gather_from_ranks((times, memory, diffs))  # [rank] -> (times, memory, diffs)
    return {"time": _time_rows(config.variants, gathered), "memory": _memory_rows(config.variants, gathered)}


def _time_rows(variants: list[str], gathered: list[tuple]) -> list[dict[str, Any]]:
    rows = {}
    for variant in variants:
        per_round = [  # per round: (slowest-rank iteration ms, slowest-rank step ms) of each timed iteration
            tuple(slowest([rank[0][variant][r][k] for rank in gathered]) for k in (0, 1))
            for r in range(len(gathered[0][0][variant]))
        ]
        iterations, steps = sum((r[0] for r in per_round), []), sum((r[1] for r in per_round), [])
        rows[variant] = dict(
            variant=variant, iteration_ms=statistics.median(iterations), step_ms=statistics.median(steps),
            step_std_ms=statistics.stdev(steps) if len(steps) > 1 else 0.0,
            round_step_ms=[statistics.median(r[1]) for r in per_round],
            max_abs_diff=max(rank[2][variant] for rank in gathered),
        )
    for base in ("torch-zero", "torch-zero-bucket"):
        if base in rows:  # paired by round, then the median over rounds (see the module docstring)
            for row in rows.values():
                ratios = (a / b for a, b in zip(row["round_step_ms"], rows[base]["round_step_ms"], strict=True))
                row[f"step_vs_{base}"] = statistics.median(ratios)
    return list(rows.values())


def _memory_rows(variants: list[str], gathered: list[tuple]) -> list[dict[str, Any]]:
    """One row per variant and point; each column the largest rank's value."""
    rows = memory_rows(variants, gathered, POINTS)
    unsharded = {r["point"]: r["state_MiB"] for r in rows if r["variant"] == "unsharded"}
    for row in rows:
        if unsharded.get(row["point"]):  # AdamW's state exists only after the first step
            row["state_vs_unsharded"] = row["state_MiB"] / unsharded[row["point"]]
    return rows


def main(args: argparse.Namespace) -> int:
    config = ShardingBenchConfig(
        preset=args.preset, batch_size=args.batch_size, context_length=args.context_length, nproc=args.nproc,
        backend=args.backend or default_backend(), variants=args.variants, bucket_size_mb=args.bucket_size_mb,
        lr=args.lr, warmup=args.warmup, steps=args.steps, rounds=args.rounds,
    )
    tables = run_on_ranks(_run, config.nproc, config.backend, config)
    if tables is None:  # a torchrun rank other than 0
        return 0
    meta = {**environment("cuda" if config.backend == "nccl" else "cpu"), **asdict(config),
            "world_size": dist.get_world_size() if dist.is_initialized() else config.nproc}
    ratios = [c for c in ("step_vs_torch-zero", "step_vs_torch-zero-bucket") if c in tables["time"][0]]
    Results("sharding", meta, tables["time"]).write(
        args.out_dir, columns=["variant", "iteration_ms", "step_ms", "step_std_ms", *ratios, "max_abs_diff"])
    memory_columns = ["variant", "point", "params_MiB", "grads_MiB", "state_MiB", "tensors_MiB",
                      "state_vs_unsharded", "rss_MiB"]
    if config.backend == "nccl":
        memory_columns += ["cuda_allocated_MiB", "cuda_peak_MiB"]
    Results("sharding_memory", meta, tables["memory"]).write(args.out_dir, columns=memory_columns)
    return 0
