"""What the card did while a benchmark ran: SM clock, power, temperature and throttle reasons, sampled.

A kernel that is slower inside a training step than alone may be slower because the card is: under a
sustained load an H100/H200 lowers its SM clock to stay within its power limit, and every kernel of the
step then runs at that clock. `GpuMonitor` samples the card from a background thread through NVML
(`pynvml`, the nvidia-ml-py package) while the code inside `with` runs, and summarises the samples:

    with GpuMonitor() as monitor:
        run_steps()
    print(monitor.summary())   # {"sm_clock_mhz_median": ..., "power_w_mean": ..., "throttle": {...}, ...}

Without NVML or a CUDA device it samples nothing and says why in the summary; it never fails the run.
Reading the card changes nothing on it (no clock, power or mode setting).
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from typing import Any

# NVML's clock-event reason bits (nvmlClocksEventReasons / throttle reasons) worth naming.
THROTTLE_REASONS = {0x1: "idle", 0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal",
                    0x40: "hw_thermal", 0x80: "hw_power_brake"}


@functools.cache  # once per process: bench attention starts a monitor for each of its timings
def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


class GpuMonitor:
    """Samples device `index` every `interval_s` seconds between __enter__ and __exit__."""

    def __init__(self, index: int | None = None, interval_s: float = 0.05, nvml: Any = None) -> None:
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._nvml = nvml or _nvml()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(_device_index(index))
        except Exception as error:  # noqa: BLE001 - no NVML, no GPU: the summary says so
            self.unavailable = f"{type(error).__name__}: {error}"

    def sample(self) -> dict[str, float]:
        nvml, handle = self._nvml, self._handle
        return {"t": time.perf_counter(),
                "sm_clock_mhz": float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,  # NVML reports milliwatts
                "temperature_c": float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)),
                "reasons": float(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))}

    def __enter__(self) -> GpuMonitor:
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._run, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.sample())
            except Exception as error:  # noqa: BLE001 - a failing read ends sampling, not the run
                self.unavailable = f"{type(error).__name__}: {error}"
                return
            self._stop.wait(self.interval_s)

    def summary(self) -> dict[str, Any]:
        """Median/min/max SM clock, mean/max power, max temperature, and the share of samples in which
        each throttle reason was set; {"samples": 0, "unavailable": why} when nothing was sampled."""
        if not self.samples:
            return {"samples": 0, "unavailable": self.unavailable or "no sample taken (run shorter than the interval)"}
        clocks = [s["sm_clock_mhz"] for s in self.samples]
        power = [s["power_w"] for s in self.samples]
        throttle = {name: sum(int(s["reasons"]) & bit != 0 for s in self.samples) / len(self.samples)
                    for bit, name in THROTTLE_REASONS.items()}
        return {"samples": len(self.samples), "sm_clock_mhz_median": statistics.median(clocks),
                "sm_clock_mhz_min": min(clocks), "sm_clock_mhz_max": max(clocks),
                "power_w_mean": statistics.fmean(power), "power_w_max": max(power),
                "temperature_c_max": max(s["temperature_c"] for s in self.samples),
                "throttle": {name: share for name, share in throttle.items() if share > 0}}


def _device_index(index: int | None) -> int:
    if index is not None:
        return index
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    return torch.cuda.current_device()
