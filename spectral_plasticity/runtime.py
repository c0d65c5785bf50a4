"""Process-wide settings applied by our entry points (the CLI, ``make reproduce``, tests).

**The XLA CPU stall.** With jax 0.10.2 on CPU, chunks that measure the new-task Hessian or the
KFAC diagnostics under ``vmap`` sometimes never finished while the process used no CPU. A
vmapped ``jnp.linalg.eigh``/``svd`` runs through jaxlib's CPU LAPACK kernels, whose
``ParallelBatchMap`` schedules the batch's matrices on XLA's intra-op thread pool and blocks the
calling pool thread until they are done. ``gdb`` on stalled chunks showed two ways this hangs
(docs/RELIABILITY.md):

1. each matrix calls scipy's OpenBLAS, itself multi-threaded, from inside XLA's pool: a pool
   thread waited in OpenBLAS's ``exec_blas_async_wait`` (``benchmarks/stress_stall.py
   --lapack`` reproduces it: 50 vmapped svds that did not finish in 90 s take 9 ms each with
   OpenBLAS single-threaded). ``configure_runtime`` therefore runs OpenBLAS single-threaded
   (``threadpoolctl``); XLA already runs the matrices of a batch in parallel.
2. as many concurrent batched LAPACK calls as the pool has threads each block a pool thread on
   work queued behind them (pool starvation): ``spectral_plasticity.linalg`` gives every LAPACK
   call on CPU a single matrix, so none waits on the pool.

XLA's concurrency-optimized scheduler off and CPU computations without asynchronous dispatch
are kept from earlier mitigations (they made the overlap rarer).

**Copies of the weights in every step.** Without region analysis, XLA CPU's copy insertion
keeps a copy of every loop-carried weight matrix in the body of a ``lax.scan`` whose step
updates it in place (the step reads the old weights in the forward and backward passes, then
writes the new ones): a full extra read and write of the weights per step, which at batch 1 is
most of the step. ``xla_cpu_copy_insertion_use_region_analysis`` proves the reads come first and
drops the copies: at batch 1 the trainer ran 1.9x faster on the paper's 3x1000 MLP
(``benchmarks/supervised.py``, docs/SPEED.md), with bit-identical results
(``tests/test_runtime.py``).

Everything concerns the CPU backend only; a user's own choice (``OPENBLAS_NUM_THREADS``,
``XLA_FLAGS``, ``JAX_CPU_ENABLE_ASYNC_DISPATCH``) wins. ``train.watchdog`` stays as the net.
"""

from __future__ import annotations

import os

import jax

CPU_XLA_FLAGS = {"xla_cpu_enable_concurrency_optimized_scheduler": "false",
                 "xla_cpu_copy_insertion_use_region_analysis": "true"}


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
