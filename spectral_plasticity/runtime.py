"""Process-wide settings applied by our entry points (the CLI, ``make reproduce``, tests).

**The XLA CPU stall, and its cause.** With jax 0.10.2 on CPU, chunks that measure the new-task
Hessian or the KFAC diagnostics under ``vmap`` stopped for good: the host waited on the result
and the process used (almost) no CPU. ``gdb`` on a stalled chunk shows why: a batched LAPACK
call (``jnp.linalg.svd``/``eigh`` under ``vmap``) runs its batch items concurrently on XLA's
intra-op thread pool (jaxlib's ``ParallelBatchMap``), and every item calls scipy's OpenBLAS
(jaxlib's CPU LAPACK), which is itself multi-threaded: one XLA worker sat in OpenBLAS'
``exec_blas_async_wait`` for work that OpenBLAS' own server threads never picked up, while the
other worker waited on the batch. OpenBLAS' pthreads build is documented not to be used
multi-threaded from several threads at once ("If your application is already multi-threaded,
it will conflict with OpenBLAS multi-threading", OpenBLAS FAQ); nested in XLA's pool it
oversubscribes the cores and can deadlock. ``benchmarks/stress_stall.py --lapack`` reproduces
it in a few lines (a vmapped ``svd`` in a loop). XLA already parallelizes across batch items,
so we run OpenBLAS single-threaded (``threadpoolctl``), which ends it: see
docs/RELIABILITY.md for the stress runs. Earlier mitigations (XLA's concurrency-optimized
scheduler off, CPU computations without asynchronous dispatch) only made the overlap rarer;
they are kept as they cost nothing measurable here. Everything concerns the CPU backend only;
a user's own choice (``OPENBLAS_NUM_THREADS``, ``XLA_FLAGS``, ``JAX_CPU_ENABLE_ASYNC_DISPATCH``)
wins. ``train.watchdog`` stays as the net.
"""

from __future__ import annotations

import os

import jax

CPU_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def single_threaded_blas() -> None:
    """Limits the BLAS that jax's CPU LAPACK kernels call (scipy's OpenBLAS) to one thread."""
    import scipy.linalg  # noqa: F401  loads scipy's OpenBLAS, which jaxlib's LAPACK calls
    import threadpoolctl

    threadpoolctl.threadpool_limits(1, user_api="blas")


def configure_runtime() -> None:
    """Applies the settings above; call it before the first computation."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
    if "OPENBLAS_NUM_THREADS" not in os.environ:
        single_threaded_blas()
