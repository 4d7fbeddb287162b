"""cs336_systems.training.checkpoint: atomic saves, pruning, fallback past damaged files, RNG round trips."""

import random

import numpy as np
import pytest
import torch

from cs336_systems.training import checkpoint


def _state(step: int) -> dict:
    return {"format": checkpoint.FORMAT, "step": step, "model": {"w": torch.full((3,), float(step))},
            "optimizer": {"state": {}, "param_groups": []}, "schedule": {"step": step},
            "data": {"seed": 0, "step": step}, "rng": [checkpoint.rng_state()]}


def test_save_is_atomic_and_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        path = checkpoint.save(tmp_path, step, _state(step), keep=2)
        assert path == checkpoint.checkpoint_path(tmp_path, step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004.pt", "step_00000006.pt"]
    assert not list(tmp_path.glob("*.tmp"))
    path, state = checkpoint.load_newest(tmp_path)
    assert path.name == "step_00000006.pt" and state["step"] == 6
    assert torch.equal(state["model"]["w"], torch.full((3,), 6.0))


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert checkpoint.load_newest(tmp_path / "missing") is None
    (tmp_path / "step_00000002.pt.tmp").write_bytes(b"half a save")  # a save interrupted before its rename
    assert checkpoint.load_newest(tmp_path) is None
    assert not list(tmp_path.iterdir())  # the leftover is cleaned up


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-checkpoint", "unsafe-pickle"])
def test_damaged_newest_falls_back_to_the_previous(tmp_path, capsys, damage):
    for step in (2, 4):
        checkpoint.save(tmp_path, step, _state(step), keep=2)
    newest = checkpoint.checkpoint_path(tmp_path, 4)
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    elif damage == "garbage":
        newest.write_bytes(b"\x00" * 100)
    elif damage == "not-a-checkpoint":
        torch.save({"step": 4}, newest)
    else:  # an arbitrary object: refused by weights_only loading
        torch.save({"step": 4, "thing": np.random.default_rng(0)}, newest)
    path, state = checkpoint.load_newest(tmp_path)
    assert path.name == "step_00000002.pt" and state["step"] == 2
    err = capsys.readouterr().err
    assert str(newest) in err and "falling back" in err and err.count("\n") == 1


def test_every_checkpoint_damaged_is_an_error_naming_them(tmp_path):
    for step in (2, 4):
        checkpoint.checkpoint_path(tmp_path, step).write_bytes(b"nope")
    with pytest.raises(checkpoint.CheckpointError, match="step_00000004.pt.*step_00000002.pt"):
        checkpoint.load_newest(tmp_path)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in numpy's legacy state
    checkpoint.save(tmp_path, 1, _state(1), keep=1)
    expected = (torch.rand(3), np.random.standard_normal(4), random.random())
    _, state = checkpoint.load_newest(tmp_path)
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    checkpoint.set_rng_state(state["rng"][0])
    torch.testing.assert_close(torch.rand(3), expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(np.random.standard_normal(4), expected[1])
    assert random.random() == expected[2]


def test_pruning_keeps_newer_numbered_files_and_deletes_only_older_ones(tmp_path):
    """A resumed run saving step 5 next to a damaged step 6 keeps 5 (just verified) and leaves 6 alone."""
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, _state(step), keep=5)
    checkpoint.checkpoint_path(tmp_path, 6).write_bytes(b"damaged")
    checkpoint.save(tmp_path, 5, _state(5), keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000005.pt", "step_00000006.pt"]
    checkpoint.save(tmp_path, 6, _state(6), keep=2)  # replaces the damaged file, then prunes as usual
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000005.pt", "step_00000006.pt"]
    assert checkpoint.load_newest(tmp_path)[1]["step"] == 6


def test_a_save_that_does_not_load_back_deletes_nothing(tmp_path, monkeypatch, capsys):
    checkpoint.save(tmp_path, 2, _state(2), keep=1)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda state, file: real_save({"step": 4}, file))  # written, but not whole
    checkpoint.save(tmp_path, 4, _state(4), keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000004.pt"]
    err = capsys.readouterr().err
    assert "step_00000004.pt does not load back" in err and err.count("\n") == 1


def test_no_moment_shows_a_partial_checkpoint(tmp_path, monkeypatch):
    """While the new file is written, the directory's checkpoints are the old, complete ones."""
    checkpoint.save(tmp_path, 2, _state(2), keep=1)
    real_save, seen = torch.save, []

    def save_and_look(state, file):
        real_save(state, file)
        seen.append([p.name for p in checkpoint.list_checkpoints(tmp_path)])

    monkeypatch.setattr(torch, "save", save_and_look)
    checkpoint.save(tmp_path, 4, _state(4), keep=1)
    assert seen == [["step_00000002.pt"]]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000004.pt"]
