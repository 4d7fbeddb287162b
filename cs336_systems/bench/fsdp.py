"""Fully-sharded data parallel: memory per rank and time per step, ours against DDP, ZeRO-1 and FSDP2.

    python -m cs336_systems bench fsdp                                   # CPU: gloo, 2 spawned ranks, `mini`
    python -m cs336_systems bench fsdp --trace docs/perf                 # + a torch.profiler trace of one FSDP step
    torchrun --nproc-per-node 2 -m cs336_systems bench fsdp --preset xl --batch-size 2   # 2 GPUs: NCCL

Every variant trains the cs336_basics LM with torch.optim.AdamW from the same weights on the same
per-rank batches (lm_loss, as training does):
  ddp          DDPBucketed (gradients as views of its buckets) + AdamW: everything replicated
  zero1        DDPBucketed + ShardedOptimizer(AdamW): optimizer state sharded (bench sharding's variant)
  fsdp         cs336_systems.parallel.fsdp.FSDP + AdamW over its shards: parameters, gradients and
               state sharded, weights all-gathered per layer just in time
  torch-fsdp2  torch.distributed.fsdp.fully_shard on every block, then on the root

Two tables. fsdp_memory.{md,json}: per variant after model init and directly before and after the
last optimizer step, the bytes this rank holds (the largest rank's) of parameters, gradients and
optimizer state, computed from the tensors (DTensors count their local shard), their sum over the
ddp variant's, and the gather buffers: for ours the peak bytes of gathered full weights during
the last forward+backward (before_step) or held now; FSDP2's are not visible on CPU (empty).
fsdp.{md,json}: the median time of one training step (forward, backward, gradient sync, optimizer
step; each step at its slowest rank), its ratio to torch-fsdp2's (paired by round: each round runs
every variant once, so load drifting between rounds cancels), the max abs difference of the final
weights from the first variant's, and for ours how many all-gathers had not finished when their
layer needed them ("late") and the host time spent waiting for those.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from cs336_systems.bench.common import Results, environment, free_device_memory, synchronize
from cs336_systems.bench.ranks import MIB, RankBenchConfig, add_rank_arguments, memory_rows, rss_mib, slowest
from cs336_systems.distributed.collectives import gather_from_ranks
from cs336_systems.distributed.launch import default_backend, run_on_ranks
from cs336_systems.errors import directory
from cs336_systems.parallel.ddp import DDPBucketed
from cs336_systems.parallel.fsdp import FSDP
from cs336_systems.parallel.sharded_optimizer import ShardedOptimizer
from cs336_systems.presets import VOCAB_SIZE, ModelConfig
from cs336_systems.training.loss import lm_loss

VARIANTS = ("ddp", "zero1", "fsdp", "torch-fsdp2")
POINTS = ("init", "before_step", "after_step")


@dataclass(kw_only=True)
class FSDPBenchConfig(RankBenchConfig):
    """One `bench fsdp` run."""

    VARIANTS: ClassVar[tuple[str, ...]] = VARIANTS
    trace: str | None = None
    """Directory for fsdp_trace.json, a torch.profiler trace of one step of ours (rank 0, last round)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_rank_arguments(parser, FSDPBenchConfig(backend="gloo"))
    parser.add_argument("--trace", metavar="DIR", help="write fsdp_trace.json (profiler trace of one FSDP step) here")
    parser.add_argument("--out-dir", type=directory, default="docs/perf", help="where fsdp{,_memory}.{md,json} go")


# ------------------------------------------------------------------------------ on each rank


@dataclass(eq=False)
class _Setup:
    """One variant, built: what to call, what syncs gradients (or None), the optimizer, the FSDP wrapper."""

    forward: torch.nn.Module
    sync: Any
    optimizer: torch.optim.Optimizer
    fsdp: FSDP | None = None


