"""Process-wide JAX settings applied by our entry points (the CLI, ``make reproduce``, tests).

CPU computations run inline, without asynchronous dispatch (``jax_cpu_enable_async_dispatch``
off). With it on, a vmapped chunk of the supervised trainer with the new-task Hessian (Lanczos
``fori_loop``s inside ``lax.scan``) occasionally never finished here: the host waited on a result
while every XLA worker thread slept, using no CPU (seen with jax 0.10.2 both with and without
XLA's multi-threaded Eigen pool; cf. jax-ml/jax#25861 and openxla/xla#33048, both about loops
under CPU async dispatch). Our runners block on every chunk's results anyway, so nothing is lost.
The setting only concerns the CPU backend; a user's ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` wins.
"""

from __future__ import annotations

import os

import jax


def configure_runtime() -> None:
    """Turns off CPU async dispatch (see the module docstring) unless the user chose."""
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)
