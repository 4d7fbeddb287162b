"""`bench lm_loss` on CPU: a tiny run of every default contender, OOM rows, bad flags."""

import argparse
import json
import math

import pytest
import torch
from numerics import ORACLE_FACTOR, eps

from cs336_systems.bench import lm_loss
from cs336_systems.errors import ConfigError

TINY = ["--device", "cpu", "--tokens", "64", "--vocab", "1000", "--d-model", "32", "--warmup-ms", "1", "--rep-ms", "5"]


def run(tmp_path, *argv: str) -> list[dict]:
    parser = argparse.ArgumentParser()
    lm_loss.add_arguments(parser)
    assert lm_loss.main(parser.parse_args([*TINY, *argv, "--out-dir", str(tmp_path)])) == 0
    return json.loads((tmp_path / "lm_loss.json").read_text())["rows"]


def loss_bound(tokens: int, d_model: int, vocab: int) -> float:
    """How far (relative) a contender's fp32 loss may lie from torch's on the bench's inputs: by the
    oracle rule each errs from float64 at most twice what torch's does, so the two differ by at most
    3x torch's error plus one eps (tests/numerics.py)."""
    from ops.linear_cross_entropy import linear_cross_entropy_reference

    x, weight, targets = lm_loss.make_inputs(tokens, d_model, vocab, torch.float32, "cpu")
    low = linear_cross_entropy_reference(x, weight, targets).item()
    exact = linear_cross_entropy_reference(x.double(), weight.double(), targets).item()
    return ((ORACLE_FACTOR + 1) * abs(low - exact) + eps(torch.float32) * abs(exact)) / abs(low)


def test_tiny_run_times_every_contender(tmp_path):
    rows = run(tmp_path, "--impls", "ours", "chunked-checkpoint", "torch")
    assert [r["impl"] for r in rows] == ["ours", "chunked-checkpoint", "torch"]
    for row in rows:
        assert row["status"] == "ok" and math.isfinite(row["ms"]) and row["ms"] > 0
        assert row["tflops"] == pytest.approx(lm_loss.lm_loss_flops(64, 32, 1000) / row["ms"] / 1e9)
        assert row["loss_rel_err"] <= loss_bound(64, 32, 1000)  # fp32: every contender computes the same loss
    assert {p.name for p in tmp_path.iterdir()} == {"lm_loss.md", "lm_loss.json"}


def test_out_of_memory_becomes_a_row(tmp_path, monkeypatch):
    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.00 GiB")

    monkeypatch.setitem(lm_loss.IMPLEMENTATIONS, "torch", out_of_memory)
    ours, torch_row = run(tmp_path, "--impls", "ours", "torch")
    assert (torch_row["status"], torch_row["ms"]) == ("OOM", None)
    assert ours["status"] == "ok" and "loss_rel_err" not in ours


@pytest.mark.parametrize("argv, message", [(["--impls", "liger"], "--impls"), (["--vocab", "0"], "--vocab")])
def test_bad_flags_raise_config_error(tmp_path, argv, message):
    with pytest.raises(ConfigError, match=message):
        run(tmp_path, *argv)


def test_negative_rep_ms_is_refused(capsys):
    parser = argparse.ArgumentParser()
    lm_loss.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--rep-ms=-1"])
    assert "argument --rep-ms: must be a finite positive number, got -1.0" in capsys.readouterr().err


def test_every_bench_float_flag_refuses_nan_and_inf(capsys):
    """Every float flag of every benchmark goes through the finite-float argparse types."""
    from cs336_systems import cli

    seen = set()
    for name in cli.BENCHMARKS:
        parser = cli.build_parser(["bench", name])
        bench = parser._subparsers._group_actions[0].choices["bench"]
        sub = bench._subparsers._group_actions[0].choices[name]
        for action in sub._actions:
            if action.type is float or getattr(action.type, "__name__", "").endswith("_float"):
                flag = action.option_strings[-1]
                seen.add(f"{name} {flag}")
                for value in ("nan", "inf"):
                    with pytest.raises(SystemExit):
                        parser.parse_args(["bench", name, f"{flag}={value}"])
                    assert f"argument {flag}: must be a finite" in capsys.readouterr().err
    assert {"lm-loss --rep-ms", "attention --warmup-ms", "allreduce --sizes-mb", "ddp --bucket-sizes-mb"} <= seen


@pytest.mark.parametrize("under", ["", "sub"])
def test_every_bench_out_dir_that_is_a_file_is_one_line(tmp_path, capsys, under):
    """`--out-dir FILE` (or a folder under a file) is an argparse error, before any benchmark runs."""
    from cs336_systems import cli

    file = tmp_path / "results"
    file.write_text("")
    for name in cli.BENCHMARKS:
        with pytest.raises(SystemExit):
            cli.main(["bench", name, "--out-dir", str(file / under)])
        assert f"argument --out-dir: {file} is a file, not a directory" in capsys.readouterr().err, name
