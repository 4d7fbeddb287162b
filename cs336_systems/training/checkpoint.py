"""Training checkpoints: atomic writes, the newest readable one on load, and RNG state capture.

A checkpoint is one file, `DIR/step_{step:08d}.pt`, written by rank 0 to `*.pt.tmp`, fsynced and renamed
into place (os.replace is atomic; the directory is fsynced after it), so no moment shows a partial
`step_*.pt` and a crash mid-write leaves the previous checkpoints untouched. Pruning runs only after
the new file has been read back as a checkpoint, and deletes only checkpoints of earlier steps beyond
the newest `keep`: the file just verified is never deleted, nor is a newer-numbered file left by
another run (a damaged one is skipped on load; a good one is replaced when training reaches its
step). The file holds only tensors and plain containers, so it loads with `torch.load(weights_only=True)`:

    {"format": FORMAT, "step": int,
     "model": model.state_dict(),                   # FSDP runs: the full tensors, gathered (any world size)
     "optimizer": consolidated optimizer state_dict (the same for plain and sharded AdamW),
     "schedule": {"step": int},                     # learning rate = schedule(step + 1) next
     "data": {"seed": int, "step": int, ...},       # batches are a function of (seed, step)
     "rng": [rng_state() of rank 0, rank 1, ...]}

This module only lays out, writes and reads the files: what goes into one is
`training.trainer.Trainer.state_dict()`, and resuming a run (`training.trainer.restore_trainer`)
picks the file with `load_newest`.

`load_newest(DIR)` tries checkpoints newest first; one that does not load (truncated, corrupt,
not a checkpoint) is reported on stderr by file name and the previous one is tried.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cs336_systems.errors import ConfigError

FORMAT = "cs336-train-checkpoint/1"
_NAME = re.compile(r"step_(\d+)\.pt")
REQUIRED_KEYS = ("format", "step", "model", "optimizer", "schedule", "data", "rng")


class CheckpointError(ConfigError):
    """No checkpoint in a directory could be loaded (a ConfigError: the CLI prints it as one line)."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoint files in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def step_of(path: Path) -> int:
    """The step a checkpoint file's name says it holds."""
    return int(_NAME.fullmatch(path.name).group(1))


def save(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step` atomically; once it reads back, prune older ones to `keep` in all."""
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())  # the bytes are on disk before the rename makes them visible
    os.replace(tmp, path)
    _fsync_directory(directory)  # the rename itself survives a power loss
    try:
        verify(path)
    except Exception as error:  # noqa: BLE001 - whatever went wrong, the older checkpoints are the fallback
        print(f"warning: checkpoint {path} does not load back ({_reason(error)}); no older checkpoint deleted",
              file=sys.stderr, flush=True)
        return path
    older = [p for p in list_checkpoints(directory) if step_of(p) < step]
    excess = len(older) - (keep - 1)  # `path` is one of the `keep`
    for old in older[:max(0, excess)]:
        old.unlink()
    _fsync_directory(directory)
    return path


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(path: Path) -> None:
    """Raise unless `path` is a complete checkpoint; memory-maps it, so the tensors' bytes are not read."""
    _check(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def load(path: Path) -> dict[str, Any]:
    """One checkpoint file, checked to be complete; raises on anything unreadable."""
    return _check(torch.load(path, map_location="cpu", weights_only=True))


def _check(state: Any) -> dict[str, Any]:
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else REQUIRED_KEYS
    if missing:
        raise ValueError(f"not a training checkpoint (missing {', '.join(missing)})")
    if state["format"] != FORMAT:
        raise ValueError(f"unknown checkpoint format {state['format']!r} (expected {FORMAT!r})")
    return state


def load_newest(directory: Path) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest loadable checkpoint, None when there is none at all.

    Leftover `*.tmp` files of an interrupted save are removed. Raises CheckpointError when
    checkpoints exist but none loads.
    """
    for tmp in directory.glob("*.pt.tmp") if directory.is_dir() else ():
        tmp.unlink()
    candidates = list_checkpoints(directory)
    failures = []
    for index in reversed(range(len(candidates))):
        path = candidates[index]
        try:
            return path, load(path)
        except Exception as error:  # noqa: BLE001 - any failure means: try the previous checkpoint
            failures.append(f"{path} ({_reason(error)})")
            then = "falling back to the previous one" if index else "no older checkpoint"
            print(f"warning: cannot load checkpoint {failures[-1]}; {then}", file=sys.stderr, flush=True)
    if failures:
        raise CheckpointError(f"no loadable checkpoint in {directory}: " + "; ".join(failures))
    return None


def _reason(error: Exception) -> str:
    """A one-line reason why a checkpoint did not load."""
    if isinstance(error, pickle.UnpicklingError):  # torch's message is a page of advice about weights_only
        return "corrupt, or holds objects other than tensors and plain containers"
    text = str(error).splitlines()[0][:200] if str(error) else ""
    if isinstance(error, ValueError):  # load()'s own checks
        return text
    return f"truncated or corrupt: {type(error).__name__}: {text}"


# ---------------------------------------------------------------- random number generators


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states as tensors and plain containers."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss,
                  "cached_gaussian": cached_gaussian},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["internal"]), py_state["gauss_next"]))
