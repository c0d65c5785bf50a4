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
- ``epsilon_rank``: the paper's fraction of eigenvalues with ``|lambda| > eps`` (He et al.
  2025, Def. 1), estimated from the quadrature's nodes and weights; ``epsilon_rank_bounds``
  adds certain Chebyshev-Markov-Stieltjes bounds and the probes' standard error;
  ``smoothed_epsilon_rank`` is the paper code's kernel-smoothed measure, with its kernel's tail;
  ``epsilon_count`` counts ``#{i : |lambda_i| > eps}`` in an array of eigenvalues;
  ``epsilon_rank_record`` gives every column a trainer records (docs/MEASURING.md).
- ``fast_threshold`` and ``tau_trainability``: gradient descent with step ``eta`` shrinks the
  error along an eigendirection of eigenvalue ``lambda`` by ``(1 - eta lambda)`` per step, so
  within ``K`` steps by at least the factor ``gamma`` iff ``lambda >= (1 - gamma^(1/K)) / eta``.
  ``tau_trainability`` is the fraction of the new task's gradient (squared norm) in the span of
  those fast directions — the paper's necessary condition for learning within a budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity import linalg
from spectral_plasticity.curvature.lanczos import LanczosResult, lanczos, ritz_pairs, tridiagonal
from spectral_plasticity.curvature.operators import (
    CurvatureOperator,
    LayerSelection,
    hessian_operator,
    partition,
    selection_mask,
)

PyTree = Any
Curvature = CurvatureOperator | Callable[[PyTree], jax.Array]
# Gauss-Radau: the largest move of the last diagonal entry, relative to ||T||, that eigh still
# resolves to a node at t within ~1e-5 ||T|| in float32; beyond it the Gauss-node bounds serve.
RADAU_SHIFT_LIMIT = 100.0


class SpectralDensity(NamedTuple):
    """A smoothed spectral density estimate (SLQ).

    Attributes:
      grid: ``(grid_size,)`` eigenvalue grid.
      density: ``(grid_size,)`` density on the grid; integrates to 1 (trapezoid rule).
      nodes: ``(num_probes, num_iters)`` Ritz values per probe.
      weights: ``(num_probes, num_iters)`` quadrature weights per probe (each row sums to 1; 0
        for Ritz values of a broken-down Lanczos run).
      variance: the Gaussian kernel's variance ``sigma^2``.
      dim: the operator's dimension ``n`` (its number of eigenvalues), which sets the probes'
        variance (``FractionBounds``); ``None`` when unknown.
    """

    grid: jax.Array
    density: jax.Array
    nodes: jax.Array
    weights: jax.Array
    variance: jax.Array
    dim: int | jax.Array | None = None


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
                           variance=variance, dim=op.dim)


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


# --------------------------------------------------------------------------------------------
# Epsilon-rank: the fraction of the spectrum outside [-eps, eps]


class FractionBounds(NamedTuple):
    """A fraction of the spectrum estimated by Gauss quadrature, with its bounds and error.

    Attributes:
      estimate: mean over probes of the quadrature's mass in the set (its expectation over
        probes is the fraction of eigenvalues in the set, up to the quadrature error).
      lower, upper: mean over probes of bounds that are certain for each probe's spectral
        measure (Chebyshev-Markov-Stieltjes): they cover the quadrature error, not the
        variance over probes.
      standard_error: the standard error of the mean over probes of each probe's mass in the
        set. With the operator's dimension ``n`` known it is exact for Gaussian probes: a
        probe's weights on the ``n`` eigenvectors are Dirichlet(1/2, ..., 1/2), so its mass on
        a fraction ``p`` of them is Beta(n p / 2, n (1 - p) / 2), of variance
        ``2 p (1 - p) / (n + 2)``; for the unknown ``p``, ``p (1 - p)`` is taken at its
        largest over ``[lower, upper]`` (the point nearest 1/2). Without ``n``: the sample
        standard deviation over the probes (at least 2) divided by ``sqrt(num_probes)``.
    """

    estimate: jax.Array
    lower: jax.Array
    upper: jax.Array
    standard_error: jax.Array

    def interval(self, z: float = 2.0) -> tuple[jax.Array, jax.Array]:
        """``[lower - z se, upper + z se]`` clipped to ``[0, 1]``: covers the quadrature error
        with certainty and the probe variance at the normal level of ``z`` (2: about 95%)."""
        return (jnp.clip(self.lower - z * self.standard_error, 0.0, 1.0),
                jnp.clip(self.upper + z * self.standard_error, 0.0, 1.0))


