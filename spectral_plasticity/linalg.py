"""Eigendecompositions, SVDs and QR decompositions that run one matrix at a time on CPU.

Under ``vmap`` (the sweep runner's runs, stacked layers) ``jnp.linalg.eigh``/``svd`` become one
batched LAPACK call. On CPU jaxlib runs the batch's matrices on XLA's intra-op thread pool and
blocks the calling pool thread until they finish; when as many such calls run at once as the
pool has threads, every pool thread waits for work queued behind it and the program never ends
(the XLA CPU stall, docs/RELIABILITY.md). These functions map over any batch axes with
``lax.map`` on CPU, so each LAPACK call sees one matrix and runs inline; on other platforms
they are the batched ``jnp.linalg`` calls. Each matrix's result is that of ``jnp.linalg``.

``jax.custom_batching.custom_vmap`` keeps the per-matrix calls under ``vmap``; it has no
reverse-mode rule, so the derivatives are given with ``jax.custom_jvp``: for eigenvalues
``d lambda_i = v_i^T sym(dA) v_i``, for singular values ``d sigma_i = u_i^T dA v_i`` (distinct
values), computed as ``jax.lax.linalg``'s JVP rules compute them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _per_matrix(fn: Callable[[jax.Array], Any], core_ndim: int = 2) -> Callable[[jax.Array], Any]:
    """``fn`` of one matrix, applied over leading axes (and ``vmap`` axes) one at a time on CPU."""

    def mapped(x: jax.Array) -> Any:
        batch = x.shape[:-core_ndim]
        if not batch:
            return fn(x)

        def sequential(x: jax.Array) -> Any:
            flat = lax.map(wrapped, x.reshape(-1, *x.shape[-core_ndim:]))
            return jax.tree.map(lambda y: y.reshape(*batch, *y.shape[1:]), flat)

        return lax.platform_dependent(x, cpu=sequential, default=fn)

    @jax.custom_batching.custom_vmap
    def wrapped(x: jax.Array) -> Any:
        return mapped(x)

    @wrapped.def_vmap
    def rule(axis_size: int, in_batched: list[bool], x: jax.Array) -> tuple[Any, Any]:
        del axis_size
        out = mapped(x) if in_batched[0] else wrapped(x)
        return out, jax.tree.map(lambda _: in_batched[0], out)

    return wrapped


_eigh = _per_matrix(jnp.linalg.eigh)
_eigvalsh = _per_matrix(jnp.linalg.eigvalsh)
_svd = _per_matrix(lambda x: jnp.linalg.svd(x, full_matrices=False))
_svdvals = _per_matrix(lambda x: jnp.linalg.svd(x, compute_uv=False))
_qr = _per_matrix(jnp.linalg.qr)


def svd(a: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``jnp.linalg.svd(a, full_matrices=False)``: ``(U, sigma, V^T)``, sigma descending (no
    derivative: callers differentiate in closed form)."""
    return _svd(a)


def qr(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.qr(a)`` (reduced): ``(Q, R)`` (no derivative)."""
    return _qr(a)


def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``jnp.linalg.eigh(a)``: ascending eigenvalues, eigenvectors as columns (no derivative)."""
    return _eigh(a)


@jax.custom_jvp
def eigvalsh(a: jax.Array) -> jax.Array:
    """``jnp.linalg.eigvalsh(a)``: ascending eigenvalues of symmetric ``a`` (``(..., n, n)``)."""
    return _eigvalsh(a)


@eigvalsh.defjvp
def _eigvalsh_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
    (a,), (da,) = primals, tangents
    values, vectors = _eigh(a)
    da = (da + jnp.swapaxes(da, -1, -2)) / 2  # eigvalsh reads the symmetrized input
    vdag_da_v = jnp.matmul(jnp.matmul(jnp.swapaxes(vectors, -1, -2), da,
                                      precision=lax.Precision.HIGHEST),
                           vectors, precision=lax.Precision.HIGHEST)
    return values, jnp.diagonal(vdag_da_v, axis1=-2, axis2=-1)


@jax.custom_jvp
def svdvals(a: jax.Array) -> jax.Array:
    """``jnp.linalg.svd(a, compute_uv=False)``: descending singular values (``(..., m, n)``)."""
    return _svdvals(a)


@svdvals.defjvp
def _svdvals_jvp(primals: tuple[jax.Array], tangents: tuple[jax.Array]
                 ) -> tuple[jax.Array, jax.Array]:
    (a,), (da,) = primals, tangents
    u, s, vt = _svd(a)
    ds = jnp.swapaxes(u, -1, -2) @ da @ jnp.swapaxes(vt, -1, -2)
    return s, jnp.diagonal(ds, axis1=-2, axis2=-1)
