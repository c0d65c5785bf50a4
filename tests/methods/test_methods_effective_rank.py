"""The effective rank's closed-form gradient against float64 finite differences, numpy's SVD and
the gradient through jax.numpy.linalg.svd, on full-rank and rank-deficient features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity import metrics
from spectral_plasticity.methods import erank_ascent, mean_effective_rank, select_layers
from spectral_plasticity.methods.effective_rank import feature_effective_rank
from spectral_plasticity.models import MLP


def erank64(phi: np.ndarray) -> float:
    """Effective rank in float64 from numpy's SVD (the reference)."""
    sigma = np.linalg.svd(np.asarray(phi, np.float64).reshape(-1, phi.shape[-1]),
                          compute_uv=False)
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(np.exp(-np.sum(p * np.log(p))))


def finite_difference_gradient(phi: np.ndarray, h: float = 1e-6) -> np.ndarray:
    phi = np.asarray(phi, np.float64)
    grad = np.zeros_like(phi)
    for index in np.ndindex(phi.shape):
        step = np.zeros_like(phi)
        step[index] = h
        grad[index] = (erank64(phi + step) - erank64(phi - step)) / (2 * h)
    return grad


def with_spectrum(key, n, d, sigma):
    """An ``n x d`` matrix with singular values ``sigma`` (zeros appended) and random vectors."""
    ku, kv = jax.random.split(key)
    u = jnp.linalg.qr(jax.random.normal(ku, (n, n)))[0]
    v = jnp.linalg.qr(jax.random.normal(kv, (d, d)))[0]
    s = jnp.zeros((n, d)).at[jnp.arange(len(sigma)), jnp.arange(len(sigma))].set(sigma)
    return u @ s @ v.T


def positive_projectors(phi):
    """Projectors on the left and right singular vectors of the positive singular values."""
    u, s, vt = np.linalg.svd(np.asarray(phi, np.float64), full_matrices=False)
    keep = s > max(phi.shape) * np.finfo(np.float32).eps * s[0]
    return u[:, keep] @ u[:, keep].T, vt[keep].T @ vt[keep]


@pytest.mark.parametrize("shape", [(6, 5), (5, 6), (4, 13), (13, 4), (3, 2, 2, 3)])
def test_value_and_gradient_of_full_rank_features_match_finite_differences(shape):
    phi = jax.random.normal(jax.random.key(0), shape)
    np.testing.assert_allclose(feature_effective_rank(phi), erank64(phi), rtol=1e-6)
    grad = jax.grad(feature_effective_rank)(phi)
    np.testing.assert_allclose(grad, finite_difference_gradient(phi), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grad, jax.grad(metrics.effective_rank)(phi), rtol=2e-4,
                               atol=1e-6)


@pytest.mark.parametrize("shape", [(100, 100), (100, 1000), (1000, 100)])
def test_features_of_an_mlp_match_the_svd_path(shape):
    """ReLU features whose spectrum spans four decades (the inputs share a mean direction)."""
    n, d = shape
    x = jax.random.uniform(jax.random.key(1), (n, 784))
    model = MLP(hidden_sizes=(d,), num_outputs=10)
    phi = model.apply(model.init(jax.random.key(0), x), x)[1]["hidden_0"]
    np.testing.assert_allclose(feature_effective_rank(phi), erank64(phi), rtol=3e-6)
    grad = np.asarray(jax.grad(feature_effective_rank)(phi), np.float64)
    # Some units are dead at init; along them the SVD path's gradient is that of rounding-level
    # singular values, so the reference is its projection on the positive ones.
    left, right = positive_projectors(phi)
    reference = left @ np.asarray(jax.grad(metrics.effective_rank)(phi), np.float64) @ right
    scale = np.max(np.abs(reference))
    live = np.any(np.asarray(phi) != 0, axis=0)
    np.testing.assert_allclose(grad[:, live] / scale, reference[:, live] / scale, atol=1e-4)
    # 1e-4 of the largest entry, and 0 on dead units up to 1e-3 of it: the float32 SVD's
    # vectors of the smallest singular values (8e-5 sigma_max here) are off by angles of about
    # eps sigma_max / (8e-5 sigma_max).
    assert np.max(np.abs(grad[:, ~live])) <= 1e-3 * scale


