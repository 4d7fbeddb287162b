"""Gluon (`triton.experimental.gluon`) FlashAttention kernels for Hopper, and when to use them.

Files: kernels_fwd.py (the warp-specialised forward), kernels_bwd_ws.py (the warp-specialised backward,
dispatched), kernels_bwd.py (the one-pass backward, kept for comparison; its helpers serve both),
launch.py / launch_bwd.py / launch_bwd_ws.py (descriptors, tiles, launch, and `compile_forward` /
`compile_backward` / `compile_backward_ws`, the ahead-of-time sm_90 compiles CI runs on CPU),
tools/gluon_timings.py (the GPU timing script).
This module imports no Gluon: it only decides.

Gluon is experimental and its API moves between Triton releases, so the kernels are used only with
the Triton minor version they were written and measured against (TESTED_TRITON). With any other
Triton, `gluon_available()` warns once and the op keeps its `tl` kernels. `CS336_GLUON=0` (read
once per process) turns the Gluon path off.

`gluon_mode(mode)` / `set_gluon_mode(mode)` switch the rules for benchmarks and tests: "auto" (the
measured rules below, the default), "off" (never Gluon) or "force" (Gluon wherever it can run, forward
and backward, whatever the size, head dim or grid; never in deterministic mode). The mode is
process-global, not per thread or per `with` block: the backward runs in autograd after the forward
returned, so it reads the mode in force when it runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch
import triton

from ops.flash_attn.launch import heads_view
from ops.flash_attn.launch_tma import tma_aligned
from ops.flash_attn.tiles import small_grid
from ops.triton_utils import device_capability

TESTED_TRITON = "3.6"  # major.minor of the Gluon API the kernels were written and measured against
GLUON_HEAD_DIMS = (64, 128)
GLUON_DTYPES = (torch.bfloat16, torch.float16)
GLUON_CAPABILITY = (9, 0)  # sm_90 exactly: wgmma and setmaxnreg; Blackwell has neither in this form
# B*H * Nq * Nk * D from which the Gluon forward is used (H200, causal bf16, docs/perf v11). Its
# launch (four Gluon host descriptors, Triton's own launch path, no replay) costs 0.05-0.15 ms more
# host time than the replayed tl launch, so small problems stay on tl: at 2**33 (4 x 4096 x 128) it
# took 0.201 vs 0.073 ms; from 2**35 it won (16 x 4096 x 128: 0.143 vs 0.176; 1 x 16384 x 128: 0.204
# vs 0.218) or tied (64 x 4096 x 64, 2**36: 0.355 vs 0.360).
GLUON_MIN_WORK = 2**35
# The backward where it measured faster than the tl backward dispatch.py would pick otherwise: the
# warp-specialised Gluon backward (kernels_bwd_ws.py) at D = 128 and 64, on one H100 (tools/gluon_timings.py
# --backward-tiles, commit e6de4e3): the 8B layer 78.9 ms against the one-pass Gluon kernel's 87.0 and the tl
# one-pass 123.4 (cuDNN 79.7); the leaderboard's D = 64 shape 3.26 ms against the tl one-pass 3.60 (cuDNN
# 3.21). With few rows the tl small-grid tiles keep more SMs busy (H200, 1 x 16384 x 128: the one-pass
# Gluon kernel 0.71 vs 0.68 ms), so those stay on tl.
GLUON_BACKWARD_HEAD_DIMS = (64, 128)
GLUON_MODES = ("auto", "off", "force")
_mode = "auto"  # process-global (set_gluon_mode): read by the rules at each forward and backward


def set_gluon_mode(mode: str) -> str:
    """Make `mode` ("auto", "off" or "force") the process-wide Gluon mode; returns the one it replaces."""
    global _mode
    if mode not in GLUON_MODES:
        raise ValueError(f"mode must be one of {', '.join(GLUON_MODES)}, got {mode!r}")
    previous, _mode = _mode, mode
    return previous


def get_gluon_mode() -> str:
    return _mode


@contextlib.contextmanager
def gluon_mode(mode: str) -> Iterator[None]:
    """`set_gluon_mode(mode)` for the block, the previous mode restored after it. Process-global: a
    backward that runs after the block (autograd) reads the mode of that moment, so wrap the backward
    too, or call set_gluon_mode."""
    previous = set_gluon_mode(mode)
    try:
        yield
    finally:
        set_gluon_mode(previous)


@functools.cache
def gluon_enabled() -> bool:
    """False when CS336_GLUON=0 (read once, like TRITON_INTERPRET)."""
    return os.environ.get("CS336_GLUON", "1") != "0"


@functools.cache
def gluon_available() -> bool:
    """True when this Triton has the Gluon API the kernels were written for; warns once otherwise."""
    version = ".".join(triton.__version__.split(".")[:2])
    if version != TESTED_TRITON:
        warnings.warn(f"cs336 flash_attn: the Gluon kernels were tested with triton {TESTED_TRITON}.x, this is "
                      f"triton {triton.__version__}; using the tl kernels instead", RuntimeWarning, stacklevel=2)
        return False
    try:
        from triton.experimental.gluon.language.nvidia import hopper  # noqa: F401
    except ImportError as err:
        warnings.warn(f"cs336 flash_attn: triton.experimental.gluon is unusable ({err}); using the tl kernels "
                      "instead", RuntimeWarning, stacklevel=2)
        return False
    return True


def gluon_forward_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: bool = False) -> bool:
    """True when launch.flash_forward_gluon can run these inputs: sm_90 CUDA tensors, 16-bit, head
    dim 64 or 128, TMA-aligned (B, H, N, D) views (any strides TMA takes: a transposed
    (B, N, H, D) projection output needs no copy), non-empty; K/V heads dividing the query heads
    (GQA); Nq == Nk with packed documents. Cheap checks first; the Triton version check (and its one
    warning) only where the Gluon kernel would otherwise run."""
    if not (q.is_cuda and q.dtype in GLUON_DTYPES and q.shape[-1] in GLUON_HEAD_DIMS):
        return False
    if not (q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1] and k.shape == v.shape):
        return False
    if q.numel() == 0 or k.numel() == 0 or device_capability(q.device.index) != GLUON_CAPABILITY:
        return False
    if documents and q.shape[-2] != k.shape[-2]:
        return False
    q4, k4, v4 = (heads_view(x) for x in (q, k, v))  # the views the descriptors take: no copies
    if not (q4.shape[0] == k4.shape[0] and q4.shape[1] % k4.shape[1] == 0):  # query head h reads K/V head h // G
        return False
    if not all(tma_aligned(x) for x in (q4, k4, v4)):
        return False
    return gluon_enabled() and gluon_available()


def _large(q: torch.Tensor, k: torch.Tensor) -> bool:
    """B*H * Nq * Nk * D >= GLUON_MIN_WORK: large enough for GPU time, not host time, to decide."""
    return q.shape[:-2].numel() * q.shape[-2] * k.shape[-2] * q.shape[-1] >= GLUON_MIN_WORK


def use_gluon_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: bool = False) -> bool:
    """The dispatch rule: the Gluon forward where it runs and the problem is large enough for its GPU
    time to decide (measured faster there, docs/perf/flash_attention_gluon.md, v11), unless CS336_GLUON=0.
    GQA (k/v with fewer heads) and packed documents (`documents`: bounds will be passed) included.
    Mode "off": never; "force": wherever it runs, whatever the size."""
    if _mode == "off":
        return False
    return (_mode == "force" or _large(q, k)) and gluon_forward_supported(q, k, v, documents)


def use_gluon_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, documents: bool = False) -> bool:
    """The Gluon backward (the warp-specialised kernel): where the forward's rule holds, at the head dims where it
    measured faster and with enough rows, unless torch is asked for deterministic algorithms (its dQ is summed by
    reductions in the order CTAs finish, as in the tl one-pass backward). It launches one CTA per K/V
    head and key tile (with GQA each walks its group's query heads), so the grid the small-grid rule
    weighs has k's heads; without GQA that is q's, as measured. Mode "off": never; "force": wherever
    the Gluon forward runs (any head dim in GLUON_HEAD_DIMS, any grid), but still never deterministically."""
    if _mode == "off" or torch.are_deterministic_algorithms_enabled():
        return False
    if _mode == "force":
        return gluon_forward_supported(q, k, v, documents)
    return (q.shape[-1] in GLUON_BACKWARD_HEAD_DIMS and not small_grid(k.shape[:-2].numel(), q.shape[-2], q.shape[-1])
            and use_gluon_forward(q, k, v, documents))


__all__ = ["GLUON_BACKWARD_HEAD_DIMS", "GLUON_HEAD_DIMS", "GLUON_MIN_WORK", "GLUON_MODES", "TESTED_TRITON",
           "get_gluon_mode", "gluon_available", "gluon_enabled", "gluon_forward_supported", "gluon_mode",
           "set_gluon_mode", "use_gluon_backward", "use_gluon_forward"]
