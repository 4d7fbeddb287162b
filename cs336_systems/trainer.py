"""The training loop, run by every process of a job: build, (resume), train, evaluate, checkpoint.

One optimizer step on each rank:

    ddp.on_train_batch_start()
    for each of the A micro-batches of this rank's slice of the global batch (train_data.TokenBatches):
        (loss / A).backward()              # all but the last under ddp.no_sync(): grads accumulate locally
    ddp.finish_gradient_synchronization()  # .grad = mean over ranks of the accumulated gradients
    clip the global gradient norm; set the learning rate of this step; optimizer.step()

so N processes compute the gradient of the mean loss over the same global batch as one process
does, and take the same step up to float rounding. Metrics are emitted as records to a hook
(`kind` "train" or "eval"); the losses in them are means over all ranks.

Communication time is measured on the host around `finish_gradient_synchronization` (the part of
the gradient all-reduces that backward did not hide) and around the sharded optimizer's
all-gather. On CUDA the device is synchronised at both ends of each region, so the number is the
wall time of that region with the queue drained: an approximation of the exposed communication
that also counts any compute still queued when the region starts.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from cs336_systems import checkpoint
from cs336_systems.bench.allreduce import gather_from_ranks
from cs336_systems.bench.common import Stopwatch, synchronize
from cs336_systems.ddp import DDPBucketed
from cs336_systems.parallel import World, barrier, reduce_mean
from cs336_systems.runtime import apply_compile, autocast
from cs336_systems.sharded_optimizer import ShardedOptimizer
from cs336_systems.train_config import TrainConfig
from cs336_systems.train_data import Batch, TokenBatches, load_splits, validation_batches

MetricsHook = Callable[[dict[str, Any]], None]
"""Called with every metrics record: {"kind": "train" | "eval", "step": ..., ...}."""

KILL_AT_STEP = "CS336_KILL_AT_STEP"
"""Test hook: set to K, the last rank SIGKILLs itself after step K on a job's first attempt."""


@dataclass(eq=False)
class Trainer:
    """Everything one process's run holds; a checkpoint stores what resuming needs of it."""

    config: TrainConfig
    world: World
    model: nn.Module  # the plain model: checkpoints hold its state_dict
    forward: nn.Module  # what training calls: DDP wrapper around the (compiled) model, or the latter alone
    ddp: DDPBucketed | None
    optimizer: torch.optim.Optimizer
    batches: TokenBatches
    val_batches: list[Batch] | None  # this rank's share (maybe empty); None: no evaluation at all
    comm: Stopwatch  # host seconds of exposed communication (gradient sync wait + sharded all-gather)
    step: int = 0  # optimizer steps taken

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out_dir) / "checkpoints"


def wrap_model(module: nn.Module, config: TrainConfig, world: World) -> DDPBucketed | None:
    """Our bucketed DDP around `module` (possibly compiled) when there are several ranks, else None."""
    if world.world_size == 1:
        return None
    return DDPBucketed(module, bucket_size_mb=config.parallel.bucket_size_mb)


def build_optimizer(model: nn.Module, config: TrainConfig, world: World, comm: Stopwatch) -> torch.optim.Optimizer:
    """cs336 AdamW over `model`'s parameters, sharded over the ranks when asked for and there are several."""
    from cs336_basics.optimizer import AdamW

    opt = config.optimizer
    kwargs = {"lr": opt.lr, "betas": opt.betas, "eps": opt.eps, "weight_decay": opt.weight_decay}
    if config.parallel.shard_optimizer and world.world_size > 1:
        return TimedShardedOptimizer(model.parameters(), AdamW, comm=comm, **kwargs)
    return AdamW(model.parameters(), **kwargs)


