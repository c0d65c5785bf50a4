"""Output-space cotangents ``u_k`` with weights ``c_k`` whose back-propagations give KFAC's
factor ``G = E_n sum_k c_k (J_n^T u_k)(J_n^T u_k)^T``, per estimation mode.

- ``"ggn"``: ``u`` = eigenvectors of each example's output Hessian ``H_n``, ``c`` = its
  eigenvalues (exact, ``C`` backward passes; Botev, Ritter & Barber 2017);
- ``"fisher"``: ``u`` = loss gradients at targets sampled from the model (``sample_fn``);
- ``"empirical"``: ``u`` = loss gradients at the data targets.

See ``kfac`` for the conventions and references.
"""

from __future__ import annotations

from collections.abc import Callable

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity import linalg

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
SampleFn = Callable[[jax.Array, jax.Array], jax.Array]

MODES = ("ggn", "fisher", "empirical")


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Integer labels sampled from ``softmax(logits)``: the Fisher of softmax cross-entropy."""
    return jax.random.categorical(key, logits)


def sample_gaussian(key: jax.Array, outputs: jax.Array) -> jax.Array:
    """Targets ``outputs + N(0, I)``: the Fisher of the loss ``0.5 ||f - y||^2``."""
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


def check_mode(mode: str, num_samples: int, key: jax.Array | None,
                sample_fn: SampleFn | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if mode == "fisher" and (key is None or sample_fn is None):
        raise ValueError("mode 'fisher' needs a PRNG key and sample_fn (e.g. sample_categorical "
                         "for softmax cross-entropy)")


def check_per_example_loss(loss_fn: LossFn, outputs: jax.Array, targets: jax.Array) -> None:
    """Refuses a ``loss_fn`` that does not give one loss per row of ``outputs``."""
    batch = outputs.shape[0]
    losses = jax.eval_shape(loss_fn, outputs, targets)
    if getattr(losses, "shape", None) != (batch,):
        raise ValueError(f"loss_fn must return per-example losses of shape ({batch},), got "
                         f"{getattr(losses, 'shape', type(losses).__name__)}")


def output_hessians(loss_fn: LossFn, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Each example's Hessian ``H_n = d^2 l_n / d f_n^2`` of its loss in its outputs:
    ``(batch, C, C)`` for ``(batch, C)`` outputs."""
    one = lambda f, t: loss_fn(f[None], jax.tree.map(lambda x: x[None], t))[0]
    return jax.vmap(jax.hessian(one))(outputs, targets)


def output_cotangents(outputs: jax.Array, targets: jax.Array, loss_fn: LossFn, mode: str,
                      key: jax.Array | None = None, sample_fn: SampleFn | None = None,
                      num_samples: int = 1) -> tuple[jax.Array, jax.Array]:
    """Output-space vectors ``u_k`` and coefficients ``c_k`` with ``G = E_n sum_k c_k g g^T``.

    Args:
      outputs: ``(batch, C)`` model outputs.
      targets: the batch's targets.
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (batch,)``.
      mode: ``"ggn"`` (``u`` = eigenvectors of each ``H_n``, ``c`` = eigenvalues), ``"fisher"``
        (``u`` = loss gradients at sampled targets, ``c = 1 / num_samples``) or ``"empirical"``
        (``u`` = loss gradients at the data targets, ``c = 1``).
      key, sample_fn, num_samples: for ``"fisher"``.

    Returns:
      ``(u, c)`` of shapes ``(K, batch, C)`` and ``(K, batch)``.
    """
    check_mode(mode, num_samples, key, sample_fn)
    chex.assert_rank(outputs, 2)
    batch, num_outputs = outputs.shape
    check_per_example_loss(loss_fn, outputs, targets)
    grad_at = lambda t: jax.grad(lambda f: jnp.sum(loss_fn(f, t)))(outputs)
    if mode == "ggn":
        hessians = output_hessians(loss_fn, outputs, targets)
        chex.assert_shape(hessians, (batch, num_outputs, num_outputs))
        values, vectors = linalg.eigh(hessians)
        return jnp.transpose(vectors, (2, 0, 1)), values.T
    if mode == "empirical":
        return grad_at(targets)[None], jnp.ones((1, batch), outputs.dtype)
    samples = jax.vmap(lambda k: sample_fn(k, outputs))(jax.random.split(key, num_samples))
    return jax.vmap(grad_at)(samples), jnp.full((num_samples, batch), 1.0 / num_samples,
                                                outputs.dtype)
