"""`train` end to end on CPU: N gloo processes train like one, resuming is bit-exact, bad input fails early.

Every run trains the `tiny` model for 6 steps of 8 x 32 tokens and ends with a checkpoint, whose
weights the tests compare. Launching processes costs seconds, so the runs the comparisons share
are made once per module (`runs`); single-process runs happen in the pytest process itself.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import assert_cli_error
from numerics import oracle_bound

from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.training import checkpoint
from cs336_systems.training import command as train
from cs336_systems.training.config import config_from_args

pytestmark = pytest.mark.usefixtures("one_thread")  # runs in this process: one thread, like each rank
STEPS = 6
COMMON = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--steps", str(STEPS),
          "--log-every", "1", "--eval-every", "3", "--eval-batches", "1", "--lr", "1e-2", "--no-progress"]
REFERENCE_RUNS = {  # name -> flags; every run checkpoints at its end
    "one": ["--nproc", "1", "--checkpoint-every", "2"],
    "one-accum": ["--nproc", "1", "--grad-accum-steps", "2", "--checkpoint-every", "6"],
    "one-accum4": ["--nproc", "1", "--grad-accum-steps", "4", "--checkpoint-every", "6"],
    "two": ["--nproc", "2", "--no-shard-optimizer", "--checkpoint-every", "6"],
    "two-sharded-accum": ["--nproc", "2", "--grad-accum-steps", "2", "--checkpoint-every", "2"],
}


def parse(*flags: str):
    return config_from_args(cli.build_parser().parse_args(["train", *COMMON, *flags]))


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.list_checkpoints(out_dir / "checkpoints")[-1]
    state = checkpoint.load(path)
    assert state["step"] == STEPS
    return state["model"]


def train_losses(out_dir: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, flags in REFERENCE_RUNS.items():
        out[name] = tmp_path_factory.mktemp(name)
        assert cli.main(["train", *COMMON, *flags, "--out-dir", str(out[name])]) == 0
    return out


def assert_same_weights(ours: dict, theirs: dict) -> None:
    """Bit-equal weights (a resumed run repeats the same arithmetic in the same order)."""
    assert ours.keys() == theirs.keys()
    for name, ours_tensor in ours.items():
        assert torch.equal(ours_tensor, theirs[name]), name


# ---------------------------------------------------------------- data parallelism


# Each run that splits the global batch, and its oracles: one process accumulating 2 or 4 micro-batches.
SPLIT_ORACLES = {"two": ["one-accum", "one-accum4"], "two-sharded-accum": ["one-accum", "one-accum4"],
                 "one-accum": ["one-accum4"], "one-accum4": ["one-accum"]}


@pytest.mark.parametrize("name", list(SPLIT_ORACLES))
def test_same_global_batch_trains_the_same(runs, name):
    """2 processes (plain or sharded AdamW) and gradient accumulation all match one process: the
    largest difference over all weights (and over the logged losses) is at most twice what one
    process accumulating the same batch in pieces shows, measured here, plus one eps of the values
    (their last rounding: a logged loss may differ by that where the oracle's happens not to).
    Splitting the batch changes the order of the sums, so no split run equals the whole-batch one on
    every CPU; Adam turns that rounding in near-zero gradients into updates of up to ~lr, in a few
    elements, so the measure is the largest element, not a norm. A wrong gradient or batch differs in
    every element."""
    whole = final_weights(runs["one"])
    assert [s for s, _ in train_losses(runs[name])] == list(range(1, STEPS + 1))

    def distances(run: str) -> tuple[float, float]:
        weights, losses = final_weights(runs[run]), train_losses(runs[run])
        assert weights.keys() == whole.keys()
        return (max((weights[key] - tensor).abs().max().item() for key, tensor in whole.items()),
                max(abs(a - b) for (_, a), (_, b) in zip(losses, train_losses(runs["one"]), strict=True)))

    ours, gaps = distances(name), [distances(oracle) for oracle in SPLIT_ORACLES[name]]
    scales = (max(t.abs().max().item() for t in whole.values()),
              max(abs(loss) for _, loss in train_losses(runs["one"])))
    for what, i in (("weights", 0), ("losses", 1)):
        bound = oracle_bound(max(gap[i] for gap in gaps), torch.float32, scales[i])
        assert ours[i] <= bound, f"{what}: {ours[i]:.3e} > {bound:.3e} ({SPLIT_ORACLES[name]}: {gaps})"


def test_outputs(runs):
    out = runs["two-sharded-accum"]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["parallel"]["shard_optimizer"] and config["grad_accum_steps"] == 2
    assert (out / "loss.png").stat().st_size > 0
    names = [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")]
    assert names == ["step_00000004.pt", "step_00000006.pt"]
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert [e["step"] for e in evals] == [0, 3, 6]


# ---------------------------------------------------------------- checkpoints and resuming


class Interrupt(Exception):
    pass


def interrupt_at(step: int):
    def hook(record):
        if record["kind"] == "train" and record["step"] == step:
            raise Interrupt

    return hook


@pytest.mark.parametrize("damage_newest", [False, True], ids=["clean", "truncated-newest"])
def test_resume_is_bit_exact(runs, tmp_path, capsys, damage_newest):
    """Interrupted after step 5 (checkpoints 2 and 4), resumed: the weights of an uninterrupted run.

    With the newest checkpoint truncated, resuming names it and falls back to step 2.
    """
    flags = ["--nproc", "1", "--checkpoint-every", "2", "--out-dir", str(tmp_path), "--resume"]
    with pytest.raises(Interrupt):
        train.train(parse(*flags), hooks=[interrupt_at(5)])
    newest = checkpoint.checkpoint_path(tmp_path / "checkpoints", 4)
    if damage_newest:
        newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    summary = train.train(parse(*flags))
    err = capsys.readouterr().err
    assert summary["resumed_from"] == (2 if damage_newest else 4)
    assert (str(newest) in err and "falling back" in err) == damage_newest
    assert_same_weights(final_weights(tmp_path), final_weights(runs["one"]))
    assert train_losses(tmp_path) == train_losses(runs["one"])  # metrics.jsonl holds each step once


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(runs, tmp_path):
    """Rank 1 SIGKILLs itself after step 3; torchrun restarts both workers, which resume from step 2."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "-m", "cs336_systems", "train", *COMMON,
               *REFERENCE_RUNS["two-sharded-accum"][2:], "--resume", "--out-dir", str(tmp_path)]
    env = {**os.environ, "CS336_KILL_AT_STEP": "3"}
    # A session of its own, so that a hang can be ended with every worker torchrun started.
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        stdout, stderr = job.communicate()  # reaps torchrun; the pipes close once every worker is dead
        stderr += "\n(test: killed after 300 s)"
    # The whole output (agent log, every worker's), for tools/stress_restart.sh to keep when this fails.
    (tmp_path / "torchrun.stdout").write_text(stdout)
    (tmp_path / "torchrun.stderr").write_text(stderr)
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "exitcode: -9" in stderr and re.search(r"resumed from +step 2", stdout)
    assert_same_weights(final_weights(tmp_path), final_weights(runs["two-sharded-accum"]))


