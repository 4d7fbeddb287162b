"""Random language-modelling batches from a 1-D token array (in memory or np.memmap)."""

from __future__ import annotations

import numpy as np
import torch

from cs336_basics.nn_utils import check_positive_int


def get_batch(dataset: np.ndarray, batch_size: int, context_length: int, device: str | torch.device,
              generator: np.random.Generator | torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `batch_size` windows; returns inputs x and next-token targets y, int64 (B, T) on `device`.

    Only the sampled windows are read, so a memmap of a multi-GB corpus is never loaded whole.
    `generator` (a numpy or torch generator) makes the draw reproducible; None samples from numpy's
    global generator (seeded by `np.random.seed`).
    """
    check_positive_int(batch_size=batch_size, context_length=context_length)
    if dataset.ndim != 1:
        raise ValueError(f"dataset must be a 1-D token array, got shape {dataset.shape}")
    if len(dataset) < context_length + 1:
        raise ValueError(f"dataset has {len(dataset)} tokens, fewer than context_length + 1 = "
                         f"{context_length + 1} needed for one (input, target) window")
    starts = _sample_starts(len(dataset) - context_length, batch_size, generator)  # (B,)
    # Contiguous slices rather than one fancy index: each window is a sequential read of the memmap.
    windows = np.stack([dataset[s : s + context_length + 1] for s in starts])  # (B, T + 1)
    windows = torch.from_numpy(windows.astype(np.int64, copy=False))
    x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T) each
    return _to_device(x, device), _to_device(y, device)


def _sample_starts(num_starts: int, batch_size: int,
                   generator: np.random.Generator | torch.Generator | None) -> list[int]:
    """`batch_size` window starts, uniform in [0, num_starts)."""
    if isinstance(generator, torch.Generator):
        return torch.randint(num_starts, (batch_size,), generator=generator).tolist()
    if generator is None:
        # numpy's global generator, as CS336 code does, so `np.random.seed` makes runs repeatable.
        return np.random.randint(num_starts, size=batch_size).tolist()
    return generator.integers(num_starts, size=batch_size).tolist()


def _to_device(x: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    device = torch.device(device)
    if device.type == "cuda":
        # Pinned memory lets the copy run asynchronously, overlapping the previous step's compute.
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)
