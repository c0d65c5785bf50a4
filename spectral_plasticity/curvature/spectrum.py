"""Spectral quantities of a curvature operator: top eigenpairs, density, trace, ranks.

Every function takes ``curvature``: either a ``CurvatureOperator`` (e.g. from
``dataset_operator`` for a data-averaged, chunked Hessian or GGN, possibly restricted to some
layers) or a scalar ``loss_fn(params)``, in which case ``params`` is required and the operator is
its Hessian (``hessian_operator``, optionally restricted with ``layers``).

- ``top_eigenvalues``: Lanczos + Ritz pairs (Lanczos 1950; Parlett 1980).
- ``spectral_density``: stochastic Lanczos quadrature, SLQ (Golub & Meurant 1997; Ghorbani,
  Krishnan & Xiao 2019): ``phi(t) ~ mean_probes sum_i w_i N(t; theta_i, sigma^2)`` with Ritz
  values ``theta_i`` and weights ``w_i``; smoothing ``sigma^2 = 1e-5 max(1, width)`` on a
  10,000-point grid spanning the Ritz values +- 0.01, normalized to integrate to 1 (the seed
  authors' settings).
- ``hessian_trace``: Hutchinson's estimator ``tr(H) ~ mean_k z_k^T H z_k`` with Rademacher
  ``z_k`` (Hutchinson 1989), with its standard error.
- ``epsilon_rank``: the count ``#{i : |lambda_i| > eps}`` from eigenvalues, or the paper's
  fraction of spectral-density mass outside ``[-eps, eps]`` (He et al. 2025, Def. 1).
- ``fast_threshold`` and ``tau_trainability``: gradient descent with step ``eta`` shrinks the
  error along an eigendirection of eigenvalue ``lambda`` by ``(1 - eta lambda)`` per step, so
  within ``K`` steps by at least the factor ``gamma`` iff ``lambda >= (1 - gamma^(1/K)) / eta``.
  ``tau_trainability`` is the fraction of the new task's gradient (squared norm) in the span of
  those fast directions — the paper's necessary condition for learning within a budget.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity.curvature.lanczos import lanczos, ritz_pairs
from spectral_plasticity.curvature.operators import (
    CurvatureOperator,
    LayerSelection,
    hessian_operator,
    partition,
    selection_mask,
)

PyTree = Any
Curvature = CurvatureOperator | Callable[[PyTree], jax.Array]


class SpectralDensity(NamedTuple):
    """A smoothed spectral density estimate (SLQ).

    Attributes:
      grid: ``(grid_size,)`` eigenvalue grid.
      density: ``(grid_size,)`` density on the grid; integrates to 1 (trapezoid rule).
      nodes: ``(num_probes, num_iters)`` Ritz values per probe.
      weights: ``(num_probes, num_iters)`` quadrature weights per probe (each row sums to 1; 0
        for Ritz values of a broken-down Lanczos run).
      variance: the Gaussian kernel's variance ``sigma^2``.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    variance: jax.Array


def as_operator(curvature: Curvature, params: PyTree | None = None,
                layers: LayerSelection = None) -> CurvatureOperator:
    """``curvature`` itself, or the Hessian operator of the loss function ``curvature``."""
    if isinstance(curvature, CurvatureOperator):
        if layers is not None:
            raise ValueError("layers applies to a loss_fn; restrict an operator when building it")
        return curvature
    if not callable(curvature):
        raise TypeError(f"curvature must be a CurvatureOperator or a loss_fn, got {curvature!r}")
    if params is None:
        raise ValueError("params is required when curvature is a loss function")
    return hessian_operator(curvature, params, layers=layers)


def _probe(key: jax.Array, op: CurvatureOperator, dtype: Any) -> jax.Array:
    return jax.random.normal(key, (op.dim,), dtype)


def _dtype(op: CurvatureOperator) -> Any:
    leaves = jax.tree.leaves(op.params)
    return jnp.result_type(*leaves) if leaves else jnp.float32


