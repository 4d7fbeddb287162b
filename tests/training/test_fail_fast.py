"""`train` refuses what cannot run before it starts: non-finite hyperparameters, bad token files, a
model that does not fit the device's memory; each as one line naming the flag."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import numpy as np
import pytest
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.errors import ConfigError
from cs336_systems.presets import PRESETS
from cs336_systems.training import command, memory_plan
from cs336_systems.training.config import OptimizerConfig, config_from_args
from cs336_systems.training.corpus import CorpusConfig
from cs336_systems.training.data import load_splits


def float_flags(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(option, action) of every flag of `parser` that takes a float."""
    for action in parser._actions:
        name = getattr(action.type, "__name__", "")
        if action.type is float or name.endswith("_float"):
            yield action.option_strings[-1], action


def train_parser() -> argparse.ArgumentParser:
    return cli.build_parser(["train"])._subparsers._group_actions[0].choices["train"]


def test_every_train_float_flag_refuses_nan_and_inf(capsys):
    flags = dict(float_flags(train_parser()))
    assert {"--lr", "--min-lr", "--weight-decay", "--grad-clip", "--rope-theta", "--bucket-size-mb"} <= set(flags)
    for flag in flags:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit):
                cli.build_parser(["train"]).parse_args(["train", f"{flag}={value}"])
            err = capsys.readouterr().err
            assert f"argument {flag}: must be a finite" in err, err


@pytest.mark.parametrize("field, flag", [("lr", "--lr"), ("min_lr", "--min-lr"),
                                         ("weight_decay", "--weight-decay"), ("grad_clip", "--grad-clip")])
def test_optimizer_config_refuses_non_finite_values(field, flag):
    # The dataclass checks the same bounds for callers that build a config without the CLI.
    with pytest.raises(ConfigError, match=f"^{flag} must be a finite"):
        OptimizerConfig(**{field: float("nan")})


# ---------------------------------------------------------------- token files

TINY = ["train", "--preset", "tiny", "--context-length", "16", "--steps", "1", "--no-progress"]
GOOD = np.arange(1000, dtype=np.int64) % 50


def write_tokens(path, tokens: np.ndarray | None) -> str:
    """`tokens` saved at `path` (.npy or raw .bin); None: a 0-byte file."""
    if tokens is None:
        path.write_bytes(b"")
    elif path.suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    return str(path)


BAD_TOKEN_FILES = [
    ("empty.npy", None, "--data", "is empty (0 bytes)"),
    ("empty.bin", None, "--data", "is empty (0 bytes)"),
    ("no-tokens.npy", np.array([], dtype=np.int64), "--data", "holds no tokens"),
    ("negative.npy", np.array([5, 3, -2, 7] * 100, dtype=np.int64), "--data", "negative token id (-2)"),
    ("negative-val.npy", np.array([-1] * 100, dtype=np.int32), "--val-data", "negative token id (-1)"),
]


