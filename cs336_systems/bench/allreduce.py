"""All-reduce latency and bus bandwidth: gloo on CPU, NCCL on GPUs, over tensor sizes and rank counts.

    python -m cs336_systems bench allreduce                        # 2, 4, 6 ranks, as the machine allows
    python -m cs336_systems bench allreduce --backend gloo --nproc 2 --sizes-mb 1 10
    torchrun --nproc-per-node 4 -m cs336_systems bench allreduce   # one world size: torchrun's

Each rank times `iters` float32 all-reduces per size after `warmup` untimed ones; the ranks'
medians are gathered with all_gather_object and the slowest rank's is the latency (a collective is
done when its last rank is). Bandwidths follow nccl-tests: algbw = bytes / latency and
busbw = algbw * 2 (n - 1) / n, the traffic a ring all-reduce puts on each link, so busbw can be
compared across rank counts and against the hardware's link bandwidth.

By default each backend runs the rank counts of 2, 4, 6 that the machine has room for: NCCL one
GPU per rank, gloo one CPU core per rank. More gloo ranks than cores would time the scheduler
(ranks waiting for a core), not the all-reduce; pass --nproc to oversubscribe anyway.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cs336_systems.bench.common import Results, check_backend, environment
from cs336_systems.distributed.collectives import gather_from_ranks
from cs336_systems.distributed.launch import default_backend, run_on_ranks
from cs336_systems.errors import ConfigError, directory, positive_float
from cs336_systems.timing import call_seconds

MB = 10**6  # the handout's sizes are decimal megabytes: 1 MB = 250,000 float32
DEFAULT_NPROC = (2, 4, 6)  # CS336's rank counts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", nargs="+", choices=("gloo", "nccl"),
                        help="default: gloo, plus nccl when CUDA GPUs are present; torchrun: one backend")
    parser.add_argument("--nproc", type=int, nargs="+",
                        help=f"rank counts to spawn (default: those of {DEFAULT_NPROC} the machine has cores or "
                             "GPUs for); ignored under torchrun")
    parser.add_argument("--sizes-mb", type=positive_float, nargs="+", default=[1, 10, 100, 1000],
                        help="float32 tensor sizes in MB (default: 1 10 100 1000)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed all-reduces per size")
    parser.add_argument("--iters", type=int, default=5, help="timed all-reduces per size")
    parser.add_argument("--out-dir", type=directory, default="docs/perf", help="where allreduce.{md,json,png} go")


def timed_collective(fn: Callable[[], Any], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of `iters` calls of the collective `fn`, after `warmup` calls.

    A fixed count on purpose: bench.common.time_ms stops at a deadline, and ranks that stopped
    after different counts would leave a collective unmatched and hang.
    """
    return [seconds * 1e3 for seconds in call_seconds(fn, device, warmup=warmup, iters=iters)]


def _measure(sizes_mb: list[float], warmup: int, iters: int) -> list[dict[str, Any]]:
    """On every rank: one row per size, aggregated over ranks."""
    backend, world = dist.get_backend(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rows = []
    for size_mb in sizes_mb:
        data = torch.randn(int(size_mb * MB) // 4, device=device)
        times = timed_collective(functools.partial(dist.all_reduce, data), device, warmup, iters)
        medians = gather_from_ranks(statistics.median(times))
        latency_s = max(medians) / 1e3
        algbw = data.numel() * 4 / latency_s / 1e9
        rows.append(dict(backend=backend, device=device.type, nproc=world, size_mb=size_mb,
                         latency_ms=max(medians), rank_mean_ms=statistics.fmean(medians),
                         algbw_GBps=algbw, busbw_GBps=algbw * 2 * (world - 1) / world))
        del data
    return rows


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    """The (backend, nproc) pairs that `main(args)` runs, validated: a ConfigError names a bad flag."""
    if args.warmup < 0 or args.iters < 1:
        raise ConfigError("--warmup must be >= 0 and --iters >= 1")
    if any(size <= 0 for size in args.sizes_mb):
        raise ConfigError("--sizes-mb must be positive")
    if "RANK" in os.environ:
        backends = args.backend or [default_backend()]
        if len(backends) > 1:
            raise ConfigError("--backend: under torchrun the process group has one backend; pass one")
        return [(backends[0], int(os.environ["WORLD_SIZE"]))]
    if args.nproc is not None and any(n < 2 for n in args.nproc):
        raise ConfigError("--nproc: an all-reduce needs at least 2 ranks")
    gpus = torch.cuda.device_count()
    # NCCL needs a GPU per rank; gloo ranks get a core each unless --nproc asks for more.
    room = {"nccl": gpus, "gloo": float("inf") if args.nproc else max(2, os.cpu_count() or 1)}
    backends = args.backend or ["gloo"] + ["nccl"] * (gpus >= 2)
    runs = [(b, n) for b in backends for n in args.nproc or DEFAULT_NPROC if n <= room[b]]
    if not runs:
        check_backend("nccl", min(args.nproc or DEFAULT_NPROC))  # the only way to plan nothing: too few GPUs
    return runs


def _draw(rows: list[dict[str, Any]]) -> Callable[[Any], None]:
    def draw(plt: Any) -> None:
        _, ax = plt.subplots(figsize=(6, 4))
        for key in dict.fromkeys((r["backend"], r["nproc"]) for r in rows):
            series = [r for r in rows if (r["backend"], r["nproc"]) == key]
            ax.plot([r["size_mb"] for r in series], [r["busbw_GBps"] for r in series], marker="o",
                    label=f"{key[0]}, {key[1]} ranks")
        ax.set(xscale="log", xlabel="all-reduce size (MB, float32)", ylabel="bus bandwidth (GB/s)",
               title="all-reduce bus bandwidth")
        ax.legend()
    return draw


def main(args: argparse.Namespace) -> int:
    runs = plan(args)
    rows = []
    for backend, nproc in runs:
        print(f"all-reduce: {backend}, {nproc} ranks, sizes {args.sizes_mb} MB")
        result = run_on_ranks(_measure, nproc, backend, args.sizes_mb, args.warmup, args.iters)
        if result is None:  # a torchrun rank other than 0: rank 0 writes
            return 0
        rows += result
    device = "cuda" if any(b == "nccl" for b, _ in runs) else "cpu"
    results = Results("allreduce", meta={**environment(device), "warmup": args.warmup, "iters": args.iters})
    results.rows = rows
    results.write(args.out_dir)
    results.plot(args.out_dir, _draw(rows))
    return 0