def top_eigenvalues(curvature: Curvature, params: PyTree | None = None, k: int = 1, *,
                    key: jax.Array, num_iters: int = 100, by_magnitude: bool = False,
                    layers: LayerSelection = None) -> tuple[jax.Array, PyTree]:
    """The ``k`` largest eigenvalues of the curvature and their eigenvectors.

    Args:
      curvature: a ``CurvatureOperator`` or ``loss_fn(params) -> scalar``.
      params: the point (needed with a loss function).
      k: how many eigenpairs.
      key: PRNG key for the Lanczos start vector.
      num_iters: Lanczos steps (capped at the dimension); at least ``k``.
      by_magnitude: rank by ``|lambda|`` instead of ``lambda``.
      layers: restrict a loss function's Hessian to these layers.

    Returns:
      ``(eigenvalues, eigenvectors)``: eigenvalues ``(k,)`` sorted descending (by value, or by
      magnitude), eigenvectors a pytree like the (selected) params with a leading axis ``k``.
    """
    op = as_operator(curvature, params, layers)
    num_iters = min(num_iters, op.dim)
    if not 1 <= k <= num_iters:
        raise ValueError(f"k must be between 1 and num_iters={num_iters} (capped at the "
                         f"dimension {op.dim}), got {k}")
    result = lanczos(op.matvec, _probe(key, op, _dtype(op)), num_iters, return_basis=True)
    ritz = ritz_pairs(result)
    score = jnp.abs(ritz.values) if by_magnitude else ritz.values
    order = jnp.argsort(jnp.where(ritz.valid, -score, jnp.inf))[:k]
    values = ritz.values[order]
    vectors = (result.basis.T @ ritz.vectors[:, order]).T
    return values, jax.vmap(op.unravel)(vectors)


def _smooth(nodes: jax.Array, weights: jax.Array, grid_size: int,
            sigma_squared: float | None, grid_expand: float
            ) -> tuple[jax.Array, jax.Array, jax.Array]:
    valid = weights > 0
    lo = jnp.min(jnp.where(valid, nodes, jnp.inf)) - grid_expand
    hi = jnp.max(jnp.where(valid, nodes, -jnp.inf)) + grid_expand
    grid = jnp.linspace(lo, hi, grid_size)
    variance = (1e-5 if sigma_squared is None else sigma_squared) * jnp.maximum(1.0, hi - lo)

    def one_probe(theta, w):
        z = (grid[:, None] - theta[None, :]) ** 2 / (2.0 * variance)
        return jnp.exp(-z) @ w / jnp.sqrt(2.0 * jnp.pi * variance)

    density = jnp.mean(jax.vmap(one_probe)(nodes, weights), axis=0)
    density = density / jnp.trapezoid(density, grid)
    return grid, density, variance


def spectral_density(curvature: Curvature, params: PyTree | None = None, *, key: jax.Array,
                     num_iters: int = 100, num_probes: int = 1, grid_size: int = 10_000,
                     sigma_squared: float | None = None, grid_expand: float = 1e-2,
                     layers: LayerSelection = None) -> SpectralDensity:
    """Spectral density of the curvature by stochastic Lanczos quadrature (probes vmapped).

    Args:
      curvature, params, layers: as in ``top_eigenvalues``.
      key: PRNG key for the Gaussian probe vectors.
      num_iters: Lanczos steps per probe (capped at the dimension).
      num_probes: independent probes (the density is their average).
      grid_size: grid points.
      sigma_squared: Gaussian kernel variance relative to ``max(1, width)``; default 1e-5.
      grid_expand: margin added on both sides of the Ritz values.
    """
    op = as_operator(curvature, params, layers)
    if num_probes < 1 or grid_size < 2:
        raise ValueError(f"num_probes must be >= 1 and grid_size >= 2, got {num_probes}, "
                         f"{grid_size}")
    num_iters = min(num_iters, op.dim)
    dtype = _dtype(op)

    def one(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        ritz = ritz_pairs(lanczos(op.matvec, _probe(probe_key, op, dtype), num_iters))
        return ritz.values, ritz.weights

    nodes, weights = jax.vmap(one)(jax.random.split(key, num_probes))
    grid, density, variance = _smooth(nodes, weights, grid_size, sigma_squared, grid_expand)
    return SpectralDensity(grid=grid, density=density, nodes=nodes, weights=weights,
                           variance=variance)


def hessian_trace(curvature: Curvature, params: PyTree | None = None, *, key: jax.Array,
                  num_samples: int = 100, batch_size: int | None = None,
                  layers: LayerSelection = None) -> tuple[jax.Array, jax.Array]:
    """Hutchinson estimate of the trace with Rademacher probes, and its standard error.

    Args:
      curvature, params, layers: as in ``top_eigenvalues``.
      key: PRNG key for the probes.
      num_samples: probes.
      batch_size: probes evaluated at once (vmapped); default all.

    Returns:
      ``(trace_estimate, standard_error)`` with the standard error ``std(z^T H z) / sqrt(K)``.
    """
    op = as_operator(curvature, params, layers)
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}")
    probes = jax.random.rademacher(key, (num_samples, op.dim), _dtype(op))
    quad = jax.lax.map(lambda z: jnp.vdot(z, op.matvec(z)), probes,
                       batch_size=batch_size or num_samples)
    return jnp.mean(quad), jnp.std(quad, ddof=1) / jnp.sqrt(num_samples)


