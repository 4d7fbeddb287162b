"""`bench fsdp` through the CLI on CPU (2 gloo ranks, `tiny`): rows for every variant, equal weights,
the memory split, the profiler trace, and one-line errors for bad input."""

import json
import math

import pytest
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.bench import fsdp

FAST = ["--preset", "tiny", "--backend", "gloo", "--batch-size", "2", "--context-length", "16",
        "--warmup", "1", "--steps", "2", "--rounds", "1"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """One run of every variant (spawning ranks costs seconds), with a trace."""
    out = tmp_path_factory.mktemp("fsdp")
    assert cli.main(["bench", "fsdp", *FAST, "--out-dir", str(out), "--trace", str(out / "trace")]) == 0
    return out


def _rows(out, name: str) -> list[dict]:
    return json.loads((out / f"{name}.json").read_text())["rows"]


def test_time_rows_cover_every_variant_with_equal_weights(out):
    rows = _rows(out, "fsdp")
    assert [r["variant"] for r in rows] == list(fsdp.VARIANTS)
    for row in rows:
        for key in ("step_ms", "step_vs_torch-fsdp2"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
        # The same training, bit-identical by construction on 2 ranks: each rank computes its slice's
        # gradients with the same kernels, the two are added (a + b: exact in either order) and halved
        # (exact), and AdamW is elementwise.
        assert row["max_abs_diff"] == 0.0
    ours = next(r for r in rows if r["variant"] == "fsdp")
    assert 0 <= ours["late_gathers"] <= 1 and ours["late_wait_ms"] >= 0


def test_fsdp_shards_parameters_gradients_and_state(out):
    rows = {(r["variant"], r["point"]): r for r in _rows(out, "fsdp_memory")}
    assert set(rows) == {(v, p) for v in fsdp.VARIANTS for p in fsdp.POINTS}
    for point in ("before_step", "after_step"):
        ddp, zero1, ours = rows["ddp", point], rows["zero1", point], rows["fsdp", point]
        assert ours["tensors_vs_ddp"] <= 0.55  # the CS336 target: about 1/world plus the replicated norms
        assert ours["params_MiB"] < 0.55 * ddp["params_MiB"] and ours["state_MiB"] < 0.55 * ddp["state_MiB"]
        assert zero1["params_MiB"] == ddp["params_MiB"] and zero1["state_MiB"] < ddp["state_MiB"]
    assert rows["fsdp", "before_step"]["gather_MiB"] > 0 and rows["fsdp", "after_step"]["gather_MiB"] == 0


def test_trace_is_written(out):
    trace = json.loads((out / "trace" / "fsdp_trace.json").read_text())
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any("all_gather" in name or "allgather" in name for name in names)


@pytest.mark.parametrize("argv, message", [
    (["--variants", "fsdp", "nope"], "--variants"),
    (["--nproc", "1"], "--nproc must be >= 2"),
    (["--preset", "huge"], "--preset"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    assert cli.main(["bench", "fsdp", *FAST, *argv, "--out-dir", str(tmp_path)]) == 2
    assert_cli_error(capsys, message)


@pytest.mark.parametrize("name", ["fsdp", "sharding", "ddp", "allreduce"])
def test_nccl_without_enough_gpus_is_a_one_line_error(tmp_path, capsys, monkeypatch, name):
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)  # as on a machine without GPUs
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["bench", name, "--backend", "nccl", "--nproc", "2", "--out-dir", str(tmp_path)]) == 2
    assert_cli_error(capsys, "--backend nccl: 2 ranks need 2 CUDA GPUs", "found 0")
