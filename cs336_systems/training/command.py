"""Train a BasicsTransformerLM on the embedded corpus (the default) or on token files.

    uv run python -m cs336_systems          # demo: CPU: 2 gloo workers, DDP + sharded AdamW + flash attention
                                            #       CUDA: one worker per GPU, torch.compile on
    python -m cs336_systems train --nproc 4 --data train.bin --val-data valid.bin --preset small --bf16 \\
        --steps 5000 --batch-size 64 --context-length 256 --checkpoint-every 500 --resume
    torchrun --nproc-per-node 8 --max-restarts 3 -m cs336_systems train --checkpoint-every 500 --resume ...
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id run1 \\
        -m cs336_systems train ...          # every node runs the same command

--batch-size is the global batch: each process takes a disjoint slice of every batch, so N processes
train like one. Token files are flat arrays of token ids, memory-mapped: `.npy` (np.save) or raw `.bin`
(uint16). OUT_DIR receives config.json, metrics.jsonl, loss.png and checkpoints/, and holds .lock while a job
runs: one job per OUT_DIR. See docs/training.md ("Faults: what the job guarantees").
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cs336_systems.distributed.launch import pid_alive
from cs336_systems.distributed.world import World, run_job
from cs336_systems.errors import ConfigError
from cs336_systems.presets import ModelConfig
from cs336_systems.training.config import TrainConfig, add_arguments, config_from_args
from cs336_systems.training.data import load_splits
from cs336_systems.training.memory_plan import check_train_memory
from cs336_systems.training.report import Report, format_summary, summarize

if TYPE_CHECKING:
    from cs336_systems.training.trainer import MetricsHook

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "main", "prepare", "train"]


def with_vocab(model: ModelConfig, data_vocab: int) -> ModelConfig:
    """`model` with its vocabulary taken from the data when --vocab-size was not given (`load_splits`
    checked that a given one covers the data)."""
    return dataclasses.replace(model, vocab_size=data_vocab) if model.vocab_size is None else model


def prepare(config: TrainConfig) -> None:
    """Read and check the data, fix the vocabulary and check that the run fits the device's memory,
    before any process or process group starts."""
    data = config.data
    _, _, vocab = load_splits(data.data, data.val_data, data.corpus, config.context_length, config.model.vocab_size)
    config.model = with_vocab(config.model, vocab)
    check_train_memory(config)


def train(config: TrainConfig, hooks: Sequence[MetricsHook] = ()) -> dict[str, Any] | None:
    """Run the job `config` describes and print its summary; returns the summary (None on ranks > 0).

    `hooks` get every metrics record on rank 0 (they must pickle when workers are spawned).
    """
    start = time.perf_counter()
    prepare(config)
    with _job_lock(config, in_worker=False):
        summary = run_job(functools.partial(_train_rank, hooks=tuple(hooks)), config)
    if summary is not None:
        summary["wall_seconds"] = time.perf_counter() - start
        print(format_summary(config, summary), flush=True)
    return summary


def _train_rank(config: TrainConfig, world: World, hooks: tuple[MetricsHook, ...] = ()) -> dict[str, Any] | None:
    """One process's share of the job; rank 0 returns the summary."""
    # Imported here: DDP and the sharded optimizer pull in torch._dynamo, which the launching
    # process of a multi-process job never needs.
    from cs336_systems.training.trainer import build_trainer, fit, restore_trainer

    with _job_lock(config, in_worker=True, is_main=world.is_main):
        trainer = build_trainer(config, world)
        resumed_from = restore_trainer(trainer) if config.checkpoint.resume else None
        # From the shape, not the module: an FSDP run's module holds only this rank's shards.
        model = config.model
        num_params = model.shape.num_params(model.vocab_size) - model.vocab_size * model.d_model  # no embedding
        report = Report(config, world, num_params, resumed_from) if world.is_main else None
        try:
            timings = fit(trainer, _fan_out([report, *hooks]) if report else None)
        finally:
            if report:
                report.close()
    if not world.is_main:
        return None
    return {**summarize(config, report.records, timings), "num_params": num_params, "resumed_from": resumed_from,
            "world_size": world.world_size, "device": world.device.type, "backend": world.backend}


# ---------------------------------------------------------------- one job per output directory


LOCK_NAME = ".lock"
"""OUT_DIR/.lock: flock()ed by the job writing OUT_DIR, and holding that process's pid."""


def _job_lock(config: TrainConfig, in_worker: bool, is_main: bool = True) -> contextlib.AbstractContextManager:
    """The OUT_DIR lock, taken by the process that lives as long as the job: the one that launches the
    workers (or is the only one), or under torchrun, where the agent restarts workers, global rank 0
    (a restarted rank 0 takes over the lock its killed predecessor's death released)."""
    if config.out_dir is None or in_worker != config.parallel.torchrun or not is_main:
        return contextlib.nullcontext()
    return lock_directory(Path(config.out_dir))


@contextlib.contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """Hold DIRECTORY/.lock exclusively, or raise a ConfigError naming the pid that holds it.

    flock() locks die with their holder's last file descriptor, so the lock of a killed job is free
    and simply taken over (its file, naming a dead pid, is overwritten). The file is removed on exit
    while still locked, and a lock taken on a file that was removed meanwhile is taken again on the
    new one: two jobs can never both hold the lock on different files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    fd = _acquire(path)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


def _acquire(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            gone = "" if not holder.isdigit() or pid_alive(int(holder)) else ", no longer running: a process it started"
            raise ConfigError(f"--out-dir {path.parent} is in use by another job (pid {holder}{gone} holds {path}); "
                              "wait for it to end or choose another --out-dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the file we locked was removed by a job that just ended: lock the current one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _fan_out(hooks: Sequence[MetricsHook]) -> MetricsHook:
    def emit(record: dict[str, Any]) -> None:
        for hook in hooks:
            hook(record)

    return emit


def main(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