def test_repeated_singular_values_gradient_matches_finite_differences():
    phi = with_spectrum(jax.random.key(2), 6, 5, jnp.array([3.0, 2.0, 2.0, 2.0, 0.5]))
    np.testing.assert_allclose(feature_effective_rank(phi), erank64(phi), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(feature_effective_rank)(phi),
                               finite_difference_gradient(phi), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["dead_units", "repeated_zeros", "duplicate_rows"])
def test_rank_deficient_features_value_matches_and_gradient_is_finite_and_agrees(case):
    key = jax.random.key(3)
    if case == "dead_units":  # ReLU units silent on every example: zero columns
        phi = jax.nn.relu(jax.random.normal(key, (8, 7))).at[:, jnp.array([1, 4])].set(0.0)
    elif case == "repeated_zeros":  # singular values 2, sqrt 2, sqrt 2, 0, 0, 0 exactly
        rows = [[1, 1, 0, 0, 0, 0], [1, -1, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
        phi = jnp.array(rows + [[0] * 6] * 2, jnp.float32)
    else:  # the same input twice gives the same features twice
        phi = jax.random.normal(key, (7, 9))
        phi = phi.at[3].set(phi[0]).at[5].set(phi[0])
    np.testing.assert_allclose(feature_effective_rank(phi), erank64(phi), rtol=1e-5)
    grad = np.asarray(jax.grad(feature_effective_rank)(phi), np.float64)
    assert np.all(np.isfinite(grad))
    left, right = positive_projectors(phi)
    # No component along the singular vectors of zero singular values (arbitrary there) ...
    np.testing.assert_allclose(left @ grad @ right, grad, atol=1e-5)
    # ... and on the others, the gradient through the SVD and the finite differences.
    svd_grad = np.asarray(jax.grad(metrics.effective_rank)(phi), np.float64)
    np.testing.assert_allclose(grad, left @ svd_grad @ right, atol=1e-4)
    step = 1e-5 * grad / np.linalg.norm(grad)  # keeps the zero singular values at 0
    phi64 = np.asarray(phi, np.float64)
    slope = (erank64(phi64 + step) - erank64(phi64 - step)) / 2
    np.testing.assert_allclose(np.sum(grad * step), slope, rtol=1e-3)


def test_zero_features_have_rank_one_and_zero_gradient():
    phi = jnp.zeros((4, 3))
    assert float(feature_effective_rank(phi)) == 1.0
    np.testing.assert_array_equal(jax.grad(feature_effective_rank)(phi), 0.0)


def test_ascent_matches_the_step_through_the_svd_and_runs_under_jit_and_vmap():
    x = jax.random.uniform(jax.random.key(5), (40, 12))
    model = MLP(hidden_sizes=(16, 16), num_outputs=3)
    params = model.init(jax.random.key(0), x)["params"]
    features_fn = lambda p: model.apply({"params": p}, x)[1]
    step = jax.jit(lambda p: erank_ascent(p, features_fn, learning_rate=0.1, layers="all"))
    grads = jax.grad(lambda p: jnp.mean(jnp.stack(
        [metrics.effective_rank(f) for f in features_fn(p).values()])))(params)
    expected = jax.tree.map(lambda p, g: p + 0.1 * g, params, grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 step(params), expected)
    batched = jax.vmap(lambda p: erank_ascent(p, features_fn, learning_rate=0.1))(
        jax.tree.map(lambda a: jnp.stack([a, a]), params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-6),
                 batched, expected)


def test_a_batch_of_one_and_an_empty_layer_selection_are_refused():
    with pytest.raises(ValueError, match="at least 2 examples"):
        feature_effective_rank(jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="at least 2 examples"):
        jax.grad(feature_effective_rank)(jnp.ones((1, 5)))
    features = {"hidden_0": jnp.ones((4, 3)), "hidden_1": jnp.ones((4, 3))}
    with pytest.raises(ValueError, match="names no layer"):
        select_layers(features, [])
    with pytest.raises(ValueError, match="names no layer"):
        mean_effective_rank(features, ())
    with pytest.raises(ValueError, match="no layers"):
        mean_effective_rank({}, "all")
