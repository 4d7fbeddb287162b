"""The CLI front end: bad `train` input ends in one `error: ...` line and exit code 2, no traceback."""

import pytest
from helpers import assert_cli_error

from cs336_systems import cli

BAD_TRAIN_INPUT = [
    (["--preset", "huge"], "--preset"),
    (["--preset", "tiny", "--num-heads", "3"], "--num-heads"),
    (["--preset", "tiny", "--num-heads", "64"], "RoPE"),  # head dimension 1: odd
    (["--data", "{tmp}/missing.npy"], "--data"),
    (["--context-length", "64", "--model-context-length", "32"], "--context-length"),
    (["--val-data", "{tmp}/valid.npy"], "--val-data"),
    (["--steps", "0"], "--steps"),
]


@pytest.mark.parametrize("command", [["train"], []], ids=["train", "no-subcommand"])
@pytest.mark.parametrize("argv, flag", BAD_TRAIN_INPUT, ids=[" ".join(argv) for argv, _ in BAD_TRAIN_INPUT])
def test_bad_train_input_is_a_one_line_error(tmp_path, capsys, command, argv, flag):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    out_dir = tmp_path / "out"
    assert cli.main([*command, *argv, "--out-dir", str(out_dir), "--no-progress"]) == 2
    assert_cli_error(capsys, flag)
    assert not out_dir.exists()  # nothing written for a run that never started


def test_every_command_is_registered_and_a_missing_module_fails_loudly(monkeypatch):
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "model"]).benchmark == "model"
    monkeypatch.setitem(cli.BENCHMARKS, "typo", ("cs336_systems.bench.no_such_module", "a typo"))
    with pytest.raises(ModuleNotFoundError, match="no_such_module"):
        cli.build_parser()
