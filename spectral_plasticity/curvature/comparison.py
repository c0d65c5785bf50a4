"""How well a layer's KFAC spectrum matches its exact curvature spectrum: the top eigenvalues
and the Wasserstein-1 distance between the two SLQ spectral measures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity.curvature.factors import KroneckerFactors
from spectral_plasticity.curvature.kronecker import kronecker_spectrum
from spectral_plasticity.curvature.lanczos import lanczos, ritz_pairs
from spectral_plasticity.curvature.layer_blocks import kfac_operator
from spectral_plasticity.curvature.operators import CurvatureOperator

# Eigenvalues below RESOLVED * eps * lambda_max are not compared: Lanczos stops resolving
# directions at ~10 sqrt(m) eps ||A|| (lanczos.BREAKDOWN_FACTOR), 1e-4 relative in float32.
RESOLVED = 1e3


def wasserstein_distance(x: jax.Array, x_weights: jax.Array, y: jax.Array, y_weights: jax.Array
                         ) -> jax.Array:
    """Wasserstein-1 distance ``int |F_x(t) - F_y(t)| dt`` of two weighted point sets on the line.

    Weights are normalized to sum to 1 per set (zero weights are allowed).
    """
    chex.assert_rank([x, x_weights, y, y_weights], 1)
    chex.assert_equal_shape([x, x_weights])
    chex.assert_equal_shape([y, y_weights])
    points = jnp.concatenate([x, y])
    signed = jnp.concatenate([x_weights / jnp.sum(x_weights), -y_weights / jnp.sum(y_weights)])
    order = jnp.argsort(points)
    points, cdf_gap = points[order], jnp.cumsum(signed[order])
    return jnp.sum(jnp.abs(cdf_gap[:-1]) * jnp.diff(points))


class SpectrumComparison(NamedTuple):
    """KFAC vs exact spectrum of one layer (``compare_spectra``).

    Attributes:
      kfac_top: ``(k,)`` largest KFAC eigenvalues (exact products).
      exact_top: ``(k,)`` largest exact eigenvalues (Ritz values of the first probe; NaN where
        Lanczos found fewer).
      log_ratio: mean ``|log10(kfac_top / exact_top)|`` over pairs that both exceed
        ``RESOLVED * eps * kfac_top[0]`` (``eps`` of the dtype: smaller eigenvalues are rounding
        noise to Lanczos); 0: the top eigenvalues agree, 1: off by 10x on average.
      wasserstein: Wasserstein-1 distance between the SLQ spectral measures of the KFAC block
        and of the exact block (same probes, same steps), divided by the larger of the two
        measures' mean ``|lambda|``: scale-free, in ``[0, 2]``, 0 for equal blocks (two zero
        blocks included); ``c * exact`` vs ``exact`` gives ``|c - 1| / max(c, 1)``.
      exact_epsilon_rank: SLQ mass of the exact block outside ``[-eps, eps]`` (the paper's
        epsilon-rank of the layer, to set against the KFAC block's fraction).
    """

    kfac_top: jax.Array
    exact_top: jax.Array
    log_ratio: jax.Array
    wasserstein: jax.Array
    exact_epsilon_rank: jax.Array


def _slq_measure(matvec: Callable[[jax.Array], jax.Array], probes: jax.Array, num_iters: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ritz values, quadrature weights and validity of one Lanczos run per probe (vmapped)."""

    def one(probe: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        ritz = ritz_pairs(lanczos(matvec, probe, num_iters))
        return ritz.values, ritz.weights, ritz.valid

    return jax.vmap(one)(probes)


def compare_spectra(factors: KroneckerFactors, exact: CurvatureOperator, layer: str, *,
                    key: jax.Array, num_iters: int = 30, num_probes: int = 1, k: int = 5,
                    eps: float = 0.01) -> SpectrumComparison:
    """Agreement of a layer's KFAC spectrum with its exact curvature spectrum.

    Stochastic Lanczos quadrature (Golub & Meurant 1997; Ghorbani et al. 2019) with the same
    Gaussian probes on both blocks gives two spectral measures ``mu = mean_probes sum_i w_i
    delta(theta_i)``; their Wasserstein-1 distance ``int |F_kfac - F_exact|``, relative to the
    larger mean ``|lambda|``, is the agreement on the whole density (the bulk near zero that
    epsilon-ranks count), 0 when the blocks are equal whatever SLQ's resolution.
    ``log_ratio`` summarizes the top of the spectrum. (A correlation of sorted log eigenvalues
    is not used: two decreasing sequences correlate whatever their values.)

    Args:
      factors: the layer's KFAC factors.
      exact: the exact block, ``layer_operator(..., layer)``.
      layer: the layer's name.
      key: PRNG key for the probes.
      num_iters: Lanczos steps per probe (capped at the dimension).
      num_probes: SLQ probes (vmapped; each holds a ``(num_iters, dim)`` basis).
      k: top eigenvalues compared; at most ``num_iters``.
      eps: threshold of ``exact_epsilon_rank``.
    """
    spectrum = kronecker_spectrum(factors)
    dim = spectrum.eigenvalues.size
    if dim != exact.dim:
        raise ValueError(f"the KFAC block has dimension {dim} but the operator has dimension "
                         f"{exact.dim}")
    num_iters = min(num_iters, dim)
    if not 1 <= k <= num_iters or num_probes < 1:
        raise ValueError(f"need 1 <= k <= num_iters={num_iters} and num_probes >= 1, got k={k}, "
                         f"num_probes={num_probes}")
    probes = jax.random.normal(key, (num_probes, dim), spectrum.eigenvalues.dtype)
    nodes, weights, valid = _slq_measure(exact.matvec, probes, num_iters)
    kfac_nodes, kfac_weights, _ = _slq_measure(kfac_operator(factors, exact, layer).matvec,
                                               probes, num_iters)
    ranked = jnp.sort(jnp.where(valid[0], nodes[0], -jnp.inf))[::-1][:k]
    exact_top = jnp.where(jnp.isfinite(ranked), ranked, jnp.nan)
    kfac_top = spectrum.eigenvalues[:k]
    # Pairs above rounding level: Lanczos in finite precision resolves eigenvalues down to
    # about sqrt(m) eps ||A|| (its breakdown threshold), so smaller ones are noise on both sides.
    floor = RESOLVED * jnp.finfo(kfac_top.dtype).eps * kfac_top[0]
    both = (kfac_top > floor) & (exact_top > floor)
    logs = jnp.abs(jnp.log10(jnp.where(both, kfac_top, 1.0) / jnp.where(both, exact_top, 1.0)))
    log_ratio = jnp.sum(jnp.where(both, logs, 0.0)) / jnp.maximum(jnp.sum(both), 1)
    distance = wasserstein_distance(kfac_nodes.reshape(-1), kfac_weights.reshape(-1),
                                    nodes.reshape(-1), weights.reshape(-1))
    scale = jnp.maximum(jnp.sum(weights * jnp.abs(nodes)),
                        jnp.sum(kfac_weights * jnp.abs(kfac_nodes))) / num_probes
    outside = jnp.sum(jnp.where(jnp.abs(nodes) > eps, weights, 0.0)) / num_probes
    return SpectrumComparison(
        kfac_top=kfac_top, exact_top=exact_top, log_ratio=log_ratio,
        wasserstein=distance / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny),
        exact_epsilon_rank=outside)