def _check_threshold(value: float | jax.Array, name: str) -> None:
    """A concrete threshold must be a non-negative, non-NaN scalar (traced ones pass)."""
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")
    if isinstance(value, jax.core.Tracer):
        return
    number = float(value)
    if math.isnan(number) or number < 0:
        raise ValueError(f"{name} must be non-negative, got {number}")


def _quadrature(spectrum: Any, caller: str) -> tuple[jax.Array, jax.Array]:
    """The ``(num_probes, num_iters)`` Ritz nodes and weights of a ``SpectralDensity``."""
    if not isinstance(spectrum, SpectralDensity):
        raise TypeError(f"{caller} needs a SpectralDensity (from spectral_density), got "
                        f"{type(spectrum).__name__}; count eigenvalues with epsilon_count")
    nodes, weights = spectrum.nodes, spectrum.weights
    if nodes is None or weights is None or jnp.size(nodes) == 0:
        raise ValueError(f"{caller} needs the density's quadrature nodes and weights (Ritz "
                         "values and weights, as spectral_density returns them); this density "
                         "has none (a grid-only density?)")
    if jnp.ndim(nodes) != 2 or jnp.shape(nodes) != jnp.shape(weights):
        raise ValueError(f"nodes and weights must both have shape (num_probes, num_iters), got "
                         f"{jnp.shape(nodes)} and {jnp.shape(weights)}")
    return jnp.asarray(nodes), jnp.asarray(weights)


def _gauss_cdf_bounds(theta: jax.Array, w: jax.Array, t: jax.Array
                      ) -> tuple[jax.Array, jax.Array]:
    """CMS at the Gauss nodes: for ``theta_k <= t < theta_(k+1)`` (sorted, positive weights),
    ``sum_(j<k) w_j <= F(t - 0) <= F(t + 0) <= sum_(j<=k+1) w_j`` (Szego 1975, Thm 3.41.1)."""
    order = jnp.argsort(jnp.where(w > 0, theta, jnp.inf))
    theta, cumulative = theta[order], jnp.cumsum(w[order])
    k = jnp.sum((theta <= t) & (w[order] > 0)) - 1
    m = theta.shape[0]
    lower = jnp.where(k >= 1, cumulative[jnp.maximum(k - 1, 0)], 0.0)
    upper = cumulative[jnp.clip(k + 1, 0, m - 1)]
    return lower, upper