class TimedShardedOptimizer(ShardedOptimizer):
    """ShardedOptimizer that adds the time of its parameter all-gather to a Stopwatch."""

    def __init__(self, params: Any, optimizer_cls: type[torch.optim.Optimizer], *, comm: Stopwatch,
                 **kwargs: Any) -> None:
        self.comm = comm
        super().__init__(params, optimizer_cls, **kwargs)

    def _gather_parameters(self) -> None:
        with self.comm:
            super()._gather_parameters()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_trainer(config: TrainConfig, world: World) -> Trainer:
    """Data, model (identical on every rank: same seed, then DDP broadcasts rank 0's), optimizer."""
    train_tokens, val_tokens, _ = load_splits(config.data.data, config.data.val_data, config.data.corpus,
                                              config.context_length)
    seed_everything(config.seed)
    model = config.model.build().to(world.device)
    compiled = apply_compile(model, config.runtime)
    ddp = wrap_model(compiled, config, world)
    comm = Stopwatch(world.device)
    optimizer = build_optimizer(model, config, world, comm)
    batches = TokenBatches(tokens=train_tokens, batch_size=config.batch_size, context_length=config.context_length,
                           accumulation=config.grad_accum_steps, seed=config.seed, rank=world.rank,
                           world_size=world.world_size, device=world.device)
    val_batches = None
    if val_tokens is not None and config.eval_every:
        val_batches = validation_batches(val_tokens, config.eval_batches * config.batch_size,
                                         config.micro_batch_size, config.context_length, world.rank,
                                         world.world_size, world.device)
    return Trainer(config, world, model, ddp or compiled, ddp, optimizer, batches, val_batches, comm)


# ---------------------------------------------------------------- one step


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (1-based: the first step already learns)."""
    from cs336_basics.optimizer import get_cosine_lr

    opt = config.optimizer
    return get_cosine_lr(step, opt.lr, opt.min_lr, opt.warmup_steps, config.steps)


def compute_loss(trainer: Trainer, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    from cs336_basics.nn_utils import cross_entropy

    with autocast(trainer.config.runtime):
        logits = trainer.forward(inputs)  # (B, T, V)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(trainer: Trainer) -> torch.Tensor:
    """One optimizer step; returns this rank's detached mean loss (no host sync)."""
    from cs336_basics.nn_utils import clip_gradient

    config, ddp = trainer.config, trainer.ddp
    micro_batches = trainer.batches.micro_batches(trainer.step + 1)
    if ddp is not None:
        ddp.on_train_batch_start()
    total = torch.zeros((), device=trainer.world.device)
    for i, (inputs, targets) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            loss = compute_loss(trainer, inputs, targets) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    if ddp is not None:
        with trainer.comm:
            ddp.finish_gradient_synchronization()
    if config.optimizer.grad_clip:
        clip_gradient(trainer.model.parameters(), config.optimizer.grad_clip)
    for group in trainer.optimizer.param_groups:
        group["lr"] = learning_rate(config, trainer.step + 1)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    return total


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean loss over the fixed validation windows, all ranks' shares together."""
    trainer.model.eval()
    total = torch.zeros(2, device=trainer.world.device)  # (sum of per-window losses, windows)
    for inputs, targets in trainer.val_batches:
        total[0] += compute_loss(trainer, inputs, targets) * len(inputs)
        total[1] += len(inputs)
    trainer.model.train()
    if trainer.world.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(trainer: Trainer) -> None:
    """A collective: every rank contributes its optimizer shard and RNG state; rank 0 writes."""
    config, world = trainer.config, trainer.world
    optimizer_state = trainer.optimizer.state_dict()  # consolidated: a collective when sharded
    rng = gather_from_ranks(checkpoint.rng_state()) if world.world_size > 1 else [checkpoint.rng_state()]
    if world.is_main:
        state = {
            "format": checkpoint.FORMAT, "step": trainer.step,
            "model": trainer.model.state_dict(), "optimizer": optimizer_state,
            "schedule": {"step": trainer.step},
            "data": {"seed": config.seed, "step": trainer.step, "batch_size": config.batch_size,
                     "context_length": config.context_length},
            "rng": rng,
        }
        checkpoint.save(trainer.checkpoint_dir, trainer.step, state, config.checkpoint.keep)
    barrier(world)  # no rank runs ahead (or dies) before the checkpoint is complete


