"""Spectral quantities against a dense eigendecomposition of jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature import (
    SpectralDensity,
    dataset_operator,
    epsilon_count,
    fast_threshold,
    hessian_trace,
    smoothed_epsilon_rank,
    spectral_density,
    tau_trainability,
    top_eigenvalues,
)

from .conftest import cross_entropy


def _well_separated_top(eigenvalues, k, by_magnitude=False):
    """Indices among the top k whose relative gap to their neighbours exceeds 1%."""
    order = np.argsort(-np.abs(eigenvalues) if by_magnitude else -eigenvalues)
    top = eigenvalues[order]
    keys = np.abs(top) if by_magnitude else top
    gaps = np.abs(np.diff(keys)) / np.abs(keys[:-1])
    return [i for i in range(k) if gaps[i] > 1e-2 and (i == 0 or gaps[i - 1] > 1e-2)], top


@pytest.mark.parametrize("problem_name", ["mlp_problem", "conv_problem"])
def test_top_eigenvalues_match_dense_eigh(problem_name, request):
    problem = request.getfixturevalue(problem_name)
    dense = problem.dense_hessian()
    eigenvalues = np.linalg.eigvalsh(dense)
    values, vectors = top_eigenvalues(problem.loss, problem.params, 5, key=jax.random.key(0),
                                      num_iters=80)
    separated, top = _well_separated_top(eigenvalues, 5)
    assert len(separated) >= 2
    np.testing.assert_allclose(np.asarray(values)[separated], top[separated], rtol=1e-3)
    assert np.all(np.diff(np.asarray(values)) <= 0)
    # Eigenvectors: a stacked pytree like params, each a unit eigenvector.
    flat = jax.vmap(lambda t: ravel_pytree(t)[0])(vectors)
    assert flat.shape == (5, dense.shape[0])
    for i in separated:
        residual = dense @ np.asarray(flat[i], np.float64) - float(values[i]) * np.asarray(flat[i])
        assert np.linalg.norm(residual) < 1e-2 * abs(float(values[i]))


def test_top_eigenvalues_by_magnitude(mlp_problem):
    # A loss with a negative-curvature direction dominating: the negated loss.
    eigenvalues = np.linalg.eigvalsh(-mlp_problem.dense_hessian())
    negated = lambda p: -mlp_problem.loss(p)

    @jax.jit
    def both(params):
        top = lambda by_magnitude: top_eigenvalues(negated, params, 2, key=jax.random.key(1),
                                                   num_iters=80, by_magnitude=by_magnitude)[0]
        return top(True), top(False)

    values, values_desc = both(mlp_problem.params)
    np.testing.assert_allclose(np.asarray(values)[0], eigenvalues.min(), rtol=1e-3)
    np.testing.assert_allclose(float(values_desc[0]), eigenvalues.max(), rtol=1e-2,
                               atol=1e-3 * np.abs(eigenvalues).max())


def test_slq_moments_match_exact_spectral_moments(mlp_problem):
    """A full-dimension run is exact Gauss quadrature: moments up to 2m-1 are exact per probe;
    averaged over probes, E[v^T H^k v] = tr(H^k)/n."""
    dense = mlp_problem.dense_hessian()
    n = dense.shape[0]
    eigenvalues = np.linalg.eigvalsh(dense)
    result = spectral_density(mlp_problem.loss, mlp_problem.params, key=jax.random.key(0),
                              num_iters=90, num_probes=16, grid_size=2000)
    nodes, weights = np.asarray(result.nodes, np.float64), np.asarray(result.weights, np.float64)
    for k in (1, 2, 3):
        slq = np.mean(np.sum(weights * nodes ** k, axis=1))
        exact = np.mean(eigenvalues ** k)
        # Monte-Carlo error of 16 Gaussian probes: std(v^T H^k v)/||v||^2 ~ sqrt(2/n) * rms.
        tolerance = 4 * np.sqrt(2.0 / n) * np.sqrt(np.mean(eigenvalues ** (2 * k))) / 4
        assert abs(slq - exact) < tolerance, (k, slq, exact, tolerance)
    assert result.density.shape == (2000,)
    np.testing.assert_allclose(float(jnp.trapezoid(result.density, result.grid)), 1.0, rtol=1e-5)
    assert float(result.grid[0]) < eigenvalues.min() and float(result.grid[-1]) > eigenvalues.max()


def test_hutchinson_trace_within_standard_error(conv_problem):
    exact = np.trace(conv_problem.dense_hessian())
    estimate, stderr = hessian_trace(conv_problem.loss, conv_problem.params,
                                     key=jax.random.key(3), num_samples=400, batch_size=100)
    assert float(stderr) > 0
    assert abs(float(estimate) - exact) < 4 * float(stderr)


def test_epsilon_count_and_smoothed_fraction(mlp_problem):
    dense = mlp_problem.dense_hessian()
    eigenvalues = np.linalg.eigvalsh(dense)
    n = len(eigenvalues)
    # eps in the middle of the widest gap between consecutive |eigenvalues| in the bulk, so the
    # count is unambiguous; the eigenvalues come from a full-dimension Lanczos run.
    magnitudes = np.sort(np.abs(eigenvalues))
    i = n // 4 + int(np.argmax(np.diff(magnitudes[n // 4: 3 * n // 4])))
    eps = float(magnitudes[i] + magnitudes[i + 1]) / 2
    assert magnitudes[i + 1] - magnitudes[i] > 1e-5 * magnitudes[-1]
    ritz_values, _ = jax.jit(lambda q: top_eigenvalues(mlp_problem.loss, q, n,
                                                       key=jax.random.key(2), num_iters=n))(
        mlp_problem.params)
    assert int(epsilon_count(ritz_values, eps)) == int(np.sum(np.abs(eigenvalues) > eps))
    # The paper code's smoothed measure: on an exactly known measure (all eigenvalues as nodes,
    # equal weights) and a narrow kernel, the smoothed mass outside [-eps, eps] equals the
    # fraction of eigenvalues there; it agrees with integrating a finely gridded density.
    grid = jnp.linspace(eigenvalues.min() - 0.01, eigenvalues.max() + 0.01, 50_000)
    variance = 1e-8
    density = jnp.mean(jnp.exp(-(grid[:, None] - eigenvalues[None, :]) ** 2 / (2 * variance)),
                       axis=1) / np.sqrt(2 * np.pi * variance)
    spectrum = SpectralDensity(grid, density, jnp.asarray(eigenvalues)[None],
                               jnp.full((1, n), 1.0 / n), jnp.asarray(variance))
    fraction = float(smoothed_epsilon_rank(spectrum, eps)[0])
    np.testing.assert_allclose(fraction, np.mean(np.abs(eigenvalues) > eps), atol=1e-3)
    gridded = float(jnp.trapezoid(jnp.where(jnp.abs(grid) > eps, density, 0.0), grid))
    np.testing.assert_allclose(fraction, gridded, atol=5e-3)


def test_fast_threshold_formula():
    np.testing.assert_allclose(float(fast_threshold(0.01, 100, 0.5)),
                               (1 - 0.5 ** (1 / 100)) / 0.01, rtol=1e-6)
    # A direction exactly at the threshold shrinks by exactly gamma in K steps.
    lam = float(fast_threshold(0.1, 10, 0.2))
    np.testing.assert_allclose((1 - 0.1 * lam) ** 10, 0.2, rtol=1e-5)


def test_tau_trainability_matches_dense_projection(mlp_problem):
    p = mlp_problem
    dense = p.dense_hessian()
    eigenvalues, eigenvectors = np.linalg.eigh(dense)
    gradient = jax.grad(p.loss)(p.params)
    g = np.asarray(ravel_pytree(gradient)[0], np.float64)
    # One compilation: the step size and budget are traced.
    tau = jax.jit(lambda lr, steps: tau_trainability(p.loss, p.params, learning_rate=lr,
                                                     steps=steps, gamma=0.5,
                                                     num_iters=dense.shape[0]))
    for lr, steps in ((1.0, 10), (0.1, 50)):
        threshold = (1 - 0.5 ** (1 / steps)) / lr
        fast = eigenvalues >= threshold
        expected = np.sum((eigenvectors[:, fast].T @ g) ** 2) / (g @ g)
        fraction, used = tau(jnp.float32(lr), jnp.float32(steps))
        np.testing.assert_allclose(float(used), threshold, rtol=1e-6)
        np.testing.assert_allclose(float(fraction), expected, atol=2e-3)


def test_dataset_operator_drives_every_spectral_function(mlp_problem):
    """The chunked data operator gives the full-batch spectrum (jit over the whole call)."""
    p = mlp_problem
    exact = np.linalg.eigvalsh(p.dense_hessian())

    @jax.jit
    def top(params):
        op = dataset_operator(p.apply, cross_entropy, params, (p.inputs, p.labels),
                              chunk_size=24)
        return top_eigenvalues(op, k=1, key=jax.random.key(0), num_iters=60)[0]

    np.testing.assert_allclose(float(top(p.params)[0]), exact.max(), rtol=1e-3)


@pytest.mark.slow  # the operators it vmaps are vmapped in test_curvature_operators
def test_vmapped_over_seeds(mlp_problem):
    p = mlp_problem
    stacked = jax.vmap(lambda k: p.model.init(k, p.inputs)["params"])(
        jax.random.split(jax.random.key(5), 2))
    density = lambda params: spectral_density(p.loss, params, key=jax.random.key(0),
                                              num_iters=20, grid_size=500).density
    batched = jax.jit(jax.vmap(density))(stacked)
    single = jax.jit(density)(jax.tree.map(lambda x: x[1], stacked))
    np.testing.assert_allclose(batched[1], single, rtol=1e-3, atol=1e-3 * float(single.max()))


def test_bad_arguments_are_named(mlp_problem):
    p = mlp_problem
    with pytest.raises(ValueError, match="k must be between 1 and num_iters=10"):
        top_eigenvalues(p.loss, p.params, 11, key=jax.random.key(0), num_iters=10)
    with pytest.raises(ValueError, match="params is required"):
        top_eigenvalues(p.loss, k=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="must return a scalar"):
        spectral_density(lambda q: cross_entropy(p.apply(q, p.inputs)[0], p.labels), p.params,
                         key=jax.random.key(0))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        epsilon_count(jnp.ones(3), -1.0)
    with pytest.raises(ValueError, match="gamma must lie in"):
        fast_threshold(0.1, 10, 1.5)
    with pytest.raises(ValueError, match="pass gradient="):
        op = dataset_operator(p.apply, cross_entropy, p.params, (p.inputs, p.labels))
        tau_trainability(op, learning_rate=0.1, steps=10)