# ---------------------------------------------------------------- bad input


BAD_CONFIGS = [
    (["--d-model", "66"], "--d-model 66 is not divisible by --num-heads 4"),
    (["--nproc", "2", "--grad-accum-steps", "3"], "--batch-size 8 is not divisible by processes x --grad-accum-steps"),
    (["--attention", "fast"], "--attention: unknown implementation 'fast'"),
    (["--data", "{tmp}/tokens.npy"], "--data: cannot read"),
    (["--vocab-size", "100"], "--vocab-size 100 is smaller than the data's largest token id"),
    (["--nproc", "0"], "--nproc must be >= 1"),
]


@pytest.mark.parametrize("flags, message", BAD_CONFIGS, ids=[flags[0] for flags, _ in BAD_CONFIGS])
def test_bad_config_is_one_line_before_any_process_group(tmp_path, capsys, monkeypatch, flags, message):
    (tmp_path / "tokens.npy").write_bytes(b"not numpy")

    def no_job(*args, **kwargs):
        raise AssertionError("a job started despite the bad configuration")

    monkeypatch.setattr(train, "run_job", no_job)
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    assert cli.main(["train", *COMMON, *flags, "--out-dir", str(tmp_path / "out")]) == 2
    assert_cli_error(capsys, message)
    assert not dist.is_initialized() and not (tmp_path / "out").exists()


