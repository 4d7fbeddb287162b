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


def eager(*tensors: torch.Tensor) -> bool:
    """True when plain tensors (parameters included) are used outside torch.compile tracing.

    Then an op's autograd Function calls its implementations directly: the custom-op dispatch costs
    tens of microseconds a call, as much as a whole small attention on the GPU. Traced code
    (dynamo, AOTAutograd's fake and functional tensors) and tensor subclasses go through the ops,
    so that graphs record them and their fakes answer for them.
    """
    return not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in tensors)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def use_triton(x: torch.Tensor) -> bool:
    """True when Triton kernels can run on x: a CUDA tensor, or a CPU tensor under the interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and interpreting())


@functools.cache
def device_capability(index: int | None) -> tuple[int, int]:
    """(major, minor) of CUDA device `index` (None: the current device), cached."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def sm_count(index: int | None) -> int:
    """Streaming multiprocessors of CUDA device `index` (None: the current device), cached."""
    device = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(device).multi_processor_count


def tf32_tensor_cores() -> bool:
    """True on GPUs with TF32 tensor cores (sm_80+)."""
    return torch.cuda.is_available() and device_capability(torch.cuda.current_device()) >= (8, 0)
