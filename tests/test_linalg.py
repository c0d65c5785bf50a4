"""Per-matrix eigh/eigvalsh/svdvals: jnp.linalg's values, its derivatives, and one matrix per
LAPACK call on CPU under vmap (the XLA CPU stall, docs/RELIABILITY.md)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity import linalg


def _symmetric(shape):
    a = jax.random.normal(jax.random.key(0), shape)
    return a + jnp.swapaxes(a, -1, -2)


def _lapack_batch_sizes(fn, x):
    """The shape of every LAPACK custom call's first result in the compiled program."""
    hlo = jax.jit(fn).lower(x).compile().as_text()
    calls = [line for line in hlo.splitlines() if 'custom_call_target="lapack' in line]
    assert calls
    return [re.search(r"= \(f32\[([\d,]*)\]", line) for line in calls]


def test_values_equal_numpy_and_jnp_under_nested_vmap():
    s = _symmetric((3, 4, 12, 12))
    f = jax.random.normal(jax.random.key(1), (3, 20, 7))
    values = jax.jit(jax.vmap(jax.vmap(linalg.eigvalsh)))(s)
    np.testing.assert_array_equal(values, jnp.linalg.eigvalsh(s))
    np.testing.assert_allclose(values, np.linalg.eigvalsh(np.asarray(s)), rtol=1e-4, atol=1e-4)
    w, v = jax.jit(jax.vmap(linalg.eigh))(s)
    np.testing.assert_allclose(v @ (w[..., None] * jnp.swapaxes(v, -1, -2)), s, atol=1e-4)
    np.testing.assert_array_equal(jax.vmap(linalg.svdvals)(f),
                                  jnp.linalg.svd(f, compute_uv=False))
    np.testing.assert_allclose(linalg.svdvals(f), np.linalg.svd(np.asarray(f), compute_uv=False),
                               rtol=1e-5)


def test_derivatives_match_finite_differences():
    f = jax.random.normal(jax.random.key(2), (6, 4), jnp.float32)
    s = _symmetric((5, 5))
    direction = jax.random.normal(jax.random.key(3), f.shape)
    for fn, x, d in ((lambda x: jnp.sum(linalg.svdvals(x) ** 1.5), f, direction),
                     (lambda x: jnp.sum(jnp.sin(linalg.eigvalsh(x))), s, _symmetric((5, 5)))):
        x64, d64 = np.asarray(x, np.float64), np.asarray(d, np.float64)
        h = 1e-3
        numeric = (float(fn(jnp.asarray(x64 + h * d64, jnp.float32)))
                   - float(fn(jnp.asarray(x64 - h * d64, jnp.float32)))) / (2 * h)
        analytic = float(jnp.vdot(jax.grad(fn)(x), d))
        assert analytic == pytest.approx(numeric, rel=2e-2, abs=1e-3)
        batched = jax.vmap(jax.grad(fn))(jnp.stack([x, 2 * x]))
        np.testing.assert_allclose(batched[0], jax.grad(fn)(x), rtol=1e-6, atol=1e-6)


def test_each_lapack_call_sees_one_matrix_on_cpu():
    s = _symmetric((3, 4, 16, 16))
    shapes = _lapack_batch_sizes(jax.vmap(jax.vmap(linalg.eigvalsh)), s)
    assert all(m and m.group(1) == "16,16" for m in shapes), shapes
    batched = _lapack_batch_sizes(jax.vmap(jax.vmap(jnp.linalg.eigvalsh)), s)
    assert any(m and m.group(1) == "3,4,16,16" for m in batched)  # what jnp compiles to
