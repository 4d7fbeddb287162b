"""`train --engine torch`: torch's DistributedDataParallel and FSDP2 train like ours on 2 gloo processes.

Each pair (ours and torch's DDP; ours and torch's FSDP in fp32, with bf16 parameters and fp32
reduction, and with --bf16) trains the `tiny` model for 6 steps of the same global batches; their
final weights and logged losses may differ by at most twice what one process accumulating the same
two halves differs by from one process taking the whole batch (measured here, in the same precision),
plus one eps of the values (their last rounding), in the largest element: a wrong gradient or a
missed reduction differs in every element. Checkpoints hold full tensors for every engine, so a run
of ours resumes under torch's FSDP2 and ends where ours does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from numerics import oracle_bound

from cs336_systems import cli
from cs336_systems.training import checkpoint

STEPS = 6
COMMON = ["--preset", "tiny", "--context-length", "32", "--batch-size", "8", "--steps", str(STEPS),
          "--log-every", "1", "--eval-every", "0", "--lr", "1e-2", "--no-progress", "--checkpoint-every", "3"]
BF16 = ["--param-dtype", "bf16", "--reduce-dtype", "fp32"]  # bf16 parameters, gradients averaged in fp32
RUNS = {
    "one": ["--nproc", "1"],
    "one-accum": ["--nproc", "1", "--grad-accum-steps", "2"],
    "ours-ddp": ["--nproc", "2", "--no-shard-optimizer"],
    "torch-ddp": ["--nproc", "2", "--no-shard-optimizer", "--engine", "torch"],
    "ours-fsdp": ["--nproc", "2", "--fsdp"],
    "torch-fsdp2": ["--nproc", "2", "--fsdp", "--engine", "torch"],
    "one-bf16": ["--nproc", "1", "--param-dtype", "bf16"],
    "one-accum-bf16": ["--nproc", "1", "--grad-accum-steps", "2", "--param-dtype", "bf16"],
    "ours-fsdp-bf16": ["--nproc", "2", "--fsdp", *BF16],
    "torch-fsdp2-bf16": ["--nproc", "2", "--fsdp", "--engine", "torch", *BF16],
    "one-mixed": ["--nproc", "1", "--bf16"],
    "one-accum-mixed": ["--nproc", "1", "--grad-accum-steps", "2", "--bf16"],
    "ours-fsdp-mixed": ["--nproc", "2", "--fsdp", "--bf16"],
    "torch-fsdp2-mixed": ["--nproc", "2", "--fsdp", "--engine", "torch", "--bf16"],
}
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/training/conftest.py

PAIRS = [("torch-ddp", "ours-ddp", ""), ("torch-fsdp2", "ours-fsdp", ""),
         ("torch-fsdp2-bf16", "ours-fsdp-bf16", "-bf16"), ("torch-fsdp2-mixed", "ours-fsdp-mixed", "-mixed")]
"""(torch's run, ours, the suffix of its one-process oracles: "-bf16" for bf16 parameters, "-mixed" for
--bf16: fp32 parameters, bf16 compute, where FSDP gathers bf16 weights: ours per layer, FSDP2 per block)."""


def _train(out_dir: Path, *flags: str) -> None:
    assert cli.main(["train", *COMMON, *flags, "--out-dir", str(out_dir)]) == 0


def _state(out_dir: Path) -> dict:
    state = checkpoint.load(checkpoint.list_checkpoints(out_dir / "checkpoints")[-1])
    assert state["step"] == STEPS
    return state


def _losses(out_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, flags in RUNS.items():
        out[name] = tmp_path_factory.mktemp(name)
        _train(out[name], *flags)
    return out


def _bounds(runs: dict[str, Path], suffix: str = "") -> tuple[float, float]:
    """(weights, losses): twice one process's own split-batch difference, plus one eps of the values
    (in the parameters' dtype for the weights; a logged loss is an fp32 mean). With --bf16 the two
    engines do not round the same values in another order: they cast weights to bf16 at different
    places (ours per layer, FSDP2 per block), so there the oracle is what bf16 compute itself moves
    one process's run from the fp32 one."""
    one, accum = runs["one" + suffix], runs["one-accum" + suffix]
    if suffix == "-mixed":
        one, accum = runs["one"], runs["one-mixed"]
    whole, halves = _state(one)["model"], _state(accum)["model"]
    weights_gap = _largest_difference(whole, halves)
    losses_gap = max(abs(a - b) for a, b in zip(_losses(one), _losses(accum), strict=True))
    dtype = next(iter(whole.values())).dtype
    return (oracle_bound(weights_gap, dtype, max(t.abs().max().item() for t in whole.values())),
            oracle_bound(losses_gap, torch.float32, max(abs(x) for x in _losses(one))))


@pytest.mark.parametrize("theirs, ours, suffix", PAIRS, ids=[pair[0] for pair in PAIRS])
def test_torch_engine_trains_like_ours(runs, theirs, ours, suffix):
    weights_bound, losses_bound = _bounds(runs, suffix)
    theirs_state, ours_state = _state(runs[theirs]), _state(runs[ours])
    weights = _largest_difference(theirs_state["model"], ours_state["model"])
    assert weights <= weights_bound, f"weights: {weights:.3e} > {weights_bound:.3e}"
    losses = max(abs(a - b) for a, b in zip(_losses(runs[theirs]), _losses(runs[ours]), strict=True))
    assert losses <= losses_bound, f"losses: {losses:.3e} > {losses_bound:.3e}"
    assert _losses(runs[theirs])[-1] < _losses(runs[theirs])[0] - 0.1


def test_bf16_parameters_stay_bf16(runs):
    """--param-dtype bf16: weights and AdamW state in bf16 under either FSDP (the reduce dtype is fp32
    only in flight)."""
    for run in ("ours-fsdp-bf16", "torch-fsdp2-bf16"):
        state = _state(runs[run])
        assert {v.dtype for v in state["model"].values()} == {torch.bfloat16}, run
        assert {v.dtype for e in state["optimizer"]["state"].values() for k, v in e.items() if k != "step"} \
            == {torch.bfloat16}, run


def test_torch_fsdp2_checkpoints_hold_full_tensors(runs):
    """The model and AdamW state of an FSDP2 run are saved whole, shaped like ours (no DTensors)."""
    theirs, ours = _state(runs["torch-fsdp2"]), _state(runs["ours-fsdp"])
    assert {k: v.shape for k, v in theirs["model"].items()} == {k: v.shape for k, v in ours["model"].items()}
    assert all(type(v) is torch.Tensor for v in theirs["model"].values())
    for entry in theirs["optimizer"]["state"].values():
        assert all(type(v) is torch.Tensor for k, v in entry.items() if k != "step")
    shapes = sorted(tuple(e["exp_avg"].shape) for e in theirs["optimizer"]["state"].values())
    assert shapes == sorted(tuple(v.shape) for v in ours["model"].values())


def test_torch_fsdp2_resumes_a_checkpoint_of_ours(runs, tmp_path):
    """Ours FSDP's step-3 checkpoint resumed under torch's FSDP2 ends where ours does (within the bound)."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoint.checkpoint_path(runs["ours-fsdp"] / "checkpoints", 3), tmp_path / "checkpoints")
    _train(tmp_path, *RUNS["torch-fsdp2"], "--resume")
    weights = _largest_difference(_state(tmp_path)["model"], _state(runs["ours-fsdp"])["model"])
    assert weights <= _bounds(runs)[0]
