"""The effective-rank (ER) objective of L2-ER, and the layers it acts on.

The paper's L2-ER maximizes the mean effective rank of hidden features,
``mean_{l in S} erank(Phi_l)`` (Roy & Vetterli's ``exp`` of the entropy of the normalized
singular values, ``spectral_plasticity.metrics.effective_rank``), next to the task loss and an
L2 penalty. Two forms are in use (He et al. 2025 and their code):

- **joint**: minimize ``L_task + lambda ||theta||^2 - beta * mean_l erank(Phi_l)`` — add
  ``beta * erank_penalty(features, layers)`` to the loss, or let ``spectral_reg`` add the ER
  gradient from a ``features_fn``;
- **alternating**: after every N task updates, a separate plain ascent step on the mean effective
  rank of the features of the last N updates' examples, with its own step size:
  ``theta <- theta + eta_ER * grad mean_l erank(Phi_l(theta))`` (``erank_ascent``). With online
  batch size 1 this is the only form in which ER sees a batch of features.

Layer selection ``layers``: ``"all"`` hidden layers, ``"last_two"``, or explicit layer names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from spectral_plasticity.metrics import effective_rank

PyTree = Any
Features = Mapping[str, jax.Array]
LayerChoice = str | Sequence[str]


def _depth_key(name: str) -> tuple[int, list[Any]]:
    """Input-to-output order of our models' feature names: ``stem`` first, ``pool`` last, the
    rest (``hidden_i``, ``conv_i``, ``block_s_b``, ...) in natural order of their numbers."""
    place = 0 if name == "stem" else 2 if name == "pool" else 1
    return place, [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def select_layers(features: Features, layers: LayerChoice) -> list[str]:
    """Names of the feature layers ``layers`` designates, input to output.

    Args:
      features: a model's features dict.
      layers: ``"all"``, ``"last_two"``, or a sequence of layer names.
    """
    names = sorted(features, key=_depth_key)
    if layers == "all":
        return names
    if layers == "last_two":
        return names[-2:]
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all', 'last_two' or a list of names, got {layers!r}")
    unknown = [n for n in layers if n not in features]
    if unknown or not layers:
        raise ValueError(f"unknown ER layers {unknown or list(layers)}; the features have "
                         f"layers {names}")
    return [n for n in names if n in layers]


def mean_effective_rank(features: Features, layers: LayerChoice = "all") -> jax.Array:
    """``mean_{l in layers} erank(Phi_l)``."""
    return jnp.mean(jnp.stack([effective_rank(features[n])
                               for n in select_layers(features, layers)]))


def erank_penalty(features: Features, layers: LayerChoice = "all") -> jax.Array:
    """``-mean_l erank(Phi_l)``: add ``beta`` times this to a loss for the joint L2-ER form."""
    return -mean_effective_rank(features, layers)


def erank_gradient(features_fn: Callable[[PyTree], Features], params: PyTree,
                   layers: LayerChoice = "all") -> PyTree:
    """``grad_theta mean_l erank(Phi_l(theta))`` for ``features_fn(params) -> features``."""
    return jax.grad(lambda p: mean_effective_rank(features_fn(p), layers))(params)


def erank_ascent(params: PyTree, features_fn: Callable[[PyTree], Features], *,
                 learning_rate: float | jax.Array, layers: LayerChoice = "all") -> PyTree:
    """One plain ascent step on the mean effective rank (the alternating L2-ER form).

    ``theta <- theta + learning_rate * grad mean_l erank(Phi_l(theta))``.
    """
    grads = erank_gradient(features_fn, params, layers)
    return jax.tree.map(lambda p, g: p + learning_rate * g, params, grads)