def restore_checkpoint(trainer: Trainer) -> int | None:
    """Load the newest readable checkpoint into `trainer` on every rank; its step, or None if there is none.

    Rank 0 picks the file (reporting and skipping damaged ones) and tells the others which.
    """
    world = trainer.world
    choice: list[Any] = [None, None]  # [path, error]
    found = None
    if world.is_main:
        try:
            found = checkpoint.load_newest(trainer.checkpoint_dir)
            choice[0] = str(found[0]) if found else None
        except checkpoint.CheckpointError as error:
            choice[1] = str(error)
    if world.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[1] is not None:
        raise checkpoint.CheckpointError(choice[1])
    if choice[0] is None:
        return None
    state = found[1] if found else checkpoint.load(Path(choice[0]))  # rank 0 has it loaded already
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.step = state["schedule"]["step"]
    _check_data_position(trainer.config, state["data"], world)
    rng = state["rng"]
    checkpoint.set_rng_state(rng[world.rank] if len(rng) == world.world_size else rng[0])
    return trainer.step


def _check_data_position(config: TrainConfig, data: dict[str, Any], world: World) -> None:
    ours = {"seed": config.seed, "batch_size": config.batch_size, "context_length": config.context_length}
    changed = {key: (data[key], value) for key, value in ours.items() if data.get(key) != value}
    if changed and world.is_main:
        text = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        print(f"warning: resuming with different data settings ({text}): batches differ from the interrupted run",
              file=sys.stderr)


def _maybe_die(trainer: Trainer) -> None:
    """The KILL_AT_STEP test hook (a no-op unless the variable is set)."""
    at = os.environ.get(KILL_AT_STEP)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if at and int(at) == trainer.step and trainer.world.rank == trainer.world.world_size - 1 and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------- the loop


class Clock:
    """Training seconds: wall time with evaluation and checkpointing paused out, device drained."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, 0.0, time.perf_counter()

    def read(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds += now - self._start
        self._start = now
        return self.seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.read()
        yield
        self._start = time.perf_counter()


def fit(trainer: Trainer, emit: MetricsHook | None) -> dict[str, float]:
    """Train from `trainer.step` to config.steps; `emit` (None: drop) gets every record.

    Returns the steps taken and seconds of training, communication (mean over ranks; part of
    training) and checkpointing.
    """
    config, world = trainer.config, trainer.world
    tokens_per_step = config.batch_size * config.context_length
    emit = emit or (lambda record: None)
    clock, checkpoint_seconds = Clock(world.device), 0.0
    first_step = last_step = trainer.step
    last_seconds = 0.0
    while True:
        step = trainer.step
        # Decided from the config alone: every rank must join evaluate()'s all-reduce.
        if trainer.val_batches is not None and (step % config.eval_every == 0 or step == config.steps):
            with clock.paused():
                emit({"kind": "eval", "step": step, "val_loss": evaluate(trainer)})
        if step == config.steps:
            break
        loss = train_step(trainer)
        if trainer.step % config.log_every == 0 or trainer.step in (1, config.steps):
            loss_value = reduce_mean(loss, world).item()  # the host sync of a logged step
            seconds = clock.read()
            emit({"kind": "train", "step": trainer.step, "loss": loss_value, "lr": learning_rate(config, trainer.step),
                  "tokens_per_s": (trainer.step - last_step) * tokens_per_step / (seconds - last_seconds),
                  "train_seconds": seconds, "comm_seconds": trainer.comm.seconds})
            last_step, last_seconds = trainer.step, seconds
        every = config.checkpoint.every
        if every and (trainer.step % every == 0 or trainer.step == config.steps):
            start = time.perf_counter()
            with clock.paused():
                save_checkpoint(trainer)
            checkpoint_seconds += time.perf_counter() - start
        _maybe_die(trainer)
    comm = reduce_mean(torch.tensor(trainer.comm.seconds, device=world.device), world).item()
    return {"steps": trainer.step - first_step, "train_seconds": clock.read(), "comm_seconds": comm,
            "checkpoint_seconds": checkpoint_seconds}

