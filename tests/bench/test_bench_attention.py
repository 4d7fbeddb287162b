"""`bench attention` through the CLI on CPU: a tiny sweep, the leaderboard timing, failure rows and
one-line errors for bad input."""

import json
import math
import time

import pytest
import torch
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.bench import attention
from cs336_systems.bench.gpu_monitor import GpuMonitor

FAST = ["--device", "cpu", "--warmup-ms", "1", "--rep-ms", "5"]


def run(tmp_path, *argv: str) -> int:
    return cli.main(["bench", "attention", *FAST, *argv, "--out-dir", str(tmp_path)])


def test_tiny_sweep_writes_every_row(tmp_path):
    assert run(tmp_path, "--impls", "ours", "naive", "sdpa-math", "sdpa-cudnn", "--dtypes", "fp32",
               "--seq-lens", "24", "40", "--head-dims", "16") == 0
    rows = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert len(rows) == 4 * 2 * 3  # impls x lengths x passes
    for row in rows:
        if row["impl"] == "sdpa-cudnn":  # needs CUDA: recorded, not raised
            assert row["status"] == "unsupported" and row["ms"] is None
            continue
        assert row["status"] == "ok" and math.isfinite(row["ms"]) and row["ms"] > 0
        flops = attention.attention_flops((1, 1, row["seq_len"], 16), causal=True)
        expected = attention.PASS_FLOP_FACTOR[row["pass"]] * flops / row["ms"] / 1e9
        assert row["tflops"] == pytest.approx(expected)
    assert {p.name for p in tmp_path.iterdir()} == {"attention.md", "attention.json", "attention.png"}


def test_out_of_memory_becomes_a_row(tmp_path, monkeypatch):
    def out_of_memory(causal, shape):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setitem(attention.IMPLEMENTATIONS, "naive", out_of_memory)
    assert run(tmp_path, "--impls", "naive", "--seq-lens", "16", "--head-dims", "16", "--passes", "forward") == 0
    (row,) = json.loads((tmp_path / "attention.json").read_text())["rows"]
    assert (row["status"], row["ms"]) == ("OOM", None)


def test_sweep_repeats_report_the_median_of_interleaved_rounds(tmp_path, monkeypatch):
    order = []
    measure = attention.measure
    monkeypatch.setattr(attention, "measure", lambda impl, *a: order.append(impl) or measure(impl, *a))
    assert run(tmp_path, "--impls", "ours", "naive", "sdpa-cudnn", "--dtypes", "fp32", "--seq-lens", "24",
               "--head-dims", "16", "--repeats", "3") == 0
    assert order == ["ours", "naive", "sdpa-cudnn"] * 3
    result = json.loads((tmp_path / "attention.json").read_text())
    assert result["meta"]["repeats"] == 3 and len(result["rows"]) == 3 * 3  # impls x passes
    for row in result["rows"]:
        if row["impl"] == "sdpa-cudnn":  # needs CUDA: one failure row per pass, not three
            assert row["status"] == "unsupported" and "ms_runs" not in row
            continue
        assert len(row["ms_runs"]) == 3 and row["ms"] == sorted(row["ms_runs"])[1]
        flops = attention.attention_flops((1, 1, 24, 16), causal=True)
        assert row["tflops"] == pytest.approx(attention.PASS_FLOP_FACTOR[row["pass"]] * flops / row["ms"] / 1e9)


def test_attention_flops_halve_when_causal():
    assert attention.attention_flops((2, 3, 128, 64), causal=False) == 4 * 6 * 128 * 128 * 64
    assert attention.attention_flops((128, 64), causal=True) == 2 * 128 * 128 * 64


def test_leaderboard_compares_ours_with_sdpa(tmp_path):
    assert run(tmp_path, "--leaderboard", "--leaderboard-shape", "2", "48", "16", "--repeats", "3") == 0
    result = json.loads((tmp_path / "leaderboard.json").read_text())
    rows = {row["impl"]: row for row in result["rows"]}
    assert result["meta"]["shape"] == "2x48x16" and {"ours", "sdpa-flash"} <= set(rows)
    for row in rows.values():  # the median of three interleaved rounds
        if row.get("status") is None:
            assert len(row["fwd_bwd_runs_ms"]) == 3
            assert row["fwd_bwd_ms"] == sorted(row["fwd_bwd_runs_ms"])[1]
    assert rows["ours"]["fwd_bwd_ours_over_this"] == 1
    assert rows["sdpa-flash"]["fwd_bwd_ours_over_this"] == pytest.approx(
        rows["ours"]["fwd_bwd_ms"] / rows["sdpa-flash"]["fwd_bwd_ms"])


