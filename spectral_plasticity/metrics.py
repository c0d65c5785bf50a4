"""Plasticity metrics of hidden features and parameters.

Feature metrics take one layer's features as a matrix ``Phi`` of shape ``(samples, units)``;
convolutional features ``(batch, H, W, channels)`` are read as ``(batch * H * W, channels)``:
every spatial position is a sample of the layer's channel units. The features of any flax model
(linen or nnx, unchanged) are the inputs of its layers: ``curvature.layer_inputs``. With
singular values ``sigma_1 >= .. >= sigma_d`` of ``Phi``:

- ``effective_rank``: ``exp(H(p))`` with ``p_i = sigma_i / sum_j sigma_j`` (Roy & Vetterli 2007);
  ``n`` for ``I_n``, 1 for a rank-one matrix, invariant to scaling.
- ``srank``: the smallest ``k`` with ``sum_{i<=k} sigma_i >= (1 - delta) sum_i sigma_i``,
  ``delta = 0.01`` (Kumar et al. 2021, "Implicit under-parameterization").
- ``stable_rank``: ``||Phi||_F^2 / ||Phi||_2^2 = sum sigma_i^2 / sigma_1^2`` (Rudelson & Vershynin).
- ``feature_rank``: ``#{i : sigma_i / sqrt(samples) > threshold}``, threshold 0.01 (Lyle et al.
  2022, "Understanding and preventing capacity loss": the singular values of the feature matrix
  normalized by the square root of the number of samples).

Unit activity (``h`` post-activation, over a batch):

- ``dormant_scores``: ``s_i = E|h_i| / mean_k E|h_k|`` (Sokar et al. 2023, ReDo); a unit is
  tau-dormant when ``s_i <= tau``; ``dormant_fraction(features, tau)``.
- ``dead_fraction``: units that are exactly zero on every sample (dead ReLUs);
  ``active_fraction``: mean over samples of the fraction of units that are nonzero.

Parameter metrics: ``weight_norm`` (global L2 norm), ``distance_from_init``
(``||theta - theta_0||``), ``grad_norm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import optax

from spectral_plasticity import linalg

PyTree = Any
_EPS = 1e-12


def feature_matrix(features: jax.Array) -> jax.Array:
    """``(samples, units)`` view of a layer's features: 2-D as is, ``(B, H, W, C) -> (BHW, C)``."""
    if features.ndim == 2:
        return features
    if features.ndim == 4:
        return features.reshape((-1, features.shape[-1]))
    raise ValueError(f"features must be (batch, units) or (batch, H, W, channels), got shape "
                     f"{features.shape}")


def check_samples(features: Mapping[str, Any]) -> None:
    """Raises unless every layer's features (arrays or shape structs) hold 2 samples or more.

    One sample has one singular value: its effective rank is 1 whatever the network, and an
    ascent on it has zero gradient.
    """
    for layer, value in features.items():
        shape = tuple(value.shape)
        samples = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
        if samples < 2:
            raise ValueError(f"the effective rank of layer {layer!r} needs features of 2 samples "
                             f"or more, got shape {shape}: one sample's effective rank is 1 "
                             "whatever the model; pass a batch of 2 examples or more")


def singular_values(features: jax.Array) -> jax.Array:
    """Singular values of ``feature_matrix(features)``, descending."""
    return linalg.svdvals(feature_matrix(features))


def effective_rank(features: jax.Array) -> jax.Array:
    """Roy & Vetterli effective rank ``exp(-sum p_i log p_i)``, ``p = sigma / sum(sigma)``."""
    check_samples({"features": feature_matrix(features)})
    sigma = singular_values(features)
    p = sigma / jnp.maximum(jnp.sum(sigma), _EPS)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.exp(entropy)


def srank(features: jax.Array, delta: float = 0.01) -> jax.Array:
    """Smallest ``k`` whose top-``k`` singular values hold ``1 - delta`` of their sum."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    sigma = singular_values(features)
    cumulative = jnp.cumsum(sigma) / jnp.maximum(jnp.sum(sigma), _EPS)
    return jnp.sum(cumulative < 1.0 - delta) + 1


def stable_rank(features: jax.Array) -> jax.Array:
    """``||Phi||_F^2 / ||Phi||_2^2``."""
    sigma = singular_values(features)
    return jnp.sum(sigma ** 2) / jnp.maximum(sigma[0] ** 2, _EPS)


def feature_rank(features: jax.Array, threshold: float = 0.01) -> jax.Array:
    """Number of singular values of ``Phi / sqrt(samples)`` above ``threshold`` (Lyle et al.)."""
    matrix = feature_matrix(features)
    sigma = singular_values(matrix) / jnp.sqrt(matrix.shape[0])
    return jnp.sum(sigma > threshold)


def dormant_scores(features: jax.Array) -> jax.Array:
    """ReDo scores ``s_i = E|h_i| / mean_k E|h_k|`` per unit, shape ``(units,)``."""
    activity = jnp.mean(jnp.abs(feature_matrix(features)), axis=0)
    return activity / jnp.maximum(jnp.mean(activity), _EPS)


def dormant_fraction(features: jax.Array, tau: float = 0.0) -> jax.Array:
    """Fraction of units with ``s_i <= tau`` (tau = 0: units silent on the whole batch)."""
    if tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    return jnp.mean(dormant_scores(features) <= tau)


def dead_fraction(features: jax.Array) -> jax.Array:
    """Fraction of units that are exactly zero on every sample."""
    return jnp.mean(jnp.all(feature_matrix(features) == 0, axis=0))


def active_fraction(features: jax.Array) -> jax.Array:
    """Mean over samples of the fraction of units that are nonzero."""
    return jnp.mean(feature_matrix(features) != 0)


def weight_norm(params: PyTree) -> jax.Array:
    """Global L2 norm of all parameters."""
    return optax.tree.norm(params)


def distance_from_init(params: PyTree, initial_params: PyTree) -> jax.Array:
    """``||theta - theta_0||_2`` over all parameters."""
    return optax.tree.norm(jax.tree.map(jnp.subtract, params, initial_params))


def grad_norm(grads: PyTree) -> jax.Array:
    """Global L2 norm of a gradient pytree."""
    return optax.tree.norm(grads)


FEATURE_METRICS = {
    "effective_rank": effective_rank,
    "srank": srank,
    "stable_rank": stable_rank,
    "feature_rank": feature_rank,
    "dormant_fraction": lambda f: dormant_fraction(f, 0.025),
    "dead_fraction": dead_fraction,
    "active_fraction": active_fraction,
}


def feature_metrics(features: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Every feature metric of every layer, as ``{'metric/layer': scalar}``.

    ``dormant_fraction`` uses ReDo's tau = 0.025 (Sokar et al.'s value for supervised nets).
    """
    out = {}
    for layer, value in features.items():
        chex.assert_rank(value, {2, 4})
        for name, fn in FEATURE_METRICS.items():
            out[f"{name}/{layer}"] = fn(value)
    return out
