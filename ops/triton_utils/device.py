"""Where Triton kernels can run: the interpreter switch and device capabilities, read once.

Every op's launchers ask these instead of reading the environment or the driver per call (host
time of small calls).
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def interpreting() -> bool:
    """TRITON_INTERPRET=1, read once: Triton itself decides at import (when @triton.jit wraps our
    kernels) whether they run in the interpreter, so a later change would not take effect anyway."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """True when Triton kernels can run on x: a CUDA tensor, or a CPU tensor under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


@functools.cache
def device_capability(index: int | None) -> tuple[int, int]:
    """(major, minor) of CUDA device `index` (None: the current device), cached."""
    return torch.cuda.get_device_capability(index)


def tf32_tensor_cores() -> bool:
    """True on GPUs with TF32 tensor cores (sm_80+)."""
    return torch.cuda.is_available() and device_capability(torch.cuda.current_device()) >= (8, 0)
