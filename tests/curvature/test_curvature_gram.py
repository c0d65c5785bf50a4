"""The loss-weighted Gram matrix against the dense GGN ``J^T H_out J``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature.gram import loss_weighted_gram, psd_sqrt
from spectral_plasticity.models import MLP


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def squared_error(outputs, targets):
    return jnp.sum((outputs - targets) ** 2, axis=-1)


def _dense_ggn(apply_fn, loss_fn, params, inputs, targets, layer=None):
    """``J^T H_out J`` of the mean loss from ``jax.jacobian`` / ``jax.hessian``, in float64."""
    block = params if layer is None else params[layer]
    flat, unravel = ravel_pytree(block)
    full = (lambda b: unravel(b)) if layer is None else (lambda b: {**params, layer: unravel(b)})
    outputs_of = lambda b: apply_fn(full(b), inputs)[0].reshape(-1)
    n = inputs.shape[0]
    mean_loss = lambda f: jnp.mean(loss_fn(f.reshape(n, -1), targets))
    jac, h_out = jax.jit(lambda b: (jax.jacobian(outputs_of)(b),
                                    jax.hessian(mean_loss)(outputs_of(b))))(flat)
    jac, h_out = np.asarray(jac, np.float64), np.asarray(h_out, np.float64)
    return jac.T @ h_out @ jac


def _problem(loss, num_outputs):
    """A 3 -> 5 -> C tanh MLP on 4 examples; params drawn with numpy (nothing to compile)."""
    model = MLP(hidden_sizes=(5,), num_outputs=num_outputs, activation="tanh")
    rng = np.random.default_rng(0)
    inputs = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    targets = (jnp.asarray(rng.integers(0, num_outputs, 4), jnp.int32) if loss is cross_entropy
               else jnp.asarray(rng.normal(size=(4, num_outputs)), jnp.float32))
    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)
    return (lambda p, x: model.apply({"params": p}, x)), params, inputs, targets


@pytest.mark.parametrize(("loss", "num_outputs", "layer"),
                         [(cross_entropy, 3, None), (cross_entropy, 3, "hidden_0"),
                          (squared_error, 2, None)])
def test_gram_nonzero_spectrum_equals_ggn_spectrum(loss, num_outputs, layer):
    apply_fn, params, inputs, targets = _problem(loss, num_outputs)
    gram = jax.jit(lambda p, x, y: loss_weighted_gram(apply_fn, loss, p, x, y, layers=layer,
                                                      batch_size=5))(params, inputs, targets)
    ggn = _dense_ggn(apply_fn, loss, params, inputs, targets, layer)
    assert gram.shape == (4 * num_outputs, 4 * num_outputs)
    gram = np.asarray(gram, np.float64)
    np.testing.assert_allclose(gram, gram.T, atol=1e-6 * np.abs(gram).max())
    gram_values = np.sort(np.linalg.eigvalsh(gram))[::-1]
    ggn_values = np.sort(np.linalg.eigvalsh(ggn))[::-1]
    # Softmax cross-entropy: each H_n has rank C - 1, so the rank is at most N (C - 1).
    rank = 4 * (num_outputs - 1) if loss is cross_entropy else 4 * num_outputs
    rank = min(rank, ggn.shape[0])
    np.testing.assert_allclose(gram_values[:rank], ggn_values[:rank], rtol=1e-4)
    assert np.all(np.abs(gram_values[rank:]) < 1e-5 * gram_values[0])
    assert np.all(np.abs(ggn_values[rank:]) < 1e-5 * ggn_values[0])


def test_psd_sqrt_squares_back_and_clips_negative_rounding():
    x = np.random.default_rng(0).normal(size=(3, 4, 2))
    matrices = jnp.asarray(x @ np.swapaxes(x, -1, -2) - 1e-9 * np.eye(4), jnp.float32)
    roots = jax.jit(psd_sqrt)(matrices)  # rank 2, slightly negative eigenvalues
    assert not np.any(np.isnan(roots))
    np.testing.assert_allclose(roots @ roots, matrices, atol=1e-5)
    np.testing.assert_allclose(roots, np.swapaxes(roots, -1, -2), atol=1e-6)


def test_gram_rejects_bad_losses_and_outputs():
    apply_fn, params, inputs, targets = _problem(cross_entropy, 3)
    trace = lambda fn, loss, **kw: jax.eval_shape(
        lambda: loss_weighted_gram(fn, loss, params, inputs, targets, **kw))
    with pytest.raises(ValueError, match="per-example losses"):
        trace(apply_fn, lambda f, y: jnp.mean(cross_entropy(f, y)))
    with pytest.raises(ValueError, match="unknown layers"):
        trace(apply_fn, cross_entropy, layers="hidden_3")
    with pytest.raises(AssertionError):  # outputs must be (N, C)
        trace(lambda p, x: apply_fn(p, x)[0][..., None], cross_entropy)