@pytest.fixture
def no_job(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a job started despite the bad input")

    monkeypatch.setattr(command, "run_job", fail)


@pytest.mark.parametrize("name, tokens, flag, message", BAD_TOKEN_FILES, ids=[b[0] for b in BAD_TOKEN_FILES])
def test_bad_token_file_is_one_line_naming_flag_and_file(tmp_path, capsys, no_job, name, tokens, flag, message):
    path = write_tokens(tmp_path / name, tokens)
    files = ["--data", path] if flag == "--data" else ["--data", write_tokens(tmp_path / "good.npy", GOOD),
                                                         "--val-data", path]
    assert cli.main([*TINY, *files, "--out-dir", str(tmp_path / "out")]) == 2
    assert_cli_error(capsys, f"{flag}: {path}", message)


def test_vocab_size_smaller_than_a_files_ids_names_the_file(tmp_path, capsys, no_job):
    path = write_tokens(tmp_path / "tokens.npy", GOOD)
    assert cli.main([*TINY, "--data", path, "--vocab-size", "20", "--out-dir", str(tmp_path / "out")]) == 2
    assert_cli_error(capsys, "--vocab-size 20", "(50, in --data " + path)


# ---------------------------------------------------------------- memory

GIB = 2**30


def test_memory_floor_counts_parameters_state_and_activations():
    shape = PRESETS["tiny"]  # d 64, d_ff 256, 2 layers
    n = shape.num_params(100)
    plan = memory_plan.estimate(shape, 100, tokens=10, param_bytes=4, activation_bytes=4, policy="none")
    kept = 6 + 2 * 256 / 64  # q, k, v, O, output projection, input + w1, w3 (d_ff wide), per token and block
    assert (plan.parameters, plan.gradients, plan.optimizer) == (4 * n, 4 * n, 8 * n)
    assert plan.activations == 10 * 64 * 2 * kept * 4
    assert plan.per_process == plan.parameters + plan.optimizer + max(plan.gradients, plan.activations)
    full = memory_plan.estimate(shape, 100, tokens=10, param_bytes=4, activation_bytes=4, policy="full")
    assert full.activations == 10 * 64 * (2 * 1 + kept) * 4  # the inputs, and one block re-run in backward
    unfused = memory_plan.estimate(shape, 100, tokens=10, param_bytes=4, activation_bytes=4, policy="none",
                                   fused_loss=False)
    assert unfused.activations == plan.activations + 10 * 100 * 4  # the logits


def test_memory_floor_divides_what_is_sharded():
    shape, kwargs = PRESETS["tiny"], dict(tokens=10, param_bytes=2, activation_bytes=2, policy="full")
    one = memory_plan.estimate(shape, 100, **kwargs)
    zero1 = memory_plan.estimate(shape, 100, world_size=4, shard_optimizer=True, **kwargs)
    fsdp = memory_plan.estimate(shape, 100, world_size=4, fsdp=True, **kwargs)
    assert (zero1.parameters, zero1.optimizer) == (one.parameters, one.optimizer // 4)
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer) == (one.parameters // 4, one.gradients // 4,
                                                                 one.optimizer // 4)


@pytest.mark.parametrize("policy, measured_gib", [("selective", 107), ("full", 76)])
def test_memory_floor_of_the_8b_32k_step_is_under_its_measured_peak(policy, measured_gib):
    """The leaderboard step on one H200 (docs/perf/train_step.md): a floor, so under what was measured,
    and over the 60 GiB of bf16 parameters, gradients and AdamW state alone."""
    plan = memory_plan.estimate(PRESETS["8b"], 151_936, tokens=2 * 32_768, param_bytes=2, activation_bytes=2,
                                policy=policy)
    assert 60 < plan.total / GIB < measured_gib


def train_config(*argv: str):
    return config_from_args(cli.build_parser(["train"]).parse_args(["train", *argv]))


def test_a_run_too_big_for_memory_is_one_line_before_any_allocation(tmp_path, capsys, no_job, monkeypatch):
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device, processes=1: 16 * GIB)
    out_dir = tmp_path / "out"
    argv = ["train", "--preset", "8b-32k", "--device", "cpu", "--nproc", "1", "--out-dir", str(out_dir)]
    assert cli.main(argv) == 2
    assert_cli_error(capsys, "8.13 B parameters", "needs at least 84.1 GiB", "16 GiB available",
                     "--preset medium fits", "--activation-checkpointing full")
    assert not out_dir.exists()


def test_a_run_that_fits_passes_the_memory_check(monkeypatch):
    config = train_config("--preset", "tiny", "--device", "cpu", "--nproc", "2", "--vocab-size", "256")
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device, processes=1: GIB)
    memory_plan.check_train_memory(config)
    monkeypatch.setattr(memory_plan, "available_bytes", lambda device, processes=1: 2**20)
    with pytest.raises(ConfigError, match="2 processes x .* lower memory with .*--nproc 1"):
        memory_plan.check_train_memory(config)


# ---------------------------------------------------------------- smaller


def test_unknown_preset_lists_the_job_presets_too(capsys, no_job):
    assert cli.main(["train", "--preset", "huge"]) == 2
    assert_cli_error(capsys, "--preset: unknown preset 'huge'", "2.7B, 8b, 8b-gqa, 8b-32k)")


@pytest.mark.parametrize("under", ["", "sub"])
def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys, no_job, under):
    file = tmp_path / "results"
    file.write_text("")
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny", "--out-dir", str(file / under)])
    assert f"argument --out-dir: {file} is a file, not a directory" in capsys.readouterr().err


def test_available_memory_on_cuda_reads_free_memory_only_of_the_gpu_this_process_uses(monkeypatch):
    """Spawned ranks' launcher reads total memory: free memory would open a CUDA context on every GPU."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setattr("torch.cuda.current_device", lambda: 0)
    monkeypatch.setattr("torch.cuda.mem_get_info", lambda index: (5 * GIB, 80 * GIB))
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: argparse.Namespace(total_memory=80 * GIB))
    assert memory_plan.available_bytes("cuda", processes=1) == 5 * GIB
    assert memory_plan.available_bytes("cuda", processes=4) == 80 * GIB
    assert memory_plan.available_bytes("cpu") > 0


def test_workers_load_the_splits_without_reading_values(tmp_path):
    """`scan=False` (the workers, after the launcher's prepare scanned every id) maps the files and
    checks their lengths but reads no token values: no id check, no vocabulary."""
    bad = np.array([5, 3, -2, 7] * 100, dtype=np.int64)
    path = write_tokens(tmp_path / "negative.npy", bad)
    train_tokens, val_tokens, vocab = load_splits(path, None, CorpusConfig(), 16, scan=False)
    assert np.array_equal(train_tokens, bad) and val_tokens is None and vocab is None
    with pytest.raises(ConfigError, match="negative token id"):
        load_splits(path, None, CorpusConfig(), 16)
    with pytest.raises(ConfigError, match="too few for --context-length 400"):
        load_splits(path, None, CorpusConfig(), 400, scan=False)
