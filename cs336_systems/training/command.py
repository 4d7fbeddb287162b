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
(uint16). OUT_DIR receives config.json, metrics.jsonl, loss.png and checkpoints/. See docs/training.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cs336_systems.distributed.world import World, run_job
from cs336_systems.errors import ConfigError
from cs336_systems.presets import ModelConfig
from cs336_systems.training.config import TrainConfig, add_arguments, config_from_args
from cs336_systems.training.data import load_splits
from cs336_systems.training.report import Report, format_summary, summarize

if TYPE_CHECKING:
    from cs336_systems.training.trainer import MetricsHook

__all__ = ["TrainConfig", "add_arguments", "config_from_args", "main", "prepare", "train"]


def with_vocab(model: ModelConfig, data_vocab: int) -> ModelConfig:
    """`model` with its vocabulary taken from the data, or checked against it."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=data_vocab)
    if model.vocab_size < data_vocab:
        raise ConfigError(f"--vocab-size {model.vocab_size} is smaller than the data's largest token id + 1 "
                          f"({data_vocab})")
    return model


def prepare(config: TrainConfig) -> None:
    """Read and check the data and fix the vocabulary, before any process or process group starts."""
    _, _, vocab = load_splits(config.data.data, config.data.val_data, config.data.corpus, config.context_length)
    config.model = with_vocab(config.model, vocab)


def train(config: TrainConfig, hooks: Sequence[MetricsHook] = ()) -> dict[str, Any] | None:
    """Run the job `config` describes and print its summary; returns the summary (None on ranks > 0).

    `hooks` get every metrics record on rank 0 (they must pickle when workers are spawned).
    """
    start = time.perf_counter()
    prepare(config)
    summary = run_job(functools.partial(_train_rank, hooks=tuple(hooks)), config)
    if summary is not None:
        summary["wall_seconds"] = time.perf_counter() - start
        print(format_summary(config, summary), flush=True)
    return summary


def _train_rank(config: TrainConfig, world: World, hooks: tuple[MetricsHook, ...] = ()) -> dict[str, Any] | None:
    """One process's share of the job; rank 0 returns the summary."""
    # Imported here: DDP and the sharded optimizer pull in torch._dynamo, which the launching
    # process of a multi-process job never needs.
    from cs336_systems.training.checkpoint import restore_trainer
    from cs336_systems.training.trainer import build_trainer, fit

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


def _fan_out(hooks: Sequence[MetricsHook]) -> MetricsHook:
    def emit(record: dict[str, Any]) -> None:
        for hook in hooks:
            hook(record)

    return emit


def main(args: argparse.Namespace) -> int:
    train(config_from_args(args))
    return 0
