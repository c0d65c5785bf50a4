"""Metrics on cases the frozen ``test_metrics.py`` leaves out: wide matrices, dead units,
hand-computed spectra and thresholds, and ``feature_metrics`` against the single metrics."""

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity import metrics

from .test_metrics import _with_singular_values  # a matrix with given singular values


def test_effective_rank_of_identities_and_a_wide_matrix_against_numpy():
    for n in (2, 6):  # one sample is refused (test_metrics)
        np.testing.assert_allclose(metrics.effective_rank(jnp.eye(n)), n, rtol=1e-5)
    # Fewer samples than units: at most `samples` nonzero singular values.
    wide = np.asarray(jax.random.normal(jax.random.key(1), (3, 10)))
    s = np.linalg.svd(wide, compute_uv=False)
    q = s / s.sum()
    np.testing.assert_allclose(metrics.effective_rank(jnp.asarray(wide)),
                               np.exp(-(q * np.log(q)).sum()), rtol=1e-4)


def test_effective_rank_gradient_is_finite_with_dead_units():
    h = jnp.zeros((6, 4)).at[:, :2].set(jax.random.normal(jax.random.key(2), (6, 2)))
    grad = jax.grad(metrics.effective_rank)(h)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert np.any(np.asarray(grad) != 0)


def test_srank_stable_rank_feature_rank_by_hand():
    sigma = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.05, 0.0, 0.0])
    phi = _with_singular_values(sigma, rows=64)
    # cumulative sigma share: 0.512, 0.769, 0.923, 0.974, 0.9974, ... -> k = 5 reaches 0.99
    assert int(metrics.srank(phi)) == 5
    assert int(metrics.srank(phi, delta=0.2)) == 3
    # sigma / sqrt(64) = 1.25, 0.625, 0.375, 0.125, 0.0625, 0.00625, 0, 0
    assert int(metrics.feature_rank(phi)) == 5
    assert int(metrics.feature_rank(phi, threshold=0.1)) == 4
    np.testing.assert_allclose(metrics.stable_rank(phi), 135.2525 / 100.0, rtol=1e-4)
    np.testing.assert_allclose(metrics.stable_rank(jnp.eye(5)), 5.0, rtol=1e-6)
    assert int(metrics.srank(jnp.eye(5))) == 5


def test_dormant_scores_by_hand():
    h = jnp.array([[0.0, 1.0, 0.0, 2.0],
                   [0.0, 3.0, 0.0, 0.0],
                   [0.0, 2.0, 0.1, 0.0]])
    # E|h| = (0, 2, 1/30, 2/3), their mean is 0.675
    np.testing.assert_allclose(metrics.dormant_scores(h),
                               np.array([0.0, 2.0, 1 / 30, 2 / 3]) / 0.675, rtol=1e-5)
    assert float(metrics.dormant_fraction(h, tau=0.0)) == 0.25
    assert float(metrics.dormant_fraction(h, tau=0.05)) == 0.5
    assert float(metrics.dormant_fraction(h, tau=1.0)) == 0.75


def test_feature_metrics_equal_the_single_metrics_per_layer():
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 5))
    dense = jax.nn.relu(x.reshape(2, -1))
    out = jax.jit(metrics.feature_metrics)({"conv_0": x, "hidden_0": dense})
    for layer, value in (("conv_0", x), ("hidden_0", dense)):
        for name in ("effective_rank", "srank", "dormant_fraction"):
            fn = metrics.FEATURE_METRICS[name]
            np.testing.assert_allclose(out[f"{name}/{layer}"], fn(value), rtol=1e-5,
                                       err_msg=f"{name}/{layer}")
