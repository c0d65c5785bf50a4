"""A watchdog for a stalled XLA CPU computation: exit, so that the resumable run is restarted.

With jax 0.10.2 on CPU a compiled chunk (scan over tasks, Lanczos and KFAC inside) can never
finish: the host waits on the result while XLA's pool threads wait on each other inside
jaxlib's batched LAPACK kernels and the process uses no CPU (causes in ``runtime`` and
docs/RELIABILITY.md). Nothing inside the process can cancel it, but a sweep is resumable
from its last checkpoint, so the watchdog ends the process with ``EXIT_STALLED`` and a message;
``make sweep`` and ``make reproduce`` rerun the command on that status.

A stall is recognised by the process's CPU time (all threads) not advancing for
``stall_seconds`` while a computation is running. On an accelerator the host legitimately idles
while the device computes, so the watchdog only arms when every device is a CPU.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import jax

EXIT_STALLED = 75  # EX_TEMPFAIL: try again


class StallWatchdog:
    """Ends the process when its CPU time stops advancing inside ``watch()`` (see module doc).

    Args:
      stall_seconds: how long the CPU time may stand still (<= 0: never arm).
      label: names the run in the message.
      poll_seconds: how often the CPU time is read.
      exit_fn: called with ``EXIT_STALLED`` on a stall (``os._exit``: no Python cleanup can run
        while the main thread is blocked inside XLA).
      platforms: the device platforms; the watchdog arms only when they are all ``"cpu"``.
    """

    def __init__(self, stall_seconds: float, label: str, *, poll_seconds: float = 5.0,
                 exit_fn: Callable[[int], None] = os._exit,
                 platforms: tuple[str, ...] | None = None) -> None:
        platforms = platforms or tuple({d.platform for d in jax.devices()})
        self.armed = stall_seconds > 0 and set(platforms) == {"cpu"}
        self.stall_seconds, self.poll_seconds = stall_seconds, poll_seconds
        self.label, self.exit_fn = label, exit_fn
        self._what: str | None = None
        self._lock = threading.Lock()
        if self.armed:
            threading.Thread(target=self._monitor, name="stall-watchdog", daemon=True).start()

    @contextmanager
    def watch(self, what: str) -> Iterator[None]:
        """Watches the block (a compiled computation and its transfer to the host)."""
        with self._lock:
            self._what = what
        try:
            yield
        finally:
            with self._lock:
                self._what = None

    def _monitor(self) -> None:
        last_cpu, still_since = time.process_time(), time.monotonic()
        while True:
            time.sleep(self.poll_seconds)
            cpu, now = time.process_time(), time.monotonic()
            with self._lock:
                what = self._what
            if what is None or cpu - last_cpu > 0.01 * self.poll_seconds:
                last_cpu, still_since = cpu, now
                continue
            if now - still_since >= self.stall_seconds:
                print(f"{self.label}: {what} used no CPU for {now - still_since:.0f} s: the XLA "
                      "CPU runtime stalled (an intermittent XLA hang). Exiting with status "
                      f"{EXIT_STALLED}; run the same command again to resume from the last "
                      "checkpoint (make sweep/reproduce do so by themselves).",
                      file=sys.stderr, flush=True)
                self.exit_fn(EXIT_STALLED)
                return
