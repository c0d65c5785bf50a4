"""Spectra and ranks of a KFAC block ``scale * A (x) G``: every eigenvalue is a product
``scale * lambda_i(A) * lambda_j(G)``, the rank is ``rank(A) * rank(G)`` and the effective rank
(Roy & Vetterli 2007) ``erank(A) * erank(G)``.
"""

from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity import linalg
from spectral_plasticity.curvature.factors import KroneckerFactors
from spectral_plasticity.curvature.spectrum import epsilon_count


class KroneckerSpectrum(NamedTuple):
    """Eigenvalues of a KFAC block.

    Attributes:
      eigenvalues: ``(d_a * d_g,)`` all products ``scale * lambda_i(A) * lambda_j(G)``, descending.
      a_eigenvalues: ``(d_a,)`` eigenvalues of ``A``, descending.
      g_eigenvalues: ``(d_g,)`` eigenvalues of ``G``, descending.
    """

    eigenvalues: jax.Array
    a_eigenvalues: jax.Array
    g_eigenvalues: jax.Array


def kronecker_spectrum(factors: KroneckerFactors) -> KroneckerSpectrum:
    """Every eigenvalue of ``scale * A (x) G`` from the eigenvalues of its two factors."""
    chex.assert_rank([factors.a, factors.g], 2)
    chex.assert_rank(factors.scale, 0)
    a_values = linalg.eigvalsh(factors.a)[::-1]
    g_values = linalg.eigvalsh(factors.g)[::-1]
    products = factors.scale * jnp.outer(a_values, g_values).reshape(-1)
    return KroneckerSpectrum(jnp.sort(products)[::-1], a_values, g_values)


def spectrum_effective_rank(eigenvalues: jax.Array) -> jax.Array:
    """Roy & Vetterli effective rank ``exp(-sum_i p_i log p_i)``, ``p = |lambda| / sum |lambda|``.

    For a second moment ``A = Phi^T Phi / N`` the eigenvalues are squared singular values of
    ``Phi``, so ``erank(A) <= metrics.effective_rank(Phi)`` (which uses the singular values).
    A zero spectrum (a layer whose units are all dead) has effective rank 0.
    """
    magnitudes = jnp.abs(eigenvalues.reshape(-1))
    total = jnp.sum(magnitudes)
    p = magnitudes / jnp.maximum(total, jnp.finfo(magnitudes.dtype).tiny)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def numerical_rank(eigenvalues: jax.Array) -> jax.Array:
    """``#{|lambda| > n * eps * max |lambda|}``: numpy's ``matrix_rank`` rule (n x n matrix)."""
    magnitudes = jnp.abs(eigenvalues)
    tolerance = magnitudes.size * jnp.finfo(magnitudes.dtype).eps * jnp.max(magnitudes)
    return jnp.sum(magnitudes > tolerance)


def relative_epsilon_rank(eigenvalues: jax.Array, relative_eps: float) -> jax.Array:
    """Fraction of eigenvalues with ``|lambda| > relative_eps * max |lambda|``.

    The factors' scales are arbitrary (``A`` scales with the squared activations, ``G`` with the
    loss curvature), so their epsilon-ranks use a threshold relative to the largest eigenvalue:
    they measure the shape of each factor's spectrum, comparable across layers and tasks.
    """
    magnitudes = jnp.abs(eigenvalues)
    return jnp.mean(magnitudes > relative_eps * jnp.max(magnitudes))


class BlockRanks(NamedTuple):
    """Rank summaries of a KFAC block (all arrays, so they ``vmap``).

    Attributes:
      epsilon_rank: ``#{|scale * lambda_i(A) lambda_j(G)| > eps}`` (He et al.'s epsilon-rank of
        the block, as a count).
      epsilon_rank_fraction: ``epsilon_rank / (d_a * d_g)``.
      effective_rank: effective rank of all products (``= effective_rank_a * effective_rank_g``).
      effective_rank_a, effective_rank_g: effective ranks of the factors.
      epsilon_rank_a, epsilon_rank_g: ``relative_epsilon_rank`` of the factors.
      rank_a, rank_g: numerical ranks of the factors.
      rank: ``rank_a * rank_g``, the numerical rank of the block.
    """

    epsilon_rank: jax.Array
    epsilon_rank_fraction: jax.Array
    effective_rank: jax.Array
    effective_rank_a: jax.Array
    effective_rank_g: jax.Array
    epsilon_rank_a: jax.Array
    epsilon_rank_g: jax.Array
    rank_a: jax.Array
    rank_g: jax.Array
    rank: jax.Array


def block_ranks(spectrum: KroneckerSpectrum, eps: float, relative_eps: float = 1e-3
                ) -> BlockRanks:
    """Epsilon-ranks, effective ranks and the decomposition ``rank(A) x rank(G)`` of a block.

    Args:
      spectrum: from ``kronecker_spectrum``.
      eps: absolute threshold of the block's epsilon-rank (He et al. use 0.01-0.08).
      relative_eps: relative threshold of the factors' epsilon-ranks.
    """
    count = epsilon_count(spectrum.eigenvalues, eps)
    rank_a = numerical_rank(spectrum.a_eigenvalues)
    rank_g = numerical_rank(spectrum.g_eigenvalues)
    return BlockRanks(
        epsilon_rank=count,
        epsilon_rank_fraction=count / spectrum.eigenvalues.size,
        effective_rank=spectrum_effective_rank(spectrum.eigenvalues),
        effective_rank_a=spectrum_effective_rank(spectrum.a_eigenvalues),
        effective_rank_g=spectrum_effective_rank(spectrum.g_eigenvalues),
        epsilon_rank_a=relative_epsilon_rank(spectrum.a_eigenvalues, relative_eps),
        epsilon_rank_g=relative_epsilon_rank(spectrum.g_eigenvalues, relative_eps),
        rank_a=rank_a,
        rank_g=rank_g,
        rank=rank_a * rank_g,
    )
