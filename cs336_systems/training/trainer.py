"""The training loop, run by every process of a job: build, (resume), train, evaluate, checkpoint.

One optimizer step on each rank:

    set the learning rate of this step
    ddp.on_train_batch_start()
    for each of the A micro-batches of this rank's slice of the global batch (train_data.TokenBatches):
        (loss / A).backward()              # all but the last under ddp.no_sync(): grads accumulate locally
    ddp.finish_gradient_synchronization()  # .grad = mean over ranks of the accumulated gradients
    clip the global gradient norm; optimizer.step()

so N processes compute the gradient of the mean loss over the same global batch as one process
does, and take the same step up to float rounding. With --optimizer-in-backward (one process, one
micro-batch, no clipping) the backward itself steps each parameter and frees its gradient
(optim_in_backward.py): the same step, bit for bit. Metrics are emitted as records to a hook
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

from cs336_systems.distributed.collectives import barrier, gather_from_ranks, reduce_mean
from cs336_systems.distributed.world import World
from cs336_systems.errors import ConfigError
from cs336_systems.parallel.checkpoint_plan import CheckpointPlan
from cs336_systems.parallel.ddp import DDPBucketed
from cs336_systems.parallel.fsdp import FSDP
from cs336_systems.parallel.parallelize import parallelize
from cs336_systems.parallel.torch_engines import TorchFSDP2
from cs336_systems.runtime import autocast
from cs336_systems.timing import Clock, Stopwatch
from cs336_systems.training import checkpoint
from cs336_systems.training.config import TrainConfig
from cs336_systems.training.data import Batch, TokenBatches, load_splits, validation_batches
from cs336_systems.training.loss import lm_loss
from cs336_systems.training.memory_plan import record_plan, resolve_train_checkpointing
from cs336_systems.training.optim import build_optimizer, learning_rate
from cs336_systems.training.optim_in_backward import InBackwardOptimizer

MetricsHook = Callable[[dict[str, Any]], None]
"""Called with every metrics record: {"kind": "train" | "eval", "step": ..., ...}."""

OOM_ADVICE = ("less memory with --activation-checkpointing full (or selective, every:K), a smaller --batch-size "
              "(or more --grad-accum-steps), a shorter --context-length, or --fsdp over several GPUs")
"""What a step that runs out of device memory is told to try."""

KILL_AT_STEP = "CS336_KILL_AT_STEP"
"""Test hook: set to K, the last rank SIGKILLs itself after step K on a job's first attempt."""


@dataclass(eq=False)
class Trainer:
    """Everything one process's run holds; a checkpoint stores what resuming needs of it."""

    config: TrainConfig
    world: World
    model: nn.Module  # the plain model: checkpoints hold its state_dict
    forward: nn.Module  # what training calls: DDP wrapper around the (compiled) model, or the latter alone
    ddp: DDPBucketed | FSDP | None  # FSDP: `model`'s parameters are its shards; checkpoints hold full tensors
    optimizer: torch.optim.Optimizer | InBackwardOptimizer  # the latter steps inside backward (--optimizer-in-backward)
    batches: TokenBatches
    val_batches: list[Batch] | None  # this rank's share (maybe empty); None: no evaluation at all
    comm: Stopwatch  # host seconds of exposed communication (gradient sync wait + sharded all-gather)
    step: int = 0  # optimizer steps taken

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.config.out_dir) / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint holds of this run (the format in training/checkpoint.py); a collective on every
        rank: FSDP gathers its shards and a ShardedOptimizer its state (so the checkpoint resumes on any
        number of ranks), and every rank's RNG state is collected. Rank 0's dict is the one to write."""
        config = self.config
        if isinstance(self.ddp, FSDP):
            model, optimizer = self.ddp.full_state_dict(), self.ddp.full_optim_state_dict(self.optimizer)
        else:
            model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        rng = gather_from_ranks(checkpoint.rng_state()) if self.world.world_size > 1 else [checkpoint.rng_state()]
        return {"format": checkpoint.FORMAT, "step": self.step, "model": model, "optimizer": optimizer,
                "schedule": {"step": self.step},
                "data": {"seed": config.seed, "step": self.step, "batch_size": config.batch_size,
                         "context_length": config.context_length},
                "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (a `state_dict()`, on every rank): under FSDP each rank keeps its slices of
        the full tensors; each rank takes its own RNG state (rank 0's when the number of ranks changed).
        Rank 0 warns when the data settings differ from the saved run's (the batches then differ)."""
        if isinstance(self.ddp, FSDP):
            self.ddp.load_full_state_dict(state["model"])
            self.ddp.load_full_optim_state_dict(self.optimizer, state["optimizer"])
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["schedule"]["step"]
        config, data = self.config, state["data"]
        ours = {"seed": config.seed, "batch_size": config.batch_size, "context_length": config.context_length}
        changed = {key: (data[key], value) for key, value in ours.items() if data.get(key) != value}
        if changed and self.world.is_main:
            text = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
            print(f"warning: resuming with different data settings ({text}): batches differ from the interrupted "
                  "run", file=sys.stderr)
        rng = state["rng"]
        checkpoint.set_rng_state(rng[self.world.rank] if len(rng) == self.world.world_size else rng[0])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_trainer(config: TrainConfig, world: World) -> Trainer:
    """Data, model (identical on every rank: same seed, then DDP broadcasts rank 0's), optimizer."""
    # scan=False: `prepare` (the launcher) read and checked every id and fixed the vocabulary.
    train_tokens, val_tokens, _ = load_splits(config.data.data, config.data.val_data, config.data.corpus,
                                              config.context_length, scan=False)
    seed_everything(config.seed)
    precision = config.runtime.precision  # the one precision policy: model dtype, autocast, DDP/FSDP dtypes
    checkpointing = resolve_train_checkpointing(config, world.device)  # before the model takes memory
    if isinstance(checkpointing, CheckpointPlan):
        if world.is_main:
            record_plan(checkpointing, config.out_dir)
        checkpointing = checkpointing.per_layer
    model = config.model.build().to(world.device, precision.param)
    forward, ddp = parallelize(model, world.world_size, compile_model=config.runtime.compile,
                               compile_backend=config.runtime.compile_backend,
                               activation_checkpointing=checkpointing,
                               fsdp=config.parallel.fsdp, engine=config.parallel.engine, precision=precision,
                               bucket_size_mb=config.parallel.bucket_size_mb)
    comm = Stopwatch(world.device)
    shard = config.parallel.shard_optimizer and world.world_size > 1
    optimizer = build_optimizer(model.parameters(), config.optimizer, shard=shard, communication_timer=comm)
    if isinstance(ddp, TorchFSDP2):  # its optimizer state is DTensors: checkpoints gather them too
        ddp.full_state_dicts(optimizer)
    batches = TokenBatches(tokens=train_tokens, batch_size=config.batch_size, context_length=config.context_length,
                           accumulation=config.grad_accum_steps, seed=config.seed, rank=world.rank,
                           world_size=world.world_size, device=world.device, eot_id=config.data.eot_id)
    val_batches = None
    if val_tokens is not None and config.eval_every:
        val_batches = validation_batches(val_tokens, config.eval_batches * config.batch_size,
                                         config.micro_batch_size, config.context_length, world.rank,
                                         world.world_size, world.device, config.data.eot_id)
    return Trainer(config, world, model, forward, ddp, optimizer, batches, val_batches, comm)


