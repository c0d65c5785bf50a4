"""The stall watchdog: exits with EXIT_STALLED when a watched block uses no CPU, not otherwise."""

import subprocess
import sys
import textwrap

from spectral_plasticity.train.watchdog import StallWatchdog

# Run in a fresh interpreter: threads that earlier tests leave in this process (XLA's pools,
# orbax's writers) use CPU of their own, which would hide the stall that the test stages.
_SCRIPT = textwrap.dedent("""
    import time
    from spectral_plasticity.train.watchdog import EXIT_STALLED, StallWatchdog

    def busy(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(i * i for i in range(1000))

    exits = []
    dog = StallWatchdog(0.6, "test", poll_seconds=0.1, exit_fn=exits.append,
                        platforms=("cpu",))
    with dog.watch("busy chunk"):
        busy(1.5)
    time.sleep(1.0)  # idle, but outside watch(): not a stall
    print("after busy and idle:", exits)
    with dog.watch("stalled chunk"):
        time.sleep(1.5)
    print("after stall:", exits, "expected:", [EXIT_STALLED])
""")


def test_a_block_using_no_cpu_is_reported_and_a_busy_one_is_not():
    out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                         timeout=120, check=True)
    lines = out.stdout.splitlines()
    assert lines[0] == "after busy and idle: []"
    assert lines[1] == "after stall: [75] expected: [75]"
    assert "stalled chunk used no CPU" in out.stderr


def test_it_never_arms_on_accelerators_or_when_disabled():
    assert not StallWatchdog(1.0, "gpu", platforms=("gpu",)).armed
    assert not StallWatchdog(1.0, "mixed", platforms=("cpu", "tpu")).armed
    assert not StallWatchdog(0.0, "off", platforms=("cpu",)).armed
    assert StallWatchdog(1.0, "cpu", platforms=("cpu",)).armed
