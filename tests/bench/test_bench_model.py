"""`bench model` through the CLI on CPU: each mode, compile/bf16/attention options, sweep, profiler,
OOM rows, and one-line errors for bad input."""

import json
import math

import pytest
import torch
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.bench import model as model_bench

FAST = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--context-length", "16", "-w", "1", "-n", "2"]


def bench(tmp_path, *argv: str) -> dict:
    """Run `bench model` with FAST settings overridden by `argv`; the parsed model.json."""
    assert cli.main(["bench", "model", *FAST, *argv, "--out-dir", str(tmp_path)]) == 0
    return json.loads((tmp_path / "model.json").read_text())


def assert_timed(row: dict, phases: tuple[str, ...]) -> None:
    for phase in (*phases, "step"):
        for key in (f"{phase}_ms", f"{phase}_std_ms"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] >= 0, key
        assert row[f"{phase}_ms"] > 0
    # The mean of per-step sums is the sum of the per-phase means.
    assert row["step_ms"] == pytest.approx(sum(row[f"{p}_ms"] for p in phases))


@pytest.mark.parametrize("mode, phases", [
    ("forward", ("forward",)),
    ("forward-backward", ("forward", "backward")),
    ("train-step", ("forward", "backward", "optimizer")),
])
def test_each_mode_times_its_phases(tmp_path, mode, phases):
    result = bench(tmp_path, "--mode", mode)
    (row,) = result["rows"]
    assert (row["preset"], row["context_length"], row["mode"], row["batch_size"]) == ("tiny", 16, mode, 2)
    assert_timed(row, phases)
    assert not {"backward_ms", "optimizer_ms"} & set(row) - {f"{p}_ms" for p in phases}
    assert result["meta"]["device_type"] == "cpu" and result["meta"]["steps"] == 2
    assert {p.name for p in tmp_path.iterdir()} == {"model.md", "model.json", "model.png"}


def test_compile_bf16_and_attention_options(tmp_path):
    (row,) = bench(tmp_path, "--mode", "train-step", "--compile", "--compile-backend", "aot_eager", "--bf16",
                   "--attention", "sdpa")["rows"]
    assert (row["compile"], row["dtype"], row["attention"]) == ("aot_eager", "bf16-autocast", "sdpa")
    assert_timed(row, ("forward", "backward", "optimizer"))


def test_flash_attention_runs_on_cpu(tmp_path):
    (row,) = bench(tmp_path, "--attention", "flash")["rows"]
    assert row["attention"] == "flash"
    assert_timed(row, ("forward", "backward"))


def test_sweep_writes_a_row_per_case(tmp_path):
    result = bench(tmp_path, "--sweep", "--sweep-presets", "tiny", "mini", "--sweep-context-lengths", "8", "16",
                   "-w", "0", "-n", "1", "--mode", "forward")
    assert [(r["preset"], r["context_length"]) for r in result["rows"]] == [
        ("tiny", 8), ("tiny", 16), ("mini", 8), ("mini", 16)]
    for row in result["rows"]:
        assert_timed(row, ("forward",))
    assert result["rows"][2]["d_model"] == 128  # mini's shape, not tiny's carried over
    table = (tmp_path / "model.md").read_text()
    assert table.count("| tiny |") == 2 and table.count("| mini |") == 2
    assert (tmp_path / "model.png").stat().st_size > 0


def test_out_of_memory_case_is_a_row_and_the_sweep_goes_on(tmp_path, monkeypatch):
    real = model_bench.time_case

    def run_out_of_memory_at_16(config, model, context_length):
        if context_length == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(config, model, context_length)

    monkeypatch.setattr(model_bench, "time_case", run_out_of_memory_at_16)
    rows = bench(tmp_path, "--sweep-context-lengths", "8", "16", "--sweep-presets", "tiny", "--mode", "forward",
                 "-w", "0", "-n", "1")["rows"]
    assert rows[1]["forward_ms"] == rows[1]["step_ms"] == "OOM"
    assert_timed(rows[0], ("forward",))
    assert "| OOM |" in (tmp_path / "model.md").read_text() and (tmp_path / "model.png").exists()


def test_profile_writes_a_chrome_trace_with_phase_ranges(tmp_path):
    trace = tmp_path / "traces" / "tiny.json"
    bench(tmp_path, "--profile", str(trace), "--mode", "train-step")
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    assert {"forward", "backward", "optimizer", "measure"} <= names


BAD_INPUT = [
    (["--preset", "huge"], "--preset"),
    (["--num-heads", "3"], "--num-heads"),
    (["--num-heads", "64"], "RoPE"),  # head dimension 1: odd
    (["--context-length", "64", "--model-context-length", "32"], "--context-length"),
    (["--attention", "nope"], "--attention"),
    (["--steps", "0"], "--steps"),
    (["--sweep-presets", "tiny", "huge"], "--sweep-presets"),
    (["--sweep-context-lengths", "16", "64", "--model-context-length", "32"], "--context-length 64"),
    (["--compile", "--compile-backend", "nope"], "--compile-backend"),
]


@pytest.mark.parametrize("argv, flag", BAD_INPUT, ids=[" ".join(argv) for argv, _ in BAD_INPUT])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, argv, flag):
    assert cli.main(["bench", "model", *FAST, *argv, "--out-dir", str(tmp_path)]) == 2
    assert_cli_error(capsys, flag)
    assert not any(tmp_path.iterdir())  # failed before timing anything


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_memory_snapshot_without_cuda_is_a_one_line_error(tmp_path, capsys):
    argv = ["bench", "model", *FAST, "--memory-snapshot", str(tmp_path / "snap.pickle")]
    assert cli.main(argv) == 2
    assert_cli_error(capsys, "--memory-snapshot needs a CUDA device")
