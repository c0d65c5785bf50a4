"""Feature and parameter metrics against their formulas on known spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity import metrics


def _with_singular_values(sigma, rows=40, seed=0):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(rows, len(sigma))))[0]
    v = np.linalg.qr(rng.normal(size=(len(sigma), len(sigma))))[0]
    return jnp.asarray(u @ np.diag(sigma) @ v.T, jnp.float32)


def test_effective_rank_identity_rank_one_and_scale_invariance():
    np.testing.assert_allclose(metrics.effective_rank(jnp.eye(7)), 7.0, rtol=1e-5)
    rank_one = jnp.outer(jnp.arange(1.0, 11.0), jnp.arange(1.0, 6.0))
    np.testing.assert_allclose(metrics.effective_rank(rank_one), 1.0, rtol=1e-4)
    x = jax.random.normal(jax.random.key(0), (30, 8))
    np.testing.assert_allclose(metrics.effective_rank(x), metrics.effective_rank(37.0 * x),
                               rtol=1e-5)
    sigma = np.array([4.0, 2.0, 1.0, 1.0])
    p = sigma / sigma.sum()
    np.testing.assert_allclose(metrics.effective_rank(_with_singular_values(sigma)),
                               np.exp(-(p * np.log(p)).sum()), rtol=1e-4)


def test_srank_stable_rank_feature_rank_on_known_spectra():
    sigma = np.array([10.0, 5.0, 3.0, 1.0, 0.5, 0.05, 0.0, 0.0])
    phi = _with_singular_values(sigma, rows=64)
    cumulative = np.cumsum(sigma) / sigma.sum()
    assert int(metrics.srank(phi, delta=0.01)) == int(np.argmax(cumulative >= 0.99) + 1)
    assert int(metrics.srank(phi, delta=0.2)) == int(np.argmax(cumulative >= 0.8) + 1)
    np.testing.assert_allclose(metrics.stable_rank(phi), (sigma ** 2).sum() / 100.0, rtol=1e-4)
    expected = int(np.sum(sigma / np.sqrt(64) > 0.01))
    assert int(metrics.feature_rank(phi)) == expected


def test_unit_activity_fractions():
    h = jnp.array([[0.0, 1.0, 0.0, 2.0],
                   [0.0, 3.0, 0.0, 0.0],
                   [0.0, 2.0, 0.1, 0.0]])
    scores = np.asarray(metrics.dormant_scores(h))
    activity = np.abs(np.asarray(h)).mean(0)
    np.testing.assert_allclose(scores, activity / activity.mean(), rtol=1e-6)
    assert float(metrics.dead_fraction(h)) == 0.25
    assert float(metrics.dormant_fraction(h, tau=0.1)) == 0.5
    np.testing.assert_allclose(metrics.active_fraction(h), 5 / 12)


def test_conv_features_are_channels_over_positions():
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 5))
    np.testing.assert_allclose(metrics.effective_rank(x),
                               metrics.effective_rank(x.reshape(18, 5)), rtol=1e-6)
    out = metrics.feature_metrics({"conv_0": x, "hidden_0": x.reshape(2, -1)})
    assert set(out) == {f"{m}/{layer}" for m in metrics.FEATURE_METRICS
                        for layer in ("conv_0", "hidden_0")}


def test_parameter_norms():
    params = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([[12.0]])}}
    np.testing.assert_allclose(metrics.weight_norm(params), 13.0)
    init = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_allclose(metrics.distance_from_init(params, init), 13.0)
    np.testing.assert_allclose(metrics.grad_norm(params), 13.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="features must be"):
        metrics.effective_rank(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="delta must lie"):
        metrics.srank(jnp.ones((3, 3)), delta=1.5)
    with pytest.raises(ValueError, match="tau must be non-negative"):
        metrics.dormant_fraction(jnp.ones((3, 3)), tau=-1)


def test_effective_rank_refuses_one_sample_but_not_one_image():
    with pytest.raises(ValueError, match=r"layer 'features' needs features of 2 samples or more, "
                                         r"got shape \(1, 6\)"):
        metrics.effective_rank(jnp.ones((1, 6)))
    with pytest.raises(ValueError, match="layer 'hidden_0'"):
        metrics.check_samples({"hidden_1": jnp.ones((4, 3)), "hidden_0": jnp.ones((1, 3))})
    image = jax.random.normal(jax.random.key(0), (1, 3, 3, 4))  # 9 locations are 9 samples
    np.testing.assert_allclose(metrics.effective_rank(image),
                               metrics.effective_rank(image.reshape((9, 4))), rtol=1e-6)
