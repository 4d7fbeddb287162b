"""The CS336 2026 leaderboard's timing, for `bench step --protocol leaderboard`.

The leaderboard times a submission's training step with

    triton.testing.do_bench(step, warmup=10_000, rep=30_000)      # ms; do_bench's default: the mean

from an empty compile cache, and requires the whole run, from process start, to take less than 10
minutes. `leaderboard_ms` makes that call; `empty_compile_cache` points the compile caches at a
fresh directory and turns off the caches that would let an earlier run's work be reused;
`process_start_time` is when the kernel started this process (the wall time's origin).

Numbers quoted against the stock recipe come from one run that contains it: `with_stock_ratio`
adds the ratio only to rows measured beside stock, and `together_note` says in the markdown which
contenders ran together.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LEADERBOARD_REP_MS", "LEADERBOARD_WALL_LIMIT_S", "LEADERBOARD_WARMUP_MS", "empty_compile_cache",
           "leaderboard_meta", "leaderboard_ms", "process_start_time", "time_as_leaderboard", "together_note",
           "with_stock_ratio"]

LEADERBOARD_WARMUP_MS = 10_000
LEADERBOARD_REP_MS = 30_000
"""The CS336 2026 leaderboard's timing: triton.testing.do_bench(step, warmup=10_000, rep=30_000), in ms."""
LEADERBOARD_WALL_LIMIT_S = 600
"""The leaderboard's limit on a submission's wall time from an empty compile cache: 10 minutes."""


def leaderboard_ms(step: Callable[[], Any], warmup_ms: float, rep_ms: float,
                   do_bench: Callable[..., float] | None = None) -> float:
    """Milliseconds per step as the leaderboard reads them: do_bench(step, warmup=, rep=) with its defaults
    otherwise (the mean; it clears the L2 cache before each call). `do_bench` defaults to
    triton.testing.do_bench (CUDA only); tests pass a stand-in with the same signature."""
    if do_bench is None:
        import triton.testing

        do_bench = triton.testing.do_bench
    return float(do_bench(step, warmup=warmup_ms, rep=rep_ms))


def time_as_leaderboard(name: str, step: Callable[[], Any], warmup_ms: float, rep_ms: float,
                        do_bench: Callable[..., float] | None = None) -> tuple[float, float]:
    """(ms per step by `leaderboard_ms`, seconds from process start when it returned), printed for `name`."""
    ms = leaderboard_ms(step, warmup_ms, rep_ms, do_bench)
    wall_s = time.time() - process_start_time()
    print(f"{name}: leaderboard {ms:.1f} ms/step (do_bench mean), {wall_s:.0f} s from process start "
          f"(limit {LEADERBOARD_WALL_LIMIT_S} s)", flush=True)
    return ms, wall_s


def leaderboard_meta(warmup_ms: float, rep_ms: float) -> dict[str, Any]:
    """What a leaderboard-protocol result records of its timing: do_bench's arguments, the compile cache
    directory and the process's wall time so far."""
    return {"do_bench_warmup_ms": warmup_ms, "do_bench_rep_ms": rep_ms,
            "compile_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            "process_wall_s": time.time() - process_start_time()}


def empty_compile_cache() -> str:
    """Make this process compile from nothing: TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point at a new
    temporary directory (removed at exit), and the caches that could serve an earlier run's results from
    elsewhere are off (inductor's FX graph cache and autotuning cache, local and remote, AOTAutograd's
    cache). Call it first thing, before anything compiles: inductor's compile workers copy the
    environment when they start. Returns the directory."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    path = tempfile.mkdtemp(prefix="cs336-leaderboard-cache-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    os.environ["TRITON_CACHE_DIR"] = os.path.join(path, "triton")
    for name in ("TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE", "TORCHINDUCTOR_AUTOTUNE_LOCAL_CACHE",
                 "TORCHINDUCTOR_FX_GRAPH_REMOTE_CACHE", "TORCHINDUCTOR_AUTOTUNE_REMOTE_CACHE"):
        os.environ[name] = "0"  # for subprocesses that read the configuration from the environment
    inductor_config.fx_graph_cache = False
    inductor_config.fx_graph_remote_cache = False
    inductor_config.autotune_local_cache = False
    inductor_config.autotune_remote_cache = False
    inductor_config.bundled_autotune_remote_cache = False
    functorch_config.enable_autograd_cache = False
    functorch_config.enable_remote_autograd_cache = False
    return path


@functools.cache
def process_start_time() -> float:
    """When this process started (seconds since the epoch): /proc/self/stat's start time after boot plus
    the boot time of /proc/stat, to 1/CLK_TCK s; where /proc is missing, when this module was imported."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 (starttime, clock ticks after boot); the command name (field 2) may hold spaces.
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as stat:
            boot = next(int(line.split()[1]) for line in stat if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


_IMPORTED = time.time()


def with_stock_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with speedup_vs_stock = stock's ms per step / the row's, when stock ran (and timed) in this
    run: ratios are only quoted between contenders measured together."""
    stock = next((row["ms_per_step"] for row in rows if row["contender"] == "stock"), None)
    if not isinstance(stock, float):
        return rows
    return [{**row, "speedup_vs_stock": stock / row["ms_per_step"]} if isinstance(row["ms_per_step"], float) else row
            for row in rows]


def together_note(rows: list[dict[str, Any]]) -> str:
    """The markdown's statement of which contenders ran together (and what the ratio column means)."""
    names = ", ".join(row["contender"] for row in rows)
    note = f"Contenders run together, one after another in this process on this machine: {names}."
    if any("speedup_vs_stock" in row for row in rows):
        note += " speedup_vs_stock = stock's ms per step / the row's, both from this run."
    else:
        note += " Stock did not run (or did not finish): no ratio to it can be quoted from this run."
    return note
