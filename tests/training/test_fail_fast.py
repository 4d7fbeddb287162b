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
from cs336_systems.training import command
from cs336_systems.training.config import OptimizerConfig


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
