"""Timing attention passes for `bench attention`'s sweeps (the plain sweep, the dispatch sweep and the
grouped-head / document sweep of attention_variants.py): the pass closures, one row per pass, and a
failure as rows with its status. On CUDA each row carries the SM clock (median MHz) that NVML sampled while
the pass was timed, so a kernel timed here can be compared with the same kernel inside a training step
(`bench step` records the step's clock): a card under sustained load runs at its power limit's clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from cs336_systems.bench.common import OOM, UNSUPPORTED, extra_peak_mib, free_device_memory, is_oom, time_ms
from cs336_systems.bench.gpu_monitor import GpuMonitor

CUDA_ONLY = ("sdpa-cudnn", "sdpa-efficient", "flex")
PASS_FLOP_FACTOR = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}


class Unsupported(Exception):
    """This implementation cannot run here (missing backend, device, or shape it rejects)."""


def pass_functions(fn: Callable[..., Any], q, k, v, grad) -> dict[str, Callable[[], Any]]:
    """Zero-argument closures timing each pass; gradients are dropped before each backward."""

    def clear() -> None:
        q.grad = k.grad = v.grad = None

    out = fn(q, k, v)

    def backward() -> None:
        clear()
        out.backward(grad, retain_graph=True)

    def forward_backward() -> None:
        clear()
        fn(q, k, v).backward(grad)

    return {"forward": lambda: fn(q, k, v), "backward": backward, "forward+backward": forward_backward}


def time_passes(base: dict[str, Any], build: Callable[[], tuple], needs_cuda: bool, flops: float, device: str,
                passes: Iterable[str], warmup_ms: float, rep_ms: float) -> list[dict[str, Any]]:
    """`base` plus the time, TFLOP/s (`flops` per forward) and, for forward+backward, the extra peak
    memory of each pass, for the (fn, q, k, v, grad) that `build()` makes; a failure (a contender
    that needs CUDA elsewhere, one that cannot run this shape, OOM) becomes rows with its status."""
    passes = tuple(passes)
    try:
        if needs_cuda and device != "cuda":
            raise Unsupported("needs CUDA")
        fn, q, k, v, grad = build()
        runs = pass_functions(fn, q, k, v, grad)
        rows = []
        for name in passes:
            ms, clock = _time_with_clock(runs[name], device, warmup_ms, rep_ms)
            row = dict(base, **{"pass": name}, ms=ms, tflops=PASS_FLOP_FACTOR[name] * flops / ms / 1e9, status="ok",
                       **clock)
            if name == "forward+backward":
                q.grad = k.grad = v.grad = None  # the gradients count as extra memory too
                row["extra_peak_mib"] = extra_peak_mib(runs[name], device)
            rows.append(row)
        return rows
    except Exception as error:  # noqa: BLE001 - every failure is a result, never a crashed sweep
        status = OOM if is_oom(error) else UNSUPPORTED
        reason = "" if status == OOM else f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        return [dict(base, **{"pass": name}, ms=None, tflops=None, status=status, reason=reason) for name in passes]
    finally:
        free_device_memory()


def _time_with_clock(fn: Callable[[], Any], device: str, warmup_ms: float, rep_ms: float) -> tuple[float, dict]:
    """(median ms, {"sm_clock_mhz": median SM clock while timed}); the clock only on CUDA with NVML and
    where a sample was taken (a timing shorter than the 20 ms interval may have none)."""
    if device != "cuda":
        return time_ms(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms), {}
    with GpuMonitor(interval_s=0.02) as monitor:
        ms = time_ms(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    summary = monitor.summary()
    return ms, ({"sm_clock_mhz": summary["sm_clock_mhz_median"]} if summary["samples"] else {})
