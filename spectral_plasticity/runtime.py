"""Process-wide XLA settings applied by our entry points (the CLI, ``make reproduce``, tests).

``--xla_cpu_multi_thread_eigen=false``: XLA's CPU backend runs its Eigen intra-op thread pool
single-threaded. With the pool on, we saw a vmapped chunk with the new-task Hessian (Lanczos
inside ``lax.scan``) wedge forever here — every thread asleep, no CPU used — and others report
the same with the flag as the fix (PyAutoLabs/PyAutoFit#1528). It affects only the CPU backend;
a user who sets the option in ``XLA_FLAGS`` keeps their value.
"""

from __future__ import annotations

import os

CPU_FLAGS = {"xla_cpu_multi_thread_eigen": "false"}


def configure_xla() -> None:
    """Adds ``CPU_FLAGS`` to ``XLA_FLAGS`` (before JAX starts a backend), keeping the user's."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