def _build(variant: str, config: FSDPBenchConfig) -> _Setup:
    torch.manual_seed(0)
    model = ModelConfig(preset=config.preset, vocab_size=VOCAB_SIZE, context_length=config.context_length)
    model = model.build().to(config.device)
    adamw = torch.optim.AdamW
    if variant in ("ddp", "zero1"):
        ddp = DDPBucketed(model, gradient_as_bucket_view=True)
        if variant == "ddp":
            return _Setup(ddp, ddp, adamw(ddp.parameters(), lr=config.lr))
        return _Setup(ddp, ddp, ShardedOptimizer(ddp.parameters(), adamw, lr=config.lr))
    if variant == "fsdp":
        fsdp = FSDP(model)
        return _Setup(fsdp, fsdp, adamw(fsdp.parameters(), lr=config.lr), fsdp)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    for p in model.parameters():  # FSDP2 shards what each rank has: start from rank 0's, as ours does
        dist.broadcast(p.detach(), src=0)
    mesh = init_device_mesh(config.device.type, (dist.get_world_size(),))
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return _Setup(model, None, adamw(model.parameters(), lr=config.lr))


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank holds for `t`: a DTensor's local shard, else the tensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def _memory(setup: _Setup, gather_peak: bool = False) -> dict[str, float | None]:
    """This rank's persistent tensors now, in MiB; gather buffers (ours only): held now, or with
    `gather_peak` at most since the step began."""
    params = list(setup.forward.parameters())
    opt = setup.optimizer
    state = opt.local_optimizer.state if isinstance(opt, ShardedOptimizer) else opt.state
    tensors = {
        "params_MiB": sum(_local_bytes(p) for p in params) / MIB,
        "grads_MiB": sum(_local_bytes(p.grad) for p in params if p.grad is not None) / MIB,
        "state_MiB": sum(_local_bytes(v) for s in state.values() for v in s.values()
                         if isinstance(v, torch.Tensor)) / MIB,
    }
    stats = setup.fsdp.gather_stats if setup.fsdp is not None else None
    gather = None if stats is None else (stats.peak if gather_peak else stats.current) / MIB
    return {**tensors, "tensors_MiB": sum(tensors.values()), "gather_MiB": gather, "rss_MiB": rss_mib()}


def _step(setup: _Setup, x: torch.Tensor, y: torch.Tensor) -> None:
    setup.optimizer.zero_grad(set_to_none=setup.fsdp is not None)  # DDP: grads stay bucket views
    lm_loss(setup.forward, x, y).backward()
    if setup.sync is not None:
        setup.sync.finish_gradient_synchronization()
    setup.optimizer.step()


def _full_weights(setup: _Setup) -> list[torch.Tensor]:
    if setup.fsdp is not None:
        return [t.cpu() for t in setup.fsdp.gather_full_params().values()]
    return [(p.full_tensor() if isinstance(p, DTensor) else p).detach().to("cpu", copy=True)
            for p in setup.forward.parameters()]


def _train_variant(variant: str, config: FSDPBenchConfig, trace: str | None) -> dict[str, Any]:
    """Build and train one variant: step times, memory at POINTS, gather timeliness, final weights."""
    gc.collect()  # the previous variant's hooks form reference cycles: free its memory first
    free_device_memory()
    setup = _build(variant, config)
    memory = {"init": _memory(setup)}
    g = torch.Generator().manual_seed(dist.get_rank())  # every rank its own batch
    tokens = torch.randint(0, VOCAB_SIZE, (config.batch_size, config.context_length + 1), generator=g)
    x, y = tokens[:, :-1].to(config.device), tokens[:, 1:].to(config.device)
    times, late, waits, late_ms = [], 0, 0, 0.0
    for i in range(config.warmup + config.steps):
        last = i == config.warmup + config.steps - 1
        if setup.fsdp is not None:
            setup.fsdp.gather_stats.reset()
        synchronize(config.device)
        start = probe = time.perf_counter()
        if last:  # split at the optimizer step for the memory probe, which stays out of the time
            setup.optimizer.zero_grad(set_to_none=setup.fsdp is not None)
            lm_loss(setup.forward, x, y).backward()
            if setup.sync is not None:
                setup.sync.finish_gradient_synchronization()
            synchronize(config.device)
            probe = time.perf_counter()
            memory["before_step"] = _memory(setup, gather_peak=True)
            start += time.perf_counter() - probe
            setup.optimizer.step()
        else:
            _step(setup, x, y)
        synchronize(config.device)
        if i >= config.warmup:
            times.append((time.perf_counter() - start) * 1e3)
        if setup.fsdp is not None and i >= config.warmup:
            stats = setup.fsdp.gather_stats
            waits, late, late_ms = waits + stats.waits, late + stats.late, late_ms + stats.late_seconds * 1e3
    memory["after_step"] = _memory(setup)
    weights = _full_weights(setup)
    if trace:  # one more step, after the weights are taken
        _trace_one_step(setup, x, y, Path(trace))
    return {"step_ms": times, "memory": memory, "weights": weights,
            "late": late, "waits": waits, "late_ms_per_step": late_ms / config.steps}


