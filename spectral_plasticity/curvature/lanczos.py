"""The Lanczos algorithm with full reorthogonalization, as one compiled loop, and Ritz pairs.

Given a symmetric operator ``A`` (``matvec``) and a start vector ``v0``, ``m`` Lanczos steps build
an orthonormal basis ``V = [v_1 .. v_m]`` of the Krylov space ``span{v0, A v0, .., A^(m-1) v0}``
and the tridiagonal ``T = V^T A V`` with diagonal ``alpha`` and off-diagonal ``beta``:

    w = A v_j - beta_(j-1) v_(j-1);  alpha_j = <w, v_j>;  w <- w - alpha_j v_j;
    w <- w - V (V^T w)   (repeated once when needed: "twice is enough", Parlett 1980);
    beta_j = ||w||;  v_(j+1) = w / beta_j.

The eigenvalues of ``T`` (Ritz values) approximate the extreme eigenvalues of ``A``; with the
squared first components of ``T``'s eigenvectors as weights they are the nodes of a Gauss
quadrature of the spectral measure of ``A`` seen from ``v0``, which is what stochastic Lanczos
quadrature uses (Golub & Meurant 1997; Ghorbani, Krishnan & Xiao 2019).

**Breakdown.** When the Krylov space is exhausted (an operator of rank smaller than ``m``, or
``v0`` inside a small invariant subspace), ``beta_j`` falls to rounding level. The loop then
stops extending the basis: the remaining steps are masked, their ``alpha`` and ``beta`` are 0 and
``num_valid`` counts the steps taken. The padded part of ``T`` is decoupled from the valid block
and its eigenvectors have no weight on ``e_1``, so ``ritz_pairs`` marks its (zero) Ritz values as
invalid and gives them quadrature weight exactly 0: no NaN, and no spurious eigenvalues.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from spectral_plasticity import linalg

# A step breaks down when beta_j <= BREAKDOWN_FACTOR * sqrt(m) * eps * ||A||, i.e. when the new
# direction is at the level of the rounding error of a reorthogonalized product.
BREAKDOWN_FACTOR = 10.0
# Reorthogonalize a second time when one pass left less than this fraction of the norm.
DGKS_RATIO = 0.7071


class LanczosResult(NamedTuple):
    """Output of ``lanczos``.

    Attributes:
      alphas: ``(m,)`` diagonal of T (0 after a breakdown).
      betas: ``(m - 1,)`` off-diagonal of T (0 after a breakdown).
      num_valid: number of steps taken before a breakdown (``m`` if none).
      basis: ``(m, n)`` Lanczos vectors as rows (zero rows after a breakdown), or None.
    """

    alphas: jax.Array
    betas: jax.Array
    num_valid: jax.Array
    basis: jax.Array | None


class RitzPairs(NamedTuple):
    """Eigen-decomposition of the Lanczos tridiagonal.

    Attributes:
      values: ``(m,)`` Ritz values, ascending (invalid ones included, see ``valid``).
      weights: ``(m,)`` squared first components of T's eigenvectors (sum to 1; 0 if invalid).
      valid: ``(m,)`` True for Ritz values of the valid Krylov block.
      vectors: ``(m, m)`` eigenvectors of T as columns (in Lanczos-basis coordinates).
    """

    values: jax.Array
    weights: jax.Array
    valid: jax.Array
    vectors: jax.Array


def lanczos(matvec: Callable[[jax.Array], jax.Array], v0: jax.Array, num_iters: int, *,
            return_basis: bool = False) -> LanczosResult:
    """Runs ``num_iters`` Lanczos steps with full reorthogonalization (one ``lax.fori_loop``).

    Args:
      matvec: ``(n,) -> (n,)`` product with a symmetric matrix.
      v0: ``(n,)`` start vector (normalized here; must be nonzero).
      num_iters: number of steps ``m``, at most ``n``.
      return_basis: also return the ``(m, n)`` basis.

    Returns:
      A ``LanczosResult``. Memory: the ``(m, n)`` basis is kept either way (full
      reorthogonalization needs it).
    """
    if jnp.ndim(v0) != 1:
        raise ValueError(f"v0 must be a flat vector, got shape {jnp.shape(v0)}; flatten a "
                         "pytree with CurvatureOperator.ravel or jax.flatten_util.ravel_pytree")
    n = v0.shape[0]
    if not 1 <= num_iters <= n:
        raise ValueError(f"num_iters must be between 1 and the dimension {n}, got {num_iters}")
    dtype = v0.dtype
    eps = jnp.finfo(dtype).eps
    v0 = v0 / jnp.linalg.norm(v0)

    # One spare row and one spare beta, so every step writes at j + 1 / j unconditionally.
    def step(j, carry):
        basis, alphas, betas, valid, anorm = carry
        v = basis[j]
        w = matvec(v).astype(dtype)
        beta_prev = jnp.where(j > 0, betas[j - 1], 0.0)
        w = w - beta_prev * basis[j - 1]
        alpha = jnp.vdot(w, v)
        w = w - alpha * v
        # Classical Gram-Schmidt against the whole basis; a second pass only when the first
        # removed most of w (the DGKS criterion, Daniel et al. 1976), i.e. when orthogonality
        # was actually being lost. Each pass reads the (m, n) basis twice: memory traffic, not
        # arithmetic, bounds its cost. ``(V w) V`` keeps both products row-major (``V.T @ c``
        # makes XLA transpose the basis every step: about 2x slower at 2.8M parameters).
        def project_out(w):
            w = w - (basis @ w) @ basis
            return w, jnp.linalg.norm(w)

        norm_before = jnp.linalg.norm(w)
        w, beta = project_out(w)
        w, beta = jax.lax.cond(beta < DGKS_RATIO * norm_before, project_out,
                               lambda w: (w, beta), w)
        anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta + beta_prev)
        # Breakdown: the new direction is rounding noise relative to ||A||.
        keep_going = valid & (beta > BREAKDOWN_FACTOR * num_iters ** 0.5 * eps * anorm)
        alphas = alphas.at[j].set(jnp.where(valid, alpha, 0.0))
        betas = betas.at[j].set(jnp.where(keep_going, beta, 0.0))
        basis = basis.at[j + 1].set(jnp.where(keep_going, w / jnp.where(keep_going, beta, 1.0),
                                              0.0))
        return basis, alphas, betas, keep_going, anorm

    basis = jnp.zeros((num_iters + 1, n), dtype).at[0].set(v0)
    init = (basis, jnp.zeros((num_iters,), dtype), jnp.zeros((num_iters,), dtype),
            jnp.array(True), jnp.zeros((), dtype))
    basis, alphas, betas, _, _ = jax.lax.fori_loop(0, num_iters, step, init)
    basis, betas = basis[:num_iters], betas[: num_iters - 1]
    num_valid = 1 + jnp.sum(betas > 0)
    return LanczosResult(alphas, betas, num_valid, basis if return_basis else None)


def tridiagonal(result: LanczosResult) -> jax.Array:
    """The ``(m, m)`` tridiagonal matrix T of a Lanczos run."""
    return (jnp.diag(result.alphas) + jnp.diag(result.betas, 1) + jnp.diag(result.betas, -1))


def ritz_pairs(result: LanczosResult) -> RitzPairs:
    """Ritz values, quadrature weights and validity of a Lanczos run."""
    values, vectors = linalg.eigh(tridiagonal(result))
    m = result.alphas.shape[0]
    in_valid_block = jnp.arange(m) < result.num_valid
    mass = jnp.sum(jnp.where(in_valid_block[:, None], vectors ** 2, 0.0), axis=0)
    valid = mass > 0.5
    weights = jnp.where(valid, vectors[0] ** 2, 0.0)
    weights = weights / jnp.sum(weights)
    return RitzPairs(values=values, weights=weights, valid=valid, vectors=vectors)
