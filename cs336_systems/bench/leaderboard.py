"""The CS336 2026 leaderboard's timing, for `bench step --protocol leaderboard`.

The leaderboard times a submission's training step with

    triton.testing.do_bench(step, warmup=10_000, rep=30_000)      # ms; do_bench's default: the mean

from an empty compile cache, and requires the whole run, from process start, to take less than 10
minutes. `leaderboard_ms` makes that call; `empty_compile_cache` points the compile caches at a
fresh directory and turns off the caches that would let an earlier run's work be reused;
`process_start_time` is when the kernel started this process (the wall time's origin).
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

__all__ = ["empty_compile_cache", "leaderboard_ms", "process_start_time"]


def leaderboard_ms(step: Callable[[], Any], warmup_ms: float, rep_ms: float,
                   do_bench: Callable[..., float] | None = None) -> float:
    """Milliseconds per step as the leaderboard reads them: do_bench(step, warmup=, rep=) with its defaults
    otherwise (the mean; it clears the L2 cache before each call). `do_bench` defaults to
    triton.testing.do_bench (CUDA only); tests pass a stand-in with the same signature."""
    if do_bench is None:
        import triton.testing

        do_bench = triton.testing.do_bench
    return float(do_bench(step, warmup=warmup_ms, rep=rep_ms))


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