# ---------------------------------------------------------------- checkpoints


def save_trainer(trainer: Trainer) -> None:
    """Checkpoint `trainer` into its checkpoint_dir: a collective (see Trainer.state_dict); rank 0 writes."""
    state = trainer.state_dict()
    if trainer.world.is_main:
        checkpoint.save(trainer.checkpoint_dir, trainer.step, state, trainer.config.checkpoint.keep)
    barrier(trainer.world)  # no rank runs ahead (or dies) before the checkpoint is complete


def restore_trainer(trainer: Trainer) -> int | None:
    """Load the newest readable checkpoint into `trainer` on every rank; its step, or None if there is none.

    Rank 0 picks the file (reporting and skipping damaged ones) and tells the others which. A checkpoint
    beyond --steps is a ConfigError, raised before anything is restored or written: the run never
    trains past --steps, and a shorter --steps must not make it prune the longer run's checkpoints.
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
    if state["step"] > trainer.config.steps:  # every rank raises: none waits in a collective for the others
        raise ConfigError(f"--steps {trainer.config.steps} is below step {state['step']} of the checkpoint to resume "
                          f"({choice[0]}): pass --steps {state['step']} or more, or another --out-dir")
    check_same_model(trainer.config, state["model"], choice[0])
    trainer.load_state_dict(state)
    return trainer.step


def check_same_model(config: TrainConfig, saved: dict[str, torch.Tensor], path: str) -> None:
    """A ConfigError naming the first tensor whose shape differs between the checkpoint at `path` and the
    model `config` builds (a model on the meta device: shapes only, no memory), before anything is loaded."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in config.model.build().state_dict().items()}
    found = {name: tuple(t.shape) for name, t in saved.items()}
    if expected == found:
        return
    differs = [n for n in expected if found.get(n) != expected[n]] + [n for n in found if n not in expected]
    name = differs[0]
    raise ConfigError(f"--resume: {path} holds another model: {name} is {found.get(name, 'missing')} there and "
                      f"{expected.get(name, 'missing')} here; resume with the model flags it was trained with "
                      "(its run's config.json), or choose another --out-dir")


# ---------------------------------------------------------------- one step


