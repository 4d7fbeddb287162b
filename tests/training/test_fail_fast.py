"""`train` refuses what cannot run before it starts: non-finite hyperparameters, bad token files, a
model that does not fit the device's memory; each as one line naming the flag."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from cs336_systems import cli
from cs336_systems.errors import ConfigError
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
