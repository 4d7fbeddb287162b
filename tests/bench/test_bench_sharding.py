"""`bench sharding` through the CLI on CPU (2 gloo ranks, `tiny`): rows, memory ratio, equal weights,
and one-line errors for bad input."""

import json
import math

import pytest
from helpers import assert_cli_error

from cs336_systems import cli
from cs336_systems.bench.sharding import POINTS, VARIANTS

FAST = ["--preset", "tiny", "--backend", "gloo", "--batch-size", "2", "--context-length", "16",
        "--warmup", "1", "--steps", "2", "--rounds", "1"]


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, dict]:
    """One run of every variant (spawning ranks costs seconds): both JSON files, parsed."""
    out = tmp_path_factory.mktemp("sharding")
    assert cli.main(["bench", "sharding", *FAST, "--out-dir", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {f"{n}.{ext}" for n in ("sharding", "sharding_memory")
                                               for ext in ("md", "json")}
    return {name: json.loads((out / f"{name}.json").read_text()) for name in ("sharding", "sharding_memory")}


def test_time_rows_cover_every_variant_with_equal_weights(tables):
    rows = tables["sharding"]["rows"]
    assert [r["variant"] for r in rows] == list(VARIANTS)
    for row in rows:
        for key in ("iteration_ms", "step_ms", "step_vs_torch-zero", "step_vs_torch-zero-bucket"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, key
        assert row["iteration_ms"] >= row["step_ms"]
        assert row["max_abs_diff"] == 0.0  # same gradients, same per-parameter AdamW: bit-identical
    meta = tables["sharding"]["meta"]
    assert (meta["preset"], meta["world_size"], meta["device_type"]) == ("tiny", 2, "cpu")


def test_memory_breakdown_shards_only_the_optimizer_state(tables):
    rows = {(r["variant"], r["point"]): r for r in tables["sharding_memory"]["rows"]}
    assert set(rows) == {(v, p) for v in VARIANTS for p in POINTS}
    unsharded = rows["unsharded", "before_step"]
    assert unsharded["grads_MiB"] == unsharded["params_MiB"] > 0
    assert unsharded["state_MiB"] > 1.9 * unsharded["params_MiB"]  # AdamW: two moments per parameter
    for variant in ("sharded", "torch-zero", "torch-zero-bucket"):
        for point in ("before_step", "after_step"):
            row = rows[variant, point]
            assert (row["params_MiB"], row["grads_MiB"]) == (unsharded["params_MiB"], unsharded["grads_MiB"])
            assert row["state_vs_unsharded"] <= 0.55
        assert rows[variant, "init"]["state_MiB"] == rows[variant, "init"]["grads_MiB"] == 0


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "1"], "--nproc"),
    (["--variants", "sharded", "fsdp"], "--variants"),
    (["--preset", "huge"], "--preset"),
    (["--steps", "0"], "--steps"),
])
def test_bad_input_is_a_one_line_error(tmp_path, capsys, argv, message):
    assert cli.main(["bench", "sharding", *FAST, *argv, "--out-dir", str(tmp_path)]) == 2
    assert_cli_error(capsys, message)
