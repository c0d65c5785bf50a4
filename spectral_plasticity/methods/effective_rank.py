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

**Gradient.** ``feature_effective_rank`` (what both forms use) is ``metrics.effective_rank``
with a closed-form gradient. With the thin SVD ``Phi = U diag(sigma) V^T``, ``S = sum_i
sigma_i``, ``p_i = sigma_i / S``, ``H = -sum_i p_i log p_i`` and ``erank = exp(H)``:

    d erank / d Phi = U diag(g) V^T,   g_i = erank (-log p_i - H) / S   for sigma_i > 0,

and ``g_i = 0`` for ``sigma_i = 0``. Singular values at the rounding level, ``<= max(B, d) *
eps * sigma_max`` (``numpy.linalg.matrix_rank``'s tolerance), count as 0: they change the value
by about ``eps`` relative, and their ``u_i, v_i`` are rounding noise. At a zero singular value the
effective rank is not differentiable (``sigma_i = |t|`` along ``u_i v_i^T``: slope ``+inf``
both ways) and ``u_i, v_i`` are arbitrary, so the gradient is that of the positive singular
values: finite with dead units, duplicated examples and repeated singular values, and equal to
the SVD's on their singular vectors. A ``B x d`` matrix far from square is first reduced to the
``m x m`` triangular factor of a QR decomposition of its long side (``m = min(B, d)``). (The
eigenvalues of the smaller Gram matrix ``Phi Phi^T`` would be cheaper, but in float32 they are
off by ``eps * sigma_max^2``, singular values by up to ``sqrt(eps) sigma_max``: on a ReLU MLP's
features, whose spectrum spans four decades, that moved the effective rank by 1e-3 relative,
against 3e-7 for the SVD; docs/SPEED.md.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from spectral_plasticity import linalg
from spectral_plasticity.metrics import feature_matrix

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
    if not names:
        raise ValueError("the features have no layers: nothing to take an effective rank of")
    if layers == "all":
        return names
    if layers == "last_two":
        return names[-2:]
    if isinstance(layers, str):
        raise ValueError(f"layers must be 'all', 'last_two' or a list of names, got {layers!r}")
    if not layers:
        raise ValueError(f"the ER layer selection names no layer; name some of {names}, or use "
                         "'all' or 'last_two'")
    unknown = [n for n in layers if n not in features]
    if unknown:
        raise ValueError(f"unknown ER layers {unknown}; the features have layers {names}")
    return [n for n in names if n in layers]


def _check_features(features: jax.Array) -> None:
    if features.ndim not in (2, 4):
        raise ValueError(f"features must be (batch, units) or (batch, H, W, channels), got "
                         f"shape {features.shape}")
    if features.shape[0] < 2:
        raise ValueError(f"the effective rank needs a batch of at least 2 examples, got features "
                         f"of shape {features.shape}: one example's features have effective "
                         "rank 1 whatever the parameters (raise erank_batch or the batch size)")


def _entropy_rank(sigma: jax.Array, rows: int, cols: int) -> tuple[jax.Array, jax.Array]:
    """``exp(H(sigma / sum sigma))`` and its gradient ``g`` with respect to ``sigma``
    (descending singular values of a ``rows x cols`` matrix; those at the rounding level count
    as zero)."""
    sigma = jnp.where(sigma > max(rows, cols) * jnp.finfo(sigma.dtype).eps * sigma[0], sigma, 0.0)
    total = jnp.sum(sigma)
    total = jnp.where(total > 0, total, 1.0)
    p = sigma / total
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    entropy = -jnp.sum(p * log_p)
    erank = jnp.exp(entropy)
    return erank, jnp.where(p > 0, erank * (-log_p - entropy) / total, 0.0)


def _svd(phi: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``(U, sigma, V^T)`` of a ``(n, d)`` matrix; one far from square (``max >=
    2 min``) through the QR decomposition of its long side, ``Phi^T = Q R``, then
    ``Phi = R^T Q^T = U_R diag(sigma) (Q V_R)^T``."""
    n, d = phi.shape
    if max(n, d) < 2 * min(n, d):
        return linalg.svd(phi)
    if n < d:
        q, r = linalg.qr(phi.T)
        u, sigma, vt = linalg.svd(r.T)
        return u, sigma, vt @ q.T
    q, r = linalg.qr(phi)
    u, sigma, vt = linalg.svd(r)
    return q @ u, sigma, vt


@jax.custom_jvp
def feature_effective_rank(features: jax.Array) -> jax.Array:
    """Roy & Vetterli's effective rank of one layer's features (``metrics.effective_rank``),
    differentiable with the closed-form gradient of the module docstring.

    Args:
      features: ``(batch, units)`` or ``(batch, H, W, channels)``, a batch of at least 2.
    """
    _check_features(features)
    phi = feature_matrix(features)
    return _entropy_rank(linalg.svdvals(phi), *phi.shape)[0]


@feature_effective_rank.defjvp
def _feature_effective_rank_jvp(primals, tangents):
    (features,), (direction,) = primals, tangents
    _check_features(features)
    phi = feature_matrix(features)
    u, sigma, vt = _svd(phi)
    erank, g = _entropy_rank(sigma, *phi.shape)
    grad = (u * g) @ vt
    return erank, jnp.sum(grad.reshape(features.shape) * direction)


def mean_effective_rank(features: Features, layers: LayerChoice = "all") -> jax.Array:
    """``mean_{l in layers} erank(Phi_l)`` (``feature_effective_rank`` of each layer)."""
    return jnp.mean(jnp.stack([feature_effective_rank(features[n])
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