@pytest.mark.parametrize("argv, flag", [
    (["--impls", "fastest"], "--impls"),
    (["--seq-lens", "0"], "--seq-lens"),
    (["--head-dims", "512"], "--head-dims"),
    (["--leaderboard", "--repeats", "0"], "--repeats"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, flag):
    assert run(tmp_path, *argv) == 2
    assert_cli_error(capsys, flag)


def _parsed(*argv: str):
    return attention.fill_shape(cli.build_parser().parse_args(["bench", "attention", *argv]))


def test_preset_8b_is_the_leaderboard_steps_attention_layer():
    args = _parsed("--preset", "8b", "--device", "cpu")
    assert (args.batch, args.heads, args.seq_lens, args.head_dims, args.dtypes) == (2, 32, [32768], [128], ["bf16"])
    assert (args.warmup_ms, args.rep_ms) == (2000.0, 5000.0)  # timed at the card's steady clock
    assert _parsed("--preset", "8b", "--device", "cpu", "--rep-ms", "100").rep_ms == 100.0  # flags win


def test_explicit_shape_flags_win_over_the_preset_and_defaults_fill_the_rest():
    args = _parsed("--preset", "8b", "--device", "cpu", "--seq-lens", "64", "--dtypes", "fp32")
    assert (args.batch, args.heads, args.seq_lens, args.head_dims, args.dtypes) == (2, 32, [64], [128], ["fp32"])
    plain = _parsed("--device", "cpu")
    assert (plain.batch, plain.heads, plain.seq_lens, plain.head_dims) == (1, 1, [64, 128, 256], [16, 32])


@pytest.mark.parametrize("argv, words", [
    (["--leaderboard"], ["--leaderboard-shape 16 16384 64 on --device cpu", "--max-minutes 10"]),
    (["--preset", "8b"], ["--batch 2 --heads 32 --seq-lens 32768 --head-dims 128", "--max-minutes 10"]),
])
def test_a_shape_that_cannot_finish_on_the_device_is_refused(tmp_path, capsys, monkeypatch, argv, words):
    """From its FLOPs at an optimistic rate: 10 GFLOP/s per CPU core (2 here, whatever the machine)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(attention, "make_inputs", lambda *args: pytest.fail("ran despite the refusal"))
    monkeypatch.setattr(attention.torch, "randn", lambda *args, **kwargs: pytest.fail("ran despite the refusal"))
    assert run(tmp_path, *argv) == 2
    assert_cli_error(capsys, "GFLOP of attention to time: at least", "at 20 GFLOP/s", *words)


def test_planned_flops_count_every_timed_call():
    args = _parsed("--device", "cpu", "--impls", "ours", "sdpa-cudnn", "--seq-lens", "64", "--head-dims", "16",
                   "--passes", "forward", "backward")
    # sdpa-cudnn does not run on a CPU; ours: one recording forward, then 4 calls of each pass
    assert attention.planned_flops(args) == attention.attention_flops((1, 1, 64, 16), True) * (1 + 4 * 3.5)
    board = _parsed("--device", "cpu", "--leaderboard", "--repeats", "2")
    per_impl = attention.attention_flops((16, 16384, 64), True) * 4 * (1 + 3.5)
    assert attention.planned_flops(board) == per_impl * len(attention.leaderboard_impls("cpu")) * 2


class ClockOnlyNvml:
    """NVML as far as GpuMonitor reads it: the SM clock falls from 1980 to 1500 MHz after two samples."""

    NVML_CLOCK_SM, NVML_TEMPERATURE_GPU = 1, 0

    def __init__(self):
        self.reads = 0

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self.reads += 1
        return 1980 if self.reads <= 2 else 1500

    def nvmlDeviceGetPowerUsage(self, handle):
        return 700_000

    def nvmlDeviceGetTemperature(self, handle, kind):
        return 70

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return 0x4


def test_cuda_rows_carry_the_sm_clock_sampled_while_timed(monkeypatch):
    """On CUDA every timed pass records the median SM clock of the samples taken while it ran (here a
    fake NVML and a timing that lasts long enough for several samples); elsewhere no clock column."""
    from cs336_systems.bench import attention_timing

    def slow_timing(fn, device, warmup_ms, rep_ms):
        time.sleep(0.2)
        return 1.25

    monkeypatch.setattr(attention_timing, "time_ms", slow_timing)
    monkeypatch.setattr(attention_timing, "GpuMonitor",
                        lambda interval_s: GpuMonitor(index=0, interval_s=interval_s, nvml=ClockOnlyNvml()))
    ms, clock = attention_timing._time_with_clock(lambda: None, "cuda", 1.0, 5.0)
    assert ms == 1.25 and clock == {"sm_clock_mhz": 1500.0}  # most samples after the fall
    assert attention_timing._time_with_clock(lambda: None, "cpu", 1.0, 5.0) == (1.25, {})
