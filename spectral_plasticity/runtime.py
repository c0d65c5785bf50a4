"""Process-wide JAX settings applied by our entry points (the CLI, ``make reproduce``, tests).

With jax 0.10.2 on CPU, a vmapped chunk of the supervised trainer with the new-task Hessian
(Lanczos loops inside the chunk) often never finished here: the host waited on the result while
every XLA worker thread slept, using no CPU. It happened with and without asynchronous dispatch,
XLA's multi-threaded Eigen pool, single-threaded OpenBLAS and the legacy CPU runtime flag, and
only partly with XLA's concurrency-optimized thunk scheduler turned off. What ended it is an
``optimization_barrier`` in the trainer that orders the measurement before and after the
training loop (so the runtime never runs the Lanczos loops concurrently with it): three runs
of the chunk that had hung every time then finished. We keep the scheduler flag off and run CPU
computations without async dispatch as well (cf. jax-ml/jax#25861, openxla/xla#33048 on loops
under the CPU runtime). Both settings concern the CPU backend only; a user's own choice (in
``XLA_FLAGS`` or ``JAX_CPU_ENABLE_ASYNC_DISPATCH``) wins. ``train.watchdog`` stays as the net.
"""

from __future__ import annotations

import os

import jax

CPU_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def configure_runtime() -> None:
    """Applies the settings above; call it before the first computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
