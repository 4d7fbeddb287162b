"""`bench memory` on a tiny CPU configuration: the block table orders the policies, the model table
has a row per policy and group size, the best group size is reported, bad input fails."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from cs336_systems.bench import memory as memory_bench
from cs336_systems.errors import ConfigError

FAST = ["--preset", "tiny", "--device", "cpu", "--batch-size", "2", "--context-length", "16", "--vocab-size", "64"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    memory_bench.add_arguments(parser)
    return parser.parse_args([*FAST, *argv])


def test_tables_and_best_group_size(tmp_path, capsys):
    assert memory_bench.main(parse("--layers", "4", "--out-dir", str(tmp_path))) == 0
    block = {row["policy"]: row for row in json.loads((tmp_path / "memory_block.json").read_text())["rows"]}
    # Per token, in d_model values: full keeps the input alone; selective adds the SDPA output, its
    # logsumexp and the output projection; none keeps far more.
    assert block["full"]["d_model_values_per_token"] == 1
    assert 2.5 < block["selective"]["d_model_values_per_token"] < 3.5
    assert block["none"]["d_model_values_per_token"] > 10
    result = json.loads((tmp_path / "memory.json").read_text())
    rows = {row["policy"]: row for row in result["rows"]}
    assert list(rows) == ["none", "full", "selective", "every:1", "every:2", "every:4"]
    kept = {policy: row["forward_retained_gib"] for policy, row in rows.items()}
    assert kept["none"] > kept["selective"] > kept["full"] == kept["every:1"] > kept["every:2"] > kept["every:4"]
    assert result["meta"]["best_group_size"] == 4  # without peaks (CPU): least kept after the forward
    assert "best group size: every:4" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} == {"memory_block.md", "memory_block.json", "memory.md",
                                                   "memory.json", "memory.png"}


def test_best_group_size_prefers_the_peak():
    rows = [{"policy": "full", "peak_gib": 1.0},
            {"policy": "every:2", "peak_gib": 3.0, "forward_retained_gib": 0.1},
            {"policy": "every:3", "peak_gib": 2.0, "forward_retained_gib": 0.2},
            {"policy": "every:6", "peak_gib": "OOM"}]
    assert memory_bench.best_group_size(rows) == 3


def test_retained_bytes_counts_saved_activations_only():
    """What autograd keeps for backward: exp's (4, 8) fp32 output. Not the matmul's output (exp saves
    its result, not its input), not the view weight.T (the parameter's storage), not x (made before),
    not the returned sum."""
    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    kept, out = memory_bench.retained_bytes(lambda: (x @ weight.T).exp().sum(-1))
    assert kept == 4 * 8 * 4 and out.shape == (4,)


@pytest.mark.parametrize("argv, flag", [(["--batch-size", "0"], "--batch-size"), (["--preset", "huge"], "--preset")])
def test_bad_input_names_the_flag(argv, flag, tmp_path):
    with pytest.raises(ConfigError, match=flag):
        memory_bench.main(parse(*argv, "--out-dir", str(tmp_path)))