def epsilon_rank(spectrum: SpectralDensity | jax.Array, eps: float) -> jax.Array:
    """Epsilon-rank: how much of the spectrum lies outside ``[-eps, eps]``.

    Args:
      spectrum: eigenvalues (any shape): the **count** ``#{|lambda| > eps}`` is returned; or a
        ``SpectralDensity``: the paper's **fraction** of the smoothed density's mass outside
        ``[-eps, eps]``, in ``[0, 1]``. The mass is integrated in closed form (each Ritz node
        is a Gaussian of the density's variance), so it does not depend on the grid's
        resolution: ``mean_probes sum_i w_i [Phi((-eps - theta_i)/sigma) +
        1 - Phi((eps - theta_i)/sigma)]``.
      eps: the threshold (the paper uses 0.01-0.08 depending on the benchmark).
    """
    if isinstance(eps, int | float) and eps < 0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    if isinstance(spectrum, SpectralDensity):
        sigma = jnp.sqrt(spectrum.variance)
        outside = (jax.scipy.stats.norm.cdf((-eps - spectrum.nodes) / sigma)
                   + jax.scipy.stats.norm.sf((eps - spectrum.nodes) / sigma))
        return jnp.mean(jnp.sum(spectrum.weights * outside, axis=-1))
    return jnp.sum(jnp.abs(jnp.asarray(spectrum)) > eps)


def fast_threshold(learning_rate: float | jax.Array, steps: int | jax.Array,
                   gamma: float | jax.Array) -> jax.Array:
    """``(1 - gamma^(1/K)) / eta``: eigenvalues above it shrink the error by ``gamma`` in K steps.

    Args:
      learning_rate: step size ``eta`` > 0.
      steps: budget ``K`` >= 1.
      gamma: target residual factor in ``(0, 1)``.
    """
    if isinstance(learning_rate, float | int) and learning_rate <= 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")
    if isinstance(steps, int) and steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if isinstance(gamma, float | int) and not 0 < gamma < 1:
        raise ValueError(f"gamma must lie in (0, 1), got {gamma}")
    # 1 - gamma^(1/K) = -expm1(log(gamma) / K), without cancellation for large K.
    return -jnp.expm1(jnp.log(gamma) / steps) / learning_rate


def tau_trainability(curvature: Curvature, params: PyTree | None = None, *,
                     gradient: PyTree | None = None, learning_rate: float, steps: int,
                     gamma: float = 0.5, num_iters: int = 100,
                     layers: LayerSelection = None) -> tuple[jax.Array, jax.Array]:
    """Fraction of the gradient's squared norm in the fast eigen-subspace, and the threshold.

    Lanczos is started from the gradient ``g``, so the Ritz weights are the squared components
    of ``g / ||g||`` along the Ritz vectors; the fraction is the total weight of Ritz values
    above ``fast_threshold(learning_rate, steps, gamma)`` (exact when the Krylov space of ``g``
    is exhausted, i.e. ``num_iters`` reaches its dimension).

    Args:
      curvature, params, layers: as in ``top_eigenvalues``.
      gradient: the new task's gradient (a pytree like the selected params); computed from the
        loss function when omitted.
      learning_rate, steps, gamma: as in ``fast_threshold``.
      num_iters: Lanczos steps (capped at the dimension).

    Returns:
      ``(fraction, threshold)``.
    """
    op = as_operator(curvature, params, layers)
    if gradient is None:
        if isinstance(curvature, CurvatureOperator):
            raise ValueError("pass gradient= when curvature is a CurvatureOperator")
        full_gradient = jax.grad(curvature)(params)
        gradient = partition(full_gradient, selection_mask(params, layers))[0]
    g = op.ravel(gradient)
    chex.assert_shape(g, (op.dim,))
    threshold = fast_threshold(learning_rate, steps, gamma)
    ritz = ritz_pairs(lanczos(op.matvec, g, min(num_iters, op.dim)))
    fraction = jnp.sum(jnp.where(ritz.valid & (ritz.values >= threshold), ritz.weights, 0.0))
    return fraction, threshold

