"""The CLI front end: bad `train` input ends in one `error: ...` line and exit code 2, no traceback."""

import subprocess
import sys

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


def test_every_command_loads_and_an_unknown_one_fails_loudly(monkeypatch):
    for command in [*cli.COMMANDS, *(f"bench {name}" for name in cli.BENCHMARKS)]:
        module = cli.load(command)
        assert callable(module.add_arguments) and callable(module.main), command
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "model"]).benchmark == "model"
    monkeypatch.setitem(cli.BENCHMARKS, "typo", "a typo")  # listed, but no module: an error, not a hidden command
    with pytest.raises(LookupError, match="'bench typo'"):
        cli.build_parser()


def test_only_the_chosen_command_is_imported():
    """`train` does not pay for the benchmarks' imports (seconds of start-up)."""
    code = ("import sys; from cs336_systems import cli; cli.build_parser(['train']); "
            "print(sorted(m for m in sys.modules if m.startswith('cs336_systems.bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("given, expected", [(None, cli.CUDA_ALLOCATOR), ("", ""), ("max_split_size_mb:64", None)],
                         ids=["default", "empty", "user-set"])
def test_commands_run_with_expandable_segments_unless_the_user_chose(monkeypatch, given, expected):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", given or "")  # recorded: the variable is restored after the test
    if given is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    with pytest.raises(SystemExit):
        cli.main(["bench", "step", "--help"])
    assert cli.os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (given if expected is None else expected)


@pytest.mark.cuda
def test_the_allocator_setting_reaches_the_caching_allocator():
    """The CLI sets it before CUDA's first allocation: the segments it maps are expandable."""
    code = ("import os; os.environ.pop('PYTORCH_CUDA_ALLOC_CONF', None); from cs336_systems import cli\n"
            "try: cli.main(['bench', 'step', '--help'])\nexcept SystemExit: pass\n"
            "import torch; x = torch.ones(2**20, device='cuda')\n"
            "print(sorted({s['is_expandable'] for s in torch.cuda.memory_snapshot()}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "[True]"