def _trace_one_step(setup: _Setup, x: torch.Tensor, y: torch.Tensor, directory: Path) -> None:
    """A torch.profiler trace of one step (rank 0 writes it): gloo collectives, fsdp::wait_all_gather."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _step(setup, x, y)
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(directory / "fsdp_trace.json"))


def _run(config: FSDPBenchConfig) -> dict[str, list[dict[str, Any]]]:
    """On every rank: every variant, `rounds` times; the rows of both tables, aggregated over ranks."""
    times: dict[str, list[list[float]]] = {v: [] for v in config.variants}
    memory: dict[str, dict] = {}
    extra: dict[str, dict] = {}
    reference = None
    for r in range(config.rounds):
        for variant in config.variants:
            trace = config.trace if variant == "fsdp" and r == config.rounds - 1 else None
            result = _train_variant(variant, config, trace)
            times[variant].append(result["step_ms"])
            memory[variant] = result["memory"]
            reference = reference or result["weights"]
            diff = max((a - b).abs().max().item() for a, b in zip(result["weights"], reference, strict=True))
            previous = extra.get(variant, {"max_abs_diff": 0.0, "late": 0, "waits": 0, "late_ms": []})
            extra[variant] = {"max_abs_diff": max(previous["max_abs_diff"], diff),
                              "late": previous["late"] + result["late"], "waits": previous["waits"] + result["waits"],
                              "late_ms": previous["late_ms"] + [result["late_ms_per_step"]]}
    gathered = gather_from_ranks((times, memory, extra))
    return {"time": _time_rows(config.variants, gathered), "memory": _memory_rows(config.variants, gathered)}


def _time_rows(variants: list[str], gathered: list[tuple]) -> list[dict[str, Any]]:
    rows = {}
    for variant in variants:
        rounds = [slowest([rank[0][variant][r] for rank in gathered]) for r in range(len(gathered[0][0][variant]))]
        steps = sum(rounds, [])
        extras = [rank[2][variant] for rank in gathered]
        waits = sum(e["waits"] for e in extras)
        rows[variant] = dict(
            variant=variant, step_ms=statistics.median(steps),
            step_std_ms=statistics.stdev(steps) if len(steps) > 1 else 0.0,
            round_step_ms=[statistics.median(r) for r in rounds],
            max_abs_diff=max(e["max_abs_diff"] for e in extras),
            late_gathers=(sum(e["late"] for e in extras) / waits) if waits else None,
            late_wait_ms=max(statistics.median(e["late_ms"]) for e in extras) if waits else None,
        )
    if "torch-fsdp2" in rows:
        for row in rows.values():
            ratios = (a / b for a, b in zip(row["round_step_ms"], rows["torch-fsdp2"]["round_step_ms"], strict=True))
            row["step_vs_torch-fsdp2"] = statistics.median(ratios)
    return list(rows.values())


def _memory_rows(variants: list[str], gathered: list[tuple]) -> list[dict[str, Any]]:
    """One row per variant and point; each column the largest rank's value."""
    rows = memory_rows(variants, gathered, POINTS)
    replicated = {r["point"]: r["tensors_MiB"] for r in rows if r["variant"] == "ddp"}
    for row in rows:
        if replicated.get(row["point"]):
            row["tensors_vs_ddp"] = row["tensors_MiB"] / replicated[row["point"]]
    return rows


def main(args: argparse.Namespace) -> int:
    config = FSDPBenchConfig(
        preset=args.preset, batch_size=args.batch_size, context_length=args.context_length, nproc=args.nproc,
        backend=args.backend or default_backend(), variants=args.variants, lr=args.lr, warmup=args.warmup,
        steps=args.steps, rounds=args.rounds, trace=args.trace,
    )
    tables = run_on_ranks(_run, config.nproc, config.backend, config)
    if tables is None:  # a torchrun rank other than 0
        return 0
    meta = {**environment("cuda" if config.backend == "nccl" else "cpu"), **asdict(config),
            "world_size": dist.get_world_size() if dist.is_initialized() else config.nproc}
    ratio = ["step_vs_torch-fsdp2"] if "step_vs_torch-fsdp2" in tables["time"][0] else []
    Results("fsdp", meta, tables["time"]).write(
        args.out_dir, columns=["variant", "step_ms", "step_std_ms", *ratio, "max_abs_diff", "late_gathers",
                               "late_wait_ms"])
    Results("fsdp_memory", meta, tables["memory"]).write(
        args.out_dir, columns=["variant", "point", "params_MiB", "grads_MiB", "state_MiB", "tensors_MiB",
                               "tensors_vs_ddp", "gather_MiB", "rss_MiB"])
    return 0