def _radau_cdf_bounds(jacobi: LanczosResult, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CMS at an arbitrary point ``t``: the Gauss-Radau rule with a node at ``t`` (the Jacobi
    matrix with its last valid diagonal entry moved so that ``t`` is an eigenvalue; Golub 1973)
    gives ``sum_(s_j < t) w_j <= F(t - 0) <= F(t + 0) <= sum_(s_j <= t) w_j``; its weight at
    ``t`` is the Christoffel function, the most mass any measure with these moments can put
    there. Returns (0, 1) where the moved entry would be so large that ``eigh`` could not place
    the node at ``t`` (t within rounding of an eigenvalue of the leading block)."""
    a, b = jacobi.alphas, jacobi.betas
    last = jacobi.num_valid - 1
    tiny = jnp.finfo(a.dtype).tiny ** 0.5

    def pivot(d, ab):  # LDL^T pivots of T - t I (a Sturm sequence)
        d = ab[0] - t - ab[1] ** 2 / d
        d = jnp.where(jnp.abs(d) < tiny, tiny, d)
        return d, d

    _, pivots = jax.lax.scan(pivot, jnp.ones((), a.dtype),
                             (a, jnp.concatenate([jnp.zeros((1,), a.dtype), b])))
    previous = jnp.maximum(last - 1, 0)
    shift = jnp.where(last >= 1, b[previous] ** 2 / pivots[previous], 0.0)
    scale = jnp.max(jnp.abs(a)) + 2 * jnp.max(jnp.abs(b), initial=0.0) + jnp.abs(t)
    usable = jnp.abs(shift) <= RADAU_SHIFT_LIMIT * scale
    radau = jacobi._replace(alphas=a.at[last].set(t + jnp.where(usable, shift, 0.0)))
    nodes, vectors = linalg.eigh(tridiagonal(radau))
    weights = vectors[0] ** 2
    tolerance = 16 * jnp.finfo(a.dtype).eps * (scale + jnp.abs(shift))
    lower = jnp.sum(jnp.where(nodes < t - tolerance, weights, 0.0))
    upper = jnp.sum(jnp.where(nodes <= t + tolerance, weights, 0.0))
    return jnp.where(usable, lower, 0.0), jnp.where(usable, upper, 1.0)


def _cdf_bounds(nodes: jax.Array, weights: jax.Array, points: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """``(lower, upper)``, each ``(num_probes, len(points))``: certain bounds
    ``lower <= F(t - 0) <= F(t + 0) <= upper`` on each probe's spectral distribution function F.

    The Jacobi matrix is rebuilt from the Gauss rule (Lanczos on ``diag(nodes)`` from
    ``sqrt(weights)``). A probe with a zero weight had its Lanczos run break down: its Krylov
    space was exhausted, so its measure *is* the quadrature and the bounds are exact.
    """

    def one_probe(theta, w):
        jacobi = lanczos(lambda x: theta * x, jnp.sqrt(w), theta.shape[0])

        def at(t):
            radau_lo, radau_hi = _radau_cdf_bounds(jacobi, t)
            gauss_lo, gauss_hi = _gauss_cdf_bounds(theta, w, t)
            exact_lo = jnp.sum(jnp.where(theta < t, w, 0.0))
            exact_hi = jnp.sum(jnp.where(theta <= t, w, 0.0))
            broke = jnp.any(w == 0)
            return (jnp.where(broke, exact_lo, jnp.maximum(radau_lo, gauss_lo)),
                    jnp.where(broke, exact_hi, jnp.minimum(radau_hi, gauss_hi)))

        return jax.vmap(at)(points)

    return jax.vmap(one_probe)(nodes, weights)


def _check_bounds_input(nodes: jax.Array, dim: int | jax.Array | None, caller: str) -> None:
    num_probes, num_nodes = nodes.shape
    if num_nodes < 2:
        raise ValueError(f"{caller} needs at least 2 Ritz nodes per probe (num_iters >= 2); one "
                         "node bounds nothing")
    if num_probes < 2 and dim is None:
        raise ValueError(f"{caller}: the standard error of a single probe needs the operator's "
                         "dimension (SpectralDensity.dim, which spectral_density sets); without "
                         "it, at least 2 probes are needed (num_probes >= 2)")


def _fraction(per_probe: jax.Array, lower: jax.Array, upper: jax.Array,
              dim: int | jax.Array | None) -> FractionBounds:
    num_probes = per_probe.shape[0]
    lower = jnp.mean(jnp.clip(lower, 0.0, 1.0))
    upper = jnp.mean(jnp.clip(upper, 0.0, 1.0))
    if dim is None:
        standard_error = jnp.std(per_probe, ddof=1) / jnp.sqrt(num_probes)
    else:
        p = jnp.clip(0.5, lower, upper)
        standard_error = jnp.sqrt(2.0 * p * (1.0 - p) / (jnp.asarray(dim, per_probe.dtype) + 2.0)
                                  / num_probes)
    return FractionBounds(estimate=jnp.mean(per_probe), lower=lower, upper=upper,
                          standard_error=standard_error)


def epsilon_rank(density: SpectralDensity, eps: float | jax.Array) -> jax.Array:
    """The paper's epsilon-rank, estimated straight from the quadrature (no smoothing kernel).

    ``mean_probes sum_i w_i 1{|theta_i| > eps}`` with Ritz values ``theta_i`` and weights
    ``w_i``: the expectation over Gaussian probes of each probe's spectral measure outside
    ``[-eps, eps]`` is the fraction of eigenvalues with ``|lambda| > eps`` (He et al. 2025,
    Def. 1), so the estimate is unbiased up to the quadrature error, which
    ``epsilon_rank_bounds`` bounds. ``smoothed_epsilon_rank`` is the paper code's measure.

    Args:
      density: a ``SpectralDensity`` (its nodes and weights are used).
      eps: the threshold, >= 0 (the paper uses 0.01-0.08 depending on the benchmark).
    """
    _check_threshold(eps, "eps")
    nodes, weights = _quadrature(density, "epsilon_rank")
    return jnp.mean(jnp.sum(jnp.where(jnp.abs(nodes) > eps, weights, 0.0), axis=-1))


def epsilon_rank_bounds(density: SpectralDensity, eps: float | jax.Array) -> FractionBounds:
    """``epsilon_rank`` with certain bounds on the quadrature error and the probes' error.

    For each probe, the mass of its spectral measure outside ``[-eps, eps]`` is
    ``F(-eps - 0) + 1 - F(eps + 0)``; the Chebyshev-Markov-Stieltjes inequalities bound
    ``F`` at any point by the Gauss-Radau rule through that point, built from the same Lanczos
    moments (Szego 1975, Sec. 3.41; Akhiezer 1965, Ch. 3; Golub & Meurant 2010, Ch. 6): so
    ``lower <= mass <= upper`` holds for every probe, whatever the spectrum. The interval's
    width is the Christoffel function at ``-eps`` and ``eps`` (the most mass a measure with
    the probe's moments could put there): small when ``num_iters`` resolves the spectrum near
    ``eps``, up to the whole mass near 0 when it does not (then the estimate is not
    informative). ``FractionBounds.interval()`` adds the probes' standard error.

    Args:
      density: a ``SpectralDensity`` with at least 2 Ritz nodes per probe, and its ``dim`` or
        at least 2 probes (for the standard error).
      eps: the threshold, >= 0.
    """
    _check_threshold(eps, "eps")
    nodes, weights = _quadrature(density, "epsilon_rank_bounds")
    _check_bounds_input(nodes, density.dim, "epsilon_rank_bounds")
    eps = jnp.asarray(eps, nodes.dtype)
    lower, upper = _cdf_bounds(nodes, weights, jnp.stack([-eps, eps]))
    outside_lo = lower[:, 0] + 1.0 - upper[:, 1]
    outside_hi = upper[:, 0] + 1.0 - lower[:, 1]
    per_probe = jnp.sum(jnp.where(jnp.abs(nodes) > eps, weights, 0.0), axis=-1)
    return _fraction(per_probe, outside_lo, outside_hi, density.dim)


def fast_fraction_bounds(density: SpectralDensity, threshold: float | jax.Array
                         ) -> FractionBounds:
    """The fraction of eigenvalues ``>= threshold`` (count-based tau-trainability), bounded.

    With ``threshold = fast_threshold(eta, K, gamma)`` it is the share of eigendirections that
    gradient descent shrinks by ``gamma`` within ``K`` steps: the count-based counterpart of
    ``tau_trainability``'s gradient-weighted fraction. Estimate, bounds and standard error as in
    ``epsilon_rank_bounds`` (the mass ``1 - F(threshold - 0)``).
    """
    _check_threshold(threshold, "threshold")
    nodes, weights = _quadrature(density, "fast_fraction_bounds")
    _check_bounds_input(nodes, density.dim, "fast_fraction_bounds")
    threshold = jnp.asarray(threshold, nodes.dtype)
    lower, upper = _cdf_bounds(nodes, weights, threshold[None])
    per_probe = jnp.sum(jnp.where(nodes >= threshold, weights, 0.0), axis=-1)
    return _fraction(per_probe, 1.0 - upper[:, 0], 1.0 - lower[:, 0], density.dim)


def smoothed_epsilon_rank(density: SpectralDensity, eps: float | jax.Array
                          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The paper code's epsilon-rank: the smoothed density's mass outside ``[-eps, eps]``.

    Each Ritz node is a Gaussian of the density's variance ``sigma^2``, integrated in closed
    form: ``mean_probes sum_i w_i [Phi((-eps - theta_i)/sigma) + 1 - Phi((eps - theta_i)/sigma)]``.
    A node at 0 alone contributes its weight times the kernel's tail ``2 (1 - Phi(eps/sigma))``
    (0.32 at ``eps = sigma``, 0.046 at ``2 sigma``, 0.003 at ``3 sigma``), and nodes within a
    few ``sigma`` of ``+-eps`` leak across it: with most of a network's spectrum near 0, when
    ``eps <= 3 sigma`` the number can be mostly kernel (``sigma`` is set by the spectrum's
    width), not spectrum (docs/MEASURING.md). Use ``epsilon_rank`` for the spectrum.

    Returns:
      ``(smoothed_rank, sigma, tail)`` with ``tail = 2 (1 - Phi(eps / sigma))``.
    """
    _check_threshold(eps, "eps")
    nodes, weights = _quadrature(density, "smoothed_epsilon_rank")
    sigma = jnp.sqrt(density.variance)
    outside = (jax.scipy.stats.norm.cdf((-eps - nodes) / sigma)
               + jax.scipy.stats.norm.sf((eps - nodes) / sigma))
    return (jnp.mean(jnp.sum(weights * outside, axis=-1)), sigma,
            2.0 * jax.scipy.stats.norm.sf(eps / sigma))


def epsilon_count(eigenvalues: jax.Array, eps: float | jax.Array) -> jax.Array:
    """The count ``#{i : |lambda_i| > eps}`` of an array of eigenvalues (any shape)."""
    _check_threshold(eps, "eps")
    return jnp.sum(jnp.abs(jnp.asarray(eigenvalues)) > eps)


# One prefix for all, so that a trainer's rows group them (and NaN-filled unmeasured rows
# are recognized by it).
EPSILON_RANK_COLUMNS = ("epsilon_rank", "epsilon_rank_lo", "epsilon_rank_hi", "epsilon_rank_se",
                        "epsilon_rank_smoothed", "epsilon_rank_smoothing_sigma",
                        "epsilon_rank_kernel_tail")


def epsilon_rank_record(density: SpectralDensity, eps: float | jax.Array
                        ) -> dict[str, jax.Array]:
    """Every epsilon-rank column a trainer records (the keys of ``EPSILON_RANK_COLUMNS``).

    ``epsilon_rank`` (the quadrature estimate), ``epsilon_rank_lo``/``_hi`` (the interval of
    ``FractionBounds.interval()``: certain quadrature bounds widened by 2 standard errors),
    ``epsilon_rank_se``, and the paper code's measure ``epsilon_rank_smoothed``
    (``smoothed_epsilon_rank``) with its kernel's ``epsilon_rank_smoothing_sigma`` and zero-node
    tail ``epsilon_rank_kernel_tail``.
    """
    bounds = epsilon_rank_bounds(density, eps)
    lo, hi = bounds.interval()
    smoothed, sigma, tail = smoothed_epsilon_rank(density, eps)
    return dict(zip(EPSILON_RANK_COLUMNS,
                    (bounds.estimate, lo, hi, bounds.standard_error, smoothed, sigma, tail),
                    strict=True))


def spectrum_record(density: SpectralDensity, eps: float | jax.Array) -> dict[str, jax.Array]:
    """What a trainer records of one measured spectrum: ``epsilon_rank_record``, the largest
    Ritz value with weight (``top_eigenvalue``), the operator's dimension (``curvature_dim``),
    the smoothed ``density`` on ``density_grid``, and the quadrature itself,
    ``ritz_nodes``/``ritz_weights`` ``(num_probes, num_iters)``, from which the epsilon-rank
    estimate and bounds can be recomputed later at any eps."""
    top = jnp.max(jnp.where(density.weights > 0, density.nodes, -jnp.inf))
    return {**epsilon_rank_record(density, eps), "top_eigenvalue": top,
            "curvature_dim": jnp.asarray(density.dim, jnp.float32),
            "density": density.density, "density_grid": density.grid,
            "ritz_nodes": density.nodes, "ritz_weights": density.weights}


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