def train_step(trainer: Trainer) -> torch.Tensor:
    """One optimizer step; returns this rank's detached mean loss (no host sync)."""
    from cs336_basics.nn_utils import clip_gradient

    config, ddp = trainer.config, trainer.ddp
    micro_batches = trainer.batches.micro_batches(trainer.step + 1)
    if ddp is not None:
        ddp.on_train_batch_start()
    for group in trainer.optimizer.param_groups:  # before backward: an InBackwardOptimizer steps inside it
        group["lr"] = learning_rate(config.optimizer, trainer.step + 1, config.steps)
    total = torch.zeros((), device=trainer.world.device)
    for i, batch in enumerate(micro_batches):  # batch: inputs, targets[, document_ids]
        last = i == len(micro_batches) - 1
        with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
            with autocast(config.runtime):
                loss = lm_loss(trainer.forward, *batch, loss=trainer.config.loss) / len(micro_batches)
            loss.backward()
        total += loss.detach()
    if ddp is not None:
        with trainer.comm:
            ddp.finish_gradient_synchronization()
    if config.optimizer.grad_clip:
        if isinstance(ddp, FSDP):  # the norm of the full gradients: a collective over the shards
            ddp.clip_grad_norm_(config.optimizer.grad_clip)
        else:
            clip_gradient(trainer.model.parameters(), config.optimizer.grad_clip)
    if not isinstance(trainer.optimizer, InBackwardOptimizer):  # that one stepped and freed every gradient in backward
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.step += 1
    return total


@torch.no_grad()
def evaluate(trainer: Trainer) -> float:
    """Mean loss over the fixed validation windows, all ranks' shares together."""
    trainer.model.eval()
    total = torch.zeros(2, device=trainer.world.device)  # (sum of per-window losses, windows)
    for batch in trainer.val_batches:  # inputs, targets[, document_ids]
        with autocast(trainer.config.runtime):
            total[0] += lm_loss(trainer.forward, *batch, loss=trainer.config.loss) * len(batch[0])
        total[1] += len(batch[0])
    trainer.model.train()
    if trainer.world.world_size > 1:
        dist.all_reduce(total)
    return (total[0] / total[1]).item()


# ---------------------------------------------------------------- the loop


def _maybe_die(trainer: Trainer) -> None:
    """The KILL_AT_STEP test hook (a no-op unless the variable is set)."""
    at = os.environ.get(KILL_AT_STEP)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if at and int(at) == trainer.step and trainer.world.rank == trainer.world.world_size - 1 and first_attempt:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CPU, torch's deterministic kernels, so that equal runs give equal bits whatever the thread count.

    The embedding lookup's backward (index_put_ with accumulate) otherwise adds the rows of repeated
    tokens from several threads with float atomics, in an order that changes from run to run. Not on
    CUDA: there the mode makes cuBLAS raise without CUBLAS_WORKSPACE_CONFIG and leaves the attention
    and loss kernels as they are, so it would promise what it cannot keep. torch.empty() is not
    NaN-filled (the mode's default): results, not uninitialised memory, are what must be deterministic.
    """
    if device.type != "cpu":
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]


def fit(trainer: Trainer, emit: MetricsHook | None) -> dict[str, float]:
    """Train from `trainer.step` to config.steps (nothing when it is there already); `emit` (None:
    drop) gets every record. On CPU, with deterministic kernels (`deterministic_kernels`).

    Returns the steps taken and seconds of training, communication (mean over ranks; part of
    training) and checkpointing.
    """
    with deterministic_kernels(trainer.world.device):
        return _loop(trainer, emit)


def _loop(trainer: Trainer, emit: MetricsHook | None) -> dict[str, float]:
    config, world = trainer.config, trainer.world
    tokens_per_step = config.batch_size * config.context_length
    emit = emit or (lambda record: None)
    clock, checkpoint_seconds = Clock(world.device), 0.0
    first_step = last_step = trainer.step
    last_seconds = 0.0
    while True:
        step = trainer.step
        # Decided from the config alone: every rank must join evaluate()'s all-reduce.
        if trainer.val_batches is not None and (step % config.eval_every == 0 or step >= config.steps):
            with clock.paused():
                emit({"kind": "eval", "step": step, "val_loss": evaluate(trainer)})
        if step >= config.steps:  # `>=`: a trainer that starts past the end trains nothing
            break
        try:
            loss = train_step(trainer)
        except torch.OutOfMemoryError:
            # One line, as the CLI prints a ConfigError: the options that lower a step's memory.
            raise ConfigError(f"{world.device} ran out of memory in step {step + 1}: {OOM_ADVICE}") from None
        if trainer.step % config.log_every == 0 or trainer.step in (1, config.steps):
            loss_value = reduce_mean(loss, world).item()  # the host sync of a logged step
            seconds = clock.read()
            lr = learning_rate(config.optimizer, trainer.step, config.steps)
            emit({"kind": "train", "step": trainer.step, "loss": loss_value, "lr": lr,
                  "tokens_per_s": (trainer.step - last_step) * tokens_per_step / (seconds - last_seconds),
                  "train_seconds": seconds, "comm_seconds": trainer.comm.seconds})
            last_step, last_seconds = trainer.step, seconds
        every = config.checkpoint.every
        if every and (trainer.step % every == 0 or trainer.step == config.steps):
            start = time.perf_counter()
            with clock.paused():
                save_trainer(trainer)
            checkpoint_seconds += time.perf_counter() - start
        _maybe_die(trainer)
    comm = reduce_mean(torch.tensor(trainer.comm.seconds, device=world.device), world).item()
    return {"steps": trainer.step - first_step, "train_seconds": clock.read(), "comm_seconds": comm,
            "checkpoint_seconds": checkpoint_seconds}

