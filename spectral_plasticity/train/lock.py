"""An exclusive lock on a work directory, so that two sweeps never write the same run.

The lock is an advisory ``fcntl.flock`` on ``<directory>/.lock``, held for as long as the sweep
runs. The kernel releases it when its process ends in any way (exit, exception, SIGKILL, a
crash), so the lock of a killed process is never stale: the next sweep simply takes it over.
The file holds the holder's process id, host, command line and start time, which a refused
sweep names. ``flock`` is reliable on local file systems; on NFS it depends on the mount (Linux
emulates it with POSIX locks there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".lock"


class WorkDirBusyError(RuntimeError):
    """Another process holds the lock of the work directory."""


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        return (f"process {info['pid']} on {info['host']} (started "
                f"{info['started']}: {info['command']})")
    except (OSError, ValueError, KeyError):
        return "another process (it has not written its name yet)"


@contextlib.contextmanager
def work_dir_lock(directory: str | os.PathLike[str]) -> Iterator[Path]:
    """Holds the exclusive lock of ``directory`` (created if missing) inside the block.

    Raises:
      WorkDirBusyError: another live process holds it; the message names that process.
    """
    path = Path(directory) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkDirBusyError(
                f"{directory} is in use by {_holder(path)}. Wait for it to finish or stop it, "
                "or choose another WORKDIR; nothing was changed."
            ) from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                  "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock
