"""cs336_systems.timing.call_seconds: a fixed number of untimed, then timed calls."""

import time

from cs336_systems.timing import call_seconds


def test_call_seconds_times_each_call_after_the_warmup():
    calls = []

    def sleepy() -> None:
        calls.append(len(calls))
        time.sleep(0.002 if len(calls) > 2 else 0.0)  # the two warm-up calls return at once

    times = call_seconds(sleepy, "cpu", warmup=2, iters=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 0.002 for t in times)  # time.sleep sleeps at least as long as asked
