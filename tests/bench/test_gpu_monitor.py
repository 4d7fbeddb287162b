"""GpuMonitor on CPU: a fake NVML stands in for the card, so the sampling thread and the summary are
checked without one; without NVML the monitor says why and never fails the run."""

import time

import pytest
import torch

from cs336_systems.bench.gpu_monitor import GpuMonitor


class FakeNvml:
    """Returns a programmed sequence of readings: clocks fall and power rises, as under sustained load."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.reads = 0

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("card", index)

    def nvmlDeviceGetClockInfo(self, handle, kind):
        self.reads += 1
        return 1980 if self.reads <= 2 else 1755

    def nvmlDeviceGetPowerUsage(self, handle):
        return 700_000 if self.reads <= 2 else 690_000  # milliwatts

    def nvmlDeviceGetTemperature(self, handle, kind):
        return 60 + self.reads

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle):
        return 0 if self.reads <= 2 else 0x4  # software power cap from the third sample on


def test_summary_of_sampled_readings():
    fake = FakeNvml()
    with GpuMonitor(index=0, interval_s=0.001, nvml=fake) as monitor:
        deadline = time.perf_counter() + 5
        while len(monitor.samples) < 6 and time.perf_counter() < deadline:
            time.sleep(0.001)
    summary = monitor.summary()
    n = summary["samples"]
    assert n >= 6 and n == len(monitor.samples)
    assert summary["sm_clock_mhz_max"] == 1980 and summary["sm_clock_mhz_min"] == 1755
    assert summary["sm_clock_mhz_median"] == 1755  # most samples are after the drop
    assert summary["power_w_max"] == 700.0
    assert summary["power_w_mean"] == pytest.approx((2 * 700 + (n - 2) * 690) / n)
    assert summary["throttle"] == {"sw_power_cap": pytest.approx((n - 2) / n)}
    assert summary["temperature_c_max"] == 60 + n


def test_sampling_stops_at_exit():
    with GpuMonitor(index=0, interval_s=0.001, nvml=FakeNvml()) as monitor:
        time.sleep(0.01)
    taken = len(monitor.samples)
    time.sleep(0.02)
    assert len(monitor.samples) == taken


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_the_summary_says_why():
    with GpuMonitor() as monitor:
        pass
    summary = monitor.summary()
    assert summary["samples"] == 0 and summary["unavailable"]