def test_wandb_missing_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec None, import fails
    with pytest.raises(ConfigError, match="--wandb needs the wandb package"):
        parse("--wandb", "proj")


# ---------------------------------------------------------------- whole jobs


def test_compile_bf16_and_wandb(tmp_path, monkeypatch):
    """One process, torch.compile (aot_eager) and bf16 autocast, logging to a stand-in for wandb."""
    logged = []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            logged.append("finished")

    fake = type(sys)("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)  # found by importlib.util.find_spec
    fake.init = lambda **kwargs: FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summary = train.train(parse("--nproc", "1", "--steps", "2", "--compile", "--compile-backend", "aot_eager",
                                "--bf16", "--wandb", "proj", "--out-dir", str(tmp_path)))
    assert torch.isfinite(torch.tensor(summary["last_loss"]))
    assert (2, logged[-2][1]) == logged[-2] and "val/val_loss" in logged[-2][1] and logged[-1] == "finished"
    assert any("train/loss" in values for step, values in logged[:-1])


def test_default_job_shows_the_whole_stack(tmp_path, capsys):
    """`python -m cs336_systems` with no flags, shortened: 2 gloo ranks, DDP, sharded AdamW, flash attention."""
    assert cli.main(["--steps", "3", "--eval-every", "3", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mini model" in out and "flash attention" in out and "2 processes on cpu (gloo), DDP + sharded AdamW" in out
    for row in ("train loss", "val loss", "tokens/s", "compute", "communication", "wall time"):
        assert row in out
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "metrics.jsonl", "loss.png"}


def test_flag_defaults_are_the_config_defaults():
    """Each `train` flag's default comes from its config field: parsing no flags gives the defaults."""
    from cs336_systems.training.config import CheckpointConfig, OptimizerConfig, TrainConfig

    args = cli.build_parser().parse_args(["train"])
    defaults, optimizer, ckpt = TrainConfig.__dataclass_fields__, OptimizerConfig(), CheckpointConfig()
    for name in ("steps", "grad_accum_steps", "eval_every", "log_every", "seed"):
        assert getattr(args, name) == defaults[name].default, name
    config = config_from_args(args)  # flags a job preset may fill parse as None, then take the field's default
    assert (config.batch_size, config.context_length) == (defaults["batch_size"].default,
                                                        defaults["context_length"].default)
    assert (args.lr, args.weight_decay, args.grad_clip) == (optimizer.lr, optimizer.weight_decay, optimizer.grad_clip)
    assert (args.checkpoint_every, args.keep_checkpoints) == (ckpt.every, ckpt.keep)


def test_job_preset_fills_the_leaderboard_job_and_explicit_flags_win():
    """`train --preset 8b-32k` is the CS336 2026 leaderboard job: the 8b model, 2 x 32768 tokens,
    bf16 parameters, selective checkpointing; a flag given on the command line keeps its value."""
    def job(*flags: str):
        argv = ["train", "--preset", "8b-32k", "--device", "cpu", "--nproc", "1", *flags]
        return config_from_args(cli.build_parser(argv).parse_args(argv))

    config = job()
    assert (config.model.d_model, config.model.num_layers, config.model.vocab_size) == (4096, 34, 151_936)
    assert (config.context_length, config.batch_size, config.runtime.param_dtype) == (32_768, 2, "bf16")
    assert config.parallel.activation_checkpointing == "selective"
    config = job("--context-length", "1024", "--param-dtype", "fp32", "--activation-checkpointing", "full")
    assert (config.context_length, config.runtime.param_dtype, config.parallel.activation_checkpointing) == (
        1024, "fp32", "full")


def test_bf16_parameters_train(tmp_path):
    """--param-dtype bf16: parameters, gradients and AdamW state in bf16 (the 8B job's memory); it learns."""
    summary = train.train(parse("--nproc", "1", "--param-dtype", "bf16", "--out-dir", str(tmp_path)))
    assert summary["last_loss"] < summary["first_loss"]
