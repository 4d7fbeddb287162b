"""One timer for benchmarks and training: host seconds with the device queue drained.

    with stopwatch:  ...             # Stopwatch: total seconds spent inside such blocks
    call_seconds(fn, device, warmup=1, iters=5)   # seconds of each of a fixed number of calls
    clock.read(); with clock.paused(): ...   # Clock: running seconds, with pauses left out
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued device work; a no-op on CPU."""
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


class Stopwatch:
    """Total host seconds spent inside `with stopwatch:` blocks, draining the device at both ends."""

    def __init__(self, device: torch.device | str | None) -> None:
        self.device, self.seconds, self._start = device, 0.0, 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds += time.perf_counter() - self._start

    @property
    def ms(self) -> float:
        return self.seconds * 1e3


def call_seconds(fn: Callable[[], object], device: torch.device | str | None, *, warmup: int, iters: int
                 ) -> list[float]:
    """Seconds of each of `iters` calls of `fn`, each timed by a Stopwatch, after `warmup` untimed calls.
    A fixed count (not a deadline), so ranks that time a collective this way stay matched."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        with Stopwatch(device) as watch:
            fn()
        times.append(watch.seconds)
    return times


class Clock:
    """Training seconds: wall time with evaluation and checkpointing paused out, device drained."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, 0.0, time.perf_counter()

    def read(self) -> float:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds += now - self._start
        self._start = now
        return self.seconds

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.read()
        yield
        self._start = time.perf_counter()
