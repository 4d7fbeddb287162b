"""Process-group plumbing shared by the wrappers, tests, benchmarks and training.

`launch(fn, world_size, *args)` runs `fn(*args)` in `world_size` local processes with a process
group already initialised (gloo on CPU, NCCL with one GPU per rank on CUDA) and returns every
rank's return value, ordered by rank. Ports are picked free, so launches can run concurrently.
Ranks are forked from a forkserver that has imported torch once: a fresh interpreter per rank
would import torch per rank and launch, seconds each (over ten on a busy 2-core machine).
Under torchrun the environment already names rank and world size: `init_from_env()` reads it; it is
the one path from environment variables to a process group (spawned ranks take it too).
`run_on_ranks(fn, nproc, backend)` runs `fn` under torchrun or on spawned ranks, whichever applies.
Spawned ranks die with the launching process (`_die_with_launcher`): killing it ends the job.
"""

from __future__ import annotations

import datetime
import importlib
import os
import select
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cs336_systems.errors import ConfigError

# A collective that waits longer than this is a bug (a rank that never joined), not slowness:
# fail loudly instead of hanging CI for the default 30 minutes.
DEFAULT_TIMEOUT = datetime.timedelta(seconds=120)


def find_free_port() -> int:
    """A TCP port on localhost that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend(device: str | torch.device | None = None) -> str:
    """NCCL when the ranks use CUDA GPUs, gloo otherwise."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "nccl" if use_cuda else "gloo"


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default group from torchrun-style variables; return (rank, world_size).

    torchrun's c10d rendezvous shares its TCPStore with the workers and keeps it across restarts, so
    a restarted worker could read the addresses a dead one published and hang while connecting
    (pytorch/pytorch#135712); prefixing every key with the restart count keeps the attempts apart.
    """
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    if not dist.is_initialized():
        # Before the group exists: torch._dynamo, imported once a group exists, keeps references to it
        # (ten in torch 2.11, none visible to gc), so destroy_process_group() no longer ends it and its
        # gloo threads (pt_gloo_runloop, the work thread) run on into interpreter shutdown. Spawned
        # ranks have it from the forkserver's preload; torchrun's workers imported it only later, with
        # the job's modules (DDP, the sharded optimizer). Workers import it anyway: this costs nothing.
        importlib.import_module("torch._dynamo")
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=DEFAULT_TIMEOUT))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend, store=dist.PrefixStore(f"cs336/attempt_{attempt}", store), rank=rank,
                                world_size=world_size, timeout=DEFAULT_TIMEOUT)
    return rank, world_size


def pid_alive(pid: int) -> bool:
    """Whether a process `pid` exists (a zombie counts, until it is reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _die_with_launcher(launcher: int) -> None:
    """SIGKILL this worker as soon as the launching process exits, so that no worker outlives it.

    Neither the worker's parent, the forkserver, nor PR_SET_PDEATHSIG can do it: every worker holds
    the forkserver's liveness pipe, so the forkserver lives as long as any worker. A daemon thread
    waits on a pidfd of the launcher (readable once it has exited; Linux >= 5.3), or else polls it.
    """
    def watch() -> None:
        try:
            fd = os.pidfd_open(launcher)  # ProcessLookupError: already gone
            select.select([fd], [], [])
        except (AttributeError, OSError):
            while pid_alive(launcher):
                time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watchdog", daemon=True).start()


def _worker(rank, world_size, port, backend, fn, args, results, environ, launcher) -> None:
    _die_with_launcher(launcher)
    # The forkserver's environment is the parent's as it was when the server started: bring it up to date.
    os.environ.update(
        environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
    )
    # One intra-op thread per rank: the ranks share the machine's cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        init_from_env(backend)
        results.put((rank, True, fn(*args)))
    except ConfigError as error:  # bad input: the launcher raises it as it is, one line
        results.put((rank, False, error))
    except BaseException as error:  # noqa: BLE001 - report every failure to the parent
        results.put((rank, False, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None) -> list[Any]:
    """Run `fn(*args)` on `world_size` local ranks; return their results in rank order.

    `fn` must be picklable (a module-level function). If any rank raises, this raises a
    RuntimeError carrying every failing rank's traceback, or, when a rank raised a ConfigError (bad
    input), the lowest such rank's ConfigError.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"world_size={world_size} needs {world_size} GPUs, found {torch.cuda.device_count()}")
    ctx = mp.get_context("forkserver")
    # Only has an effect before the server's first start. The server never touches CUDA, so its
    # forks may; torch._dynamo is preloaded because the DDP wrappers' torch.compiler.disable imports it.
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", __name__])
    results = ctx.SimpleQueue()
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results, dict(os.environ),
                                            os.getpid()))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcomes = _collect(procs, results, world_size)
    failures = [f"rank {r}: {value}" for r, (ok, value) in sorted(outcomes.items()) if not ok]
    config_errors = [value for _, (ok, value) in sorted(outcomes.items()) if isinstance(value, ConfigError)]
    if config_errors:
        raise config_errors[0]
    if failures:
        raise RuntimeError("distributed launch failed\n" + "\n".join(failures))
    return [outcomes[r][1] for r in range(world_size)]


def _collect(procs, results, world_size: int) -> dict[int, tuple[bool, Any]]:
    """Gather one (ok, value) per rank; a rank that died without reporting counts as a failure."""
    outcomes: dict[int, tuple[bool, Any]] = {}
    while len(outcomes) < world_size:
        if not results.empty():
            rank, ok, value = results.get()
            outcomes[rank] = (ok, value)
            continue
        dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outcomes]
        if dead and results.empty():
            for r in dead:
                outcomes[r] = (False, f"process exited with code {procs[r].exitcode} without a result")
        else:
            procs[0].join(timeout=0.05)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return outcomes


def run_on_ranks(fn: Callable[..., Any], nproc: int, backend: str, *args: Any) -> Any:
    """Rank 0's `fn(*args)`, run on every rank: under torchrun (RANK set) on this process's rank
    (other ranks get None), else on `nproc` freshly spawned local ranks."""
    if "RANK" in os.environ:
        rank, _ = init_from_env(backend)
        result = fn(*args)
        return result if rank == 0 else None
    return launch(fn, nproc, *args, backend=backend)[0]
