"""`bench allreduce` and `bench ddp` through the CLI on CPU: 2 gloo ranks, tiny sizes, the JSON rows
they write, the rank counts chosen by default, and one-line errors for bad input."""

import json
import math

import pytest
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.bench import allreduce

ALLREDUCE_FAST = ["--backend", "gloo", "--nproc", "2", "--warmup", "1", "--iters", "2"]
DDP_FAST = ["--backend", "gloo", "--preset", "tiny", "--batch-size", "1", "--context-length", "8",
            "--warmup", "1", "--steps", "2", "--rounds", "2"]


def bench(tmp_path, name: str, *argv: str) -> dict:
    assert cli.main(["bench", name, *argv, "--out-dir", str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {f"{name}.md", f"{name}.json", f"{name}.png"}
    return json.loads((tmp_path / f"{name}.json").read_text())


def is_positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_allreduce_rows(tmp_path):
    result = bench(tmp_path, "allreduce", *ALLREDUCE_FAST, "--sizes-mb", "0.01", "0.1")
    rows = result["rows"]
    assert [(r["backend"], r["device"], r["nproc"], r["size_mb"]) for r in rows] == [
        ("gloo", "cpu", 2, 0.01), ("gloo", "cpu", 2, 0.1)]
    for row in rows:
        assert all(is_positive(row[k]) for k in ("latency_ms", "rank_mean_ms", "algbw_GBps", "busbw_GBps"))
        assert row["latency_ms"] >= row["rank_mean_ms"]  # the slowest rank's median
        assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"])  # 2 (n - 1) / n = 1 for 2 ranks
    assert result["meta"]["iters"] == 2


def test_ddp_rows(tmp_path):
    result = bench(tmp_path, "ddp", *DDP_FAST, "--bucket-sizes-mb", "0.05", "1")
    rows = {r["variant"]: r for r in result["rows"]}
    assert list(rows) == ["no-comm", "naive", "flat", "individual", "bucketed-0.05", "bucketed-1", "torch-ddp"]
    for name, row in rows.items():
        assert is_positive(row["step_ms"]) and len(row["round_ms"]) == 2, name
        assert row["vs_torch_ddp"] > 0 and "exposed_ms" in row
    assert rows["torch-ddp"]["vs_torch_ddp"] == 1.0 and rows["torch-ddp"]["comm_is"] == "unknown"
    assert [rows[v]["comm_is"] for v in ("no-comm", "flat", "bucketed-1")] == ["none", "all", "exposed"]
    assert is_positive(rows["naive"]["comm_ms"]) and 0 < rows["naive"]["comm_share"] < 1
    assert (result["meta"]["preset"], result["meta"]["world_size"]) == ("tiny", 2)


def test_ddp_cpu_defaults_to_the_small_preset():
    from cs336_systems.bench.ddp import DDPBenchConfig

    config = DDPBenchConfig(backend="gloo")
    assert (config.preset, config.batch_size) == ("small", 1)


@pytest.mark.parametrize("cores, nproc, expected", [
    (2, None, [2]),  # 4 and 6 gloo ranks would oversubscribe 2 cores
    (8, None, [2, 4, 6]),
    (2, ["4"], [4]),  # asked for explicitly: run anyway
])
def test_allreduce_rank_counts(monkeypatch, cores, nproc, expected):
    monkeypatch.setattr(allreduce.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(allreduce.torch.cuda, "device_count", lambda: 0)
    argv = ["bench", "allreduce", "--backend", "gloo"] + (["--nproc", *nproc] if nproc else [])
    args = cli.build_parser().parse_args(argv)
    assert allreduce.plan(args) == [("gloo", n) for n in expected]


BAD_INPUT = [
    ("allreduce", ["--nproc", "1"], "--nproc"),
    ("allreduce", ["--iters", "0"], "--iters"),
    ("ddp", ["--preset", "huge"], "--preset"),
    ("ddp", ["--variants", "nope"], "--variants"),
    ("ddp", ["--nproc", "1"], "--nproc"),
    ("ddp", ["--steps", "0"], "--steps"),
]


@pytest.mark.parametrize("name, argv, flag", BAD_INPUT, ids=[f"{n} {' '.join(a)}" for n, a, _ in BAD_INPUT])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, name, argv, flag):
    assert cli.main(["bench", name, "--backend", "gloo", *argv, "--out-dir", str(tmp_path)]) == 2
    assert_cli_error(capsys, flag)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name, flag", [("allreduce", "--sizes-mb"), ("ddp", "--bucket-sizes-mb")])
@pytest.mark.parametrize("value", ["0", "nan", "inf"])
def test_sizes_must_be_finite_and_positive(tmp_path, capsys, name, flag, value):
    """Refused by the flag's argparse type (errors.positive_float), before any rank starts."""
    with pytest.raises(SystemExit):
        cli.main(["bench", name, "--backend", "gloo", flag, value, "--out-dir", str(tmp_path)])
    assert f"argument {flag}: must be a finite positive number" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
