"""`train --fsdp` on 2 gloo processes: the loss goes down, checkpoints hold full tensors, and a run
resumed from one ends where the uninterrupted run does (bit-exactly on the same 2 ranks, up to float
rounding on 1 rank: the checkpoint does not depend on the number of ranks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from numerics import ORACLE_FACTOR

from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.training import checkpoint
from cs336_systems.training import command as train
from cs336_systems.training.config import config_from_args

STEPS = 6
COMMON = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--steps", str(STEPS), "--log-every", "1",
          "--eval-every", "0", "--lr", "1e-2", "--no-progress", "--checkpoint-every", "3", "--keep-checkpoints", "2"]


def _parse(*flags: str):
    return config_from_args(cli.build_parser().parse_args(["train", *COMMON, *flags]))


def _train(out_dir: Path, *flags: str) -> None:
    assert cli.main(["train", *COMMON, *flags, "--out-dir", str(out_dir)]) == 0


def _losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _final(out_dir: Path) -> dict[str, torch.Tensor]:
    state = checkpoint.load(checkpoint.list_checkpoints(out_dir / "checkpoints")[-1])
    assert state["step"] == STEPS
    return state["model"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    _train(out, "--fsdp", "--nproc", "2")
    return out


def _resume_from_step_3(uninterrupted: Path, out: Path, *flags: str) -> None:
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint.checkpoint_path(uninterrupted / "checkpoints", 3), out / "checkpoints")
    _train(out, *flags, "--resume")


def test_fsdp_training_lowers_the_loss_and_saves_full_tensors(uninterrupted: Path) -> None:
    losses = _losses(uninterrupted)
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1, losses
    config = _parse()
    train.prepare(config)  # fixes the vocabulary from the data
    plain = config.model.build().state_dict()
    weights = _final(uninterrupted)
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in plain.items()}


def test_resume_on_the_same_ranks_is_bit_exact(uninterrupted: Path, tmp_path: Path) -> None:
    _resume_from_step_3(uninterrupted, tmp_path, "--fsdp", "--nproc", "2")
    ours, theirs = _final(tmp_path), _final(uninterrupted)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_resume_on_one_rank_continues_the_run(uninterrupted: Path, tmp_path: Path) -> None:
    """1 process (no sharding) from the 2-rank FSDP checkpoint: the same training up to float rounding,
    at most twice what one process's own accumulation over the two halves differs by (measured)."""
    _resume_from_step_3(uninterrupted, tmp_path / "ours", "--nproc", "1")
    _resume_from_step_3(uninterrupted, tmp_path / "halves", "--nproc", "1", "--grad-accum-steps", "2")
    ours, halves = _final(tmp_path / "ours"), _final(tmp_path / "halves")
    assert _largest_difference(ours, _final(uninterrupted)) <= ORACLE_FACTOR * _largest_difference(ours, halves)


def test_gradient_accumulation_trains_like_one_micro_batch(uninterrupted: Path, tmp_path: Path) -> None:
    """Micro-batches each reduce-scatter (no_sync is a no-op: a shard has no full gradient to hold).
    2 ranks x 2 micro-batches against 2 x 1: at most twice what one process accumulating 4 pieces
    against 2 differs by (measured)."""
    _train(tmp_path / "ours", "--fsdp", "--nproc", "2", "--grad-accum-steps", "2")
    _train(tmp_path / "four", "--nproc", "1", "--grad-accum-steps", "4")
    _train(tmp_path / "two", "--nproc", "1", "--grad-accum-steps", "2")
    gap = _largest_difference(_final(tmp_path / "four"), _final(tmp_path / "two"))
    assert _largest_difference(_final(tmp_path / "ours"), _final(uninterrupted)) <= ORACLE_FACTOR * gap


def _largest_difference(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """The largest element of all weights' differences: Adam turns rounding in near-zero gradients into
    updates of up to ~lr in a few elements, so a norm would depend on how many; a wrong gradient or
    batch differs in every element."""
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in theirs)


def test_fsdp_excludes_an_explicit_shard_optimizer() -> None:
    with pytest.raises(ConfigError, match="--fsdp and --shard-optimizer"):
        _parse("--fsdp", "--shard-optimizer")
    assert not _parse("--fsdp", "--nproc", "2").parallel.shard_optimizer
    assert _parse("--nproc", "2").parallel.shard_optimizer  # the default without --fsdp
