"""Launch a Triton kernel by replaying its compiled launcher: `kernel[grid](...)` minus Triton's
per-call Python bookkeeping.

Why: on an H100 host with triton 3.6 one `kernel[grid](*args, **meta)` costs about 36 µs of host
time, of which the CUDA launch proper is about 10 µs; the rest is argument binding and
specialisation, the cache-key computation, the global-value check and the stream lookup
(docs/perf/flash_attention.md, "Host time"). An attention forward + backward is three launches,
and at small sizes host time is all there is.

How: the first launch for a given specialisation goes through `kernel[grid]`, which compiles or
finds the kernel and returns it; we keep its launcher under our own key and call that directly
afterwards. Our key must separate every two calls that Triton could compile differently. Triton
specialises a tensor on its dtype and 16-byte alignment, a tensor descriptor on its dtype and
block shape, an int on its value being 1, divisible by 16 or outside int32, and compiles per device
and per constexpr/option value; we key on the device, the keyword arguments, each tensor's (dtype,
alignment), each descriptor's every field but the base's address, and each scalar's exact value,
which is finer. (A descriptor's CUtensorMap is built by the launcher on every call, replayed or
not, so it always points at the current base.) Anything else, or a Triton without the launcher
interface this relies on (checked once per kernel), falls back to `kernel[grid]`.

Not seen by replayed launches: Triton's launch hooks (then we fall back), pre-run hooks (a
kernel with any is never replayed), and knobs changed after the first launch (set
CS336_TRITON_REPLAY=0 to debug with Triton's own path).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.runtime import driver

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4, which also lacks the launcher interface: nothing replays
    TensorDescriptor = None
try:  # Gluon's host descriptor (a layout field beside tl's), where this Triton has Gluon
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
except ImportError:
    GluonTensorDescriptor = None
_DESCRIPTORS = tuple(c for c in (TensorDescriptor, GluonTensorDescriptor) if c is not None)
_SCALARS = (int, float, bool, type(None))  # None: a constexpr parameter left unset, given positionally

# CS336_TRITON_REPLAY=0 launches everything through kernel[grid] (read once, at import).
ENABLED = os.environ.get("CS336_TRITON_REPLAY", "1") != "0"
MAX_ENTRIES = 512  # distinct (shape, stride, alignment, meta) keys kept per kernel before clearing
_ALIGN = 16  # bytes: Triton's pointer-alignment specialisation


@dataclass(frozen=True)
class _Entry:
    compiled: Any  # Triton's CompiledKernel, held so that its module outlives the handles below
    run: Any  # its launcher
    function: Any  # its CUfunction handle
    packed_metadata: Any
    constexprs: tuple  # the keyword arguments' values in the kernel's parameter order


class ReplayLauncher:
    """`ReplayLauncher(kernel)[grid](*args, **meta)` behaves as `kernel[grid](*args, **meta)`.

    The arguments must come as our launchers pass them: tensors, tensor descriptors (tl's or
    Gluon's), scalars and None (a constexpr left unset), positionally; the constexprs after the
    last positional one and the launch options (num_warps, num_stages, maxnreg) by keyword.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self._entries: dict[tuple, _Entry] = {}
        self._usable: bool | None = None  # decided by the first launch
        self.replays = 0  # launches that skipped kernel[grid]; tests read it

    def __getitem__(self, grid: tuple):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid: tuple, args: tuple, meta: dict):
        """Launch on the current stream; returns the compiled kernel when Triton launched it, None
        when replayed."""
        if self._replaying():
            device, stream = _device_and_stream()
            entry = self._entries.get(self._key(device, args, meta))
            if entry is not None:
                self.replays += 1
                entry.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                          entry.function, entry.packed_metadata, None, None, None, *args, *entry.constexprs)
                return None
        compiled = self.kernel[grid](*args, **meta)
        if self._usable is None:
            self._decide(compiled, args, meta)
        if self._replaying():
            self._keep(compiled, args, meta)
        return compiled

    def _replaying(self) -> bool:
        return bool(self._usable) and ENABLED and not _hooks_set()

    def _key(self, device: int, args: tuple, meta: dict) -> tuple:
        """What Triton compiles apart, or finer: the device, the keyword arguments, and per
        positional argument: a tensor's (dtype, alignment), a descriptor's fields, a scalar's exact
        value with its type (1 == 1.0 == True; None stands for itself)."""
        return (device, *meta.items(), *map(_arg_key, args))

    def _decide(self, compiled, args: tuple, meta: dict) -> None:
        self._usable = (_has_launcher(compiled) and _laid_out(args)
                        and self._constexprs(len(args), meta) is not None)

    def _keep(self, compiled, args: tuple, meta: dict) -> None:
        if not _laid_out(args):
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        key = self._key(_device_and_stream()[0], args, meta)
        self._entries[key] = _Entry(compiled, compiled.run, compiled.function, compiled.packed_metadata,
                                    self._constexprs(len(args), meta))

    def _constexprs(self, n_positional: int, meta: dict) -> tuple | None:
        """The values the launcher takes after the runtime arguments, or None unless the kernel's
        parameters are runtime arguments given positionally, then constexprs given by keyword."""
        params = getattr(self.kernel, "params", None)
        if params is None or getattr(self.kernel, "pre_run_hooks", None):
            return None
        rest = params[n_positional:]
        if not all(p.is_constexpr and p.name in meta for p in rest):
            return None
        return tuple(meta[p.name] for p in rest)


def _laid_out(args: tuple) -> bool:
    """Every positional argument a tensor, a descriptor or a plain scalar (what the key covers)."""
    return all(isinstance(a, (torch.Tensor, *_DESCRIPTORS)) or type(a) in _SCALARS for a in args)


def _arg_key(arg) -> tuple:
    if isinstance(arg, torch.Tensor):
        return (arg.dtype, arg.data_ptr() % _ALIGN == 0)
    if isinstance(arg, _DESCRIPTORS):
        return _descriptor_key(arg)
    return (arg, type(arg))


def _descriptor_key(desc) -> tuple:
    """Everything a host-side descriptor holds except its base's address: the base's (dtype,
    alignment), then shape, strides, block shape, options (padding, tf32 rounding) and, for
    Gluon's, the shared-memory layout (a frozen dataclass), as given."""
    base = desc.base
    return (base.dtype, base.data_ptr() % _ALIGN == 0,
            *[tuple(value) if isinstance(value, list) else value
              for name, value in vars(desc).items() if name != "base"])


def _device_and_stream() -> tuple[int, int]:
    """Triton's own choice: the current device and its current stream."""
    get_device, get_stream = _driver_functions()
    device = get_device()
    return device, get_stream(device)


@functools.cache
def _driver_functions():
    """The active driver's lookups, bound once (driver.active is a lazy proxy: a Python call per
    attribute otherwise)."""
    active = driver.active
    return active.get_current_device, active.get_current_stream


def _hooks_set() -> bool:
    runtime = triton.knobs.runtime
    return _active(runtime.launch_enter_hook) or _active(runtime.launch_exit_hook)


def _active(hook) -> bool:
    """A launch hook that does something: triton 3.6+ keeps a HookChain, empty unless a profiler
    (e.g. proton) added to it; older versions keep None or a function."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _has_launcher(compiled) -> bool:
    """The compiled-kernel interface replay relies on (triton 3.x's CompiledKernel); the
    interpreter returns no compiled kernel, so it never replays."""
    return (hasattr(triton, "knobs")  # triton >= 3.4, where the launch hooks live
            and all(getattr(compiled, name, None) is not None for name in ("run", "function", "packed_metadata")))
