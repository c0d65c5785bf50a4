"""The stall watchdog: exits with EXIT_STALLED when a watched block uses no CPU, not otherwise."""

import time

from spectral_plasticity.train.watchdog import EXIT_STALLED, StallWatchdog


def _busy(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(i * i for i in range(1000))


def test_a_block_using_no_cpu_is_reported_and_a_busy_one_is_not():
    exits = []
    dog = StallWatchdog(0.6, "test", poll_seconds=0.1, exit_fn=exits.append,
                        platforms=("cpu",))
    with dog.watch("busy chunk"):
        _busy(1.5)
    time.sleep(1.0)  # idle, but outside watch(): not a stall
    assert exits == []
    with dog.watch("stalled chunk"):
        time.sleep(1.5)
    assert exits == [EXIT_STALLED]


def test_it_never_arms_on_accelerators_or_when_disabled():
    assert not StallWatchdog(1.0, "gpu", platforms=("gpu",)).armed
    assert not StallWatchdog(1.0, "mixed", platforms=("cpu", "tpu")).armed
    assert not StallWatchdog(0.0, "off", platforms=("cpu",)).armed
    assert StallWatchdog(1.0, "cpu", platforms=("cpu",)).armed
