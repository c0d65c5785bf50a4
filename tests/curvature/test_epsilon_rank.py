"""The epsilon-rank estimate and its bounds against dense jax.hessian + numpy eigh (float64).

Models: a ReLU MLP and a ReLU ConvNet, each fresh, trained, and collapsed (most hidden units
dead, so the Hessian has an exact null space). For eps from 1e-3 to 1e-1:

- each probe's exact spectral measure outside [-eps, eps] (from the probe vector and the dense
  eigenvectors) lies inside that probe's bounds: the Chebyshev-Markov-Stieltjes bounds are
  certain, so this must hold in every case;
- the exact fraction lies inside the interval (bounds averaged over probes +- 2 standard errors);
- where the bounds resolve eps (width <= RESOLVED), the estimate is within 0.02 of the exact
  fraction.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature import (
    EPSILON_RANK_COLUMNS,
    CurvatureOperator,
    SpectralDensity,
    epsilon_count,
    epsilon_rank,
    epsilon_rank_bounds,
    epsilon_rank_record,
    fast_fraction_bounds,
    smoothed_epsilon_rank,
    spectral_density,
)

from .conftest import cross_entropy

EPS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
NUM_ITERS, NUM_PROBES = 40, 16
RESOLVED = 0.02  # bounds at most this wide: eps is resolved (docs/MEASURING.md)
ROUNDING = 1e-4  # float32 Lanczos: the bounds hold up to rounding
# Jitted once per shape: the bounds' Lanczos and eigh run eagerly op by op otherwise.
_bounds, _rank = jax.jit(epsilon_rank_bounds), jax.jit(epsilon_rank)
_smoothed, _fast = jax.jit(smoothed_epsilon_rank), jax.jit(fast_fraction_bounds)


class ReluMLP(nn.Module):
    """8 -> 16 -> 16 -> 4 with ReLU (484 parameters)."""

    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = nn.relu(nn.Dense(16, name=f"hidden_{i}")(x))
        return nn.Dense(4, name="head")(x), {}


class ReluConvNet(nn.Module):
    """6x6x2 -> conv 3x3x4 -> ReLU -> pool -> dense 8 -> ReLU -> head 3 (259 parameters)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="conv_0")(x))
        h = nn.max_pool(h, (2, 2), (2, 2)).reshape((x.shape[0], -1))
        h = nn.relu(nn.Dense(8, name="hidden_0")(h))
        return nn.Dense(3, name="head")(h), {}


def _train(loss, params, steps=300, learning_rate=0.05):
    tx = optax.sgd(learning_rate)

    def step(carry, _):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s)
        return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]


def _kill(params, layers, fraction=0.75):
    """Most units of ``layers`` dead on every input: a large negative bias (as after collapse)."""
    params = jax.tree.map(lambda x: x, params)
    for name in layers:
        bias = params[name]["bias"]
        dead = jnp.arange(bias.shape[0]) < int(fraction * bias.shape[0])
        params[name] = {**params[name], "bias": jnp.where(dead, -100.0, bias)}
    return params


def _case(model_name, state):
    key_x, key_y, key_p = jax.random.split(jax.random.key(11), 3)
    if model_name == "mlp":
        model, inputs, classes = ReluMLP(), jax.random.normal(key_x, (64, 8)), 4
        layers = ("hidden_0", "hidden_1")
    else:
        model, inputs, classes = ReluConvNet(), jax.random.normal(key_x, (24, 6, 6, 2)), 3
        layers = ("conv_0", "hidden_0")
    labels = jax.random.randint(key_y, (inputs.shape[0],), 0, classes)
    params = model.init(key_p, inputs)["params"]
    loss = lambda p: jnp.mean(cross_entropy(model.apply({"params": p}, inputs)[0], labels))
    if state != "fresh":
        params = jax.jit(lambda p: _train(loss, p))(params)
    if state == "collapsed":
        params = _kill(params, layers)
    flat, unravel = ravel_pytree(params)
    hessian = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
    return loss, params, hessian


@jax.jit
def _per_probe_bounds(density, eps):
    """Each probe's bounds (a density holding that probe twice) at each eps: (probes, eps)."""

    def one(i, e):
        rows = jnp.stack([i, i])
        single = density._replace(nodes=density.nodes[rows], weights=density.weights[rows])
        bounds = _bounds(single, e)
        return bounds.lower, bounds.upper

    probes = jnp.arange(density.nodes.shape[0])
    return jax.vmap(lambda i: jax.vmap(lambda e: one(i, e))(eps))(probes)


@jax.jit
def _averaged(density, eps):
    bounds = jax.vmap(lambda e: epsilon_rank_bounds(density, e))(eps)
    lo, hi = jax.vmap(lambda e: epsilon_rank_bounds(density, e).interval())(eps)
    return bounds, lo, hi


@pytest.mark.parametrize("model_name", ["mlp", "conv"])
@pytest.mark.parametrize("state", ["fresh", "trained", "collapsed"])
def test_exact_fraction_inside_bounds_and_estimate_close_when_resolved(model_name, state):
    loss, params, hessian = _case(model_name, state)
    eigenvalues, vectors = np.linalg.eigh(hessian)
    n = len(eigenvalues)
    key = jax.random.key(3)
    density = jax.jit(lambda p: spectral_density(loss, p, key=key, num_iters=NUM_ITERS,
                                                 num_probes=NUM_PROBES, grid_size=200))(params)
    # The probes spectral_density draws (one key per probe, as it splits them).
    probes = np.stack([np.asarray(jax.random.normal(k, (n,)), np.float64)
                       for k in jax.random.split(key, NUM_PROBES)])
    components = (probes @ vectors) ** 2
    components /= components.sum(axis=1, keepdims=True)
    eps = jnp.asarray(EPS, jnp.float32)
    outside = np.abs(eigenvalues)[None, :] > np.asarray(EPS)[:, None]  # (eps, n)
    per_probe_exact = components @ outside.T  # (probes, eps)
    lower, upper = (np.asarray(b) for b in _per_probe_bounds(density, eps))
    assert np.all(lower <= per_probe_exact + ROUNDING), (lower - per_probe_exact).max()
    assert np.all(per_probe_exact <= upper + ROUNDING), (per_probe_exact - upper).max()

    bounds, lo, hi = _averaged(density, eps)
    exact = outside.mean(axis=1)
    assert np.all((np.asarray(lo) <= exact + ROUNDING) & (exact <= np.asarray(hi) + ROUNDING))
    estimate = np.asarray(bounds.estimate)
    np.testing.assert_allclose(estimate, [float(_rank(density, e)) for e in EPS],
                               atol=1e-6)
    # The Gauss rule is one measure with the probes' moments: the estimate is inside the bounds.
    assert np.all((np.asarray(bounds.lower) <= estimate + ROUNDING)
                  & (estimate <= np.asarray(bounds.upper) + ROUNDING))
    resolved = np.asarray(bounds.upper - bounds.lower) <= RESOLVED
    if state == "collapsed":  # an exact null space and a gap: eps 0.03 and 0.1 are resolved
        assert resolved[-2:].all(), np.asarray(bounds.upper - bounds.lower)
    assert np.all(np.abs(estimate - exact)[resolved] <= 0.02), (estimate, exact, resolved)
    # Probe variance: Var = 2 p (1 - p) / (n + 2) for Gaussian probes (a Beta law).
    expected_se = np.sqrt(2 * exact * (1 - exact) / (n + 2) / NUM_PROBES)
    np.testing.assert_allclose(np.asarray(bounds.standard_error)[resolved],
                               expected_se[resolved], rtol=0.6, atol=2e-3)


def _diagonal(values):
    values = jnp.asarray(values, jnp.float32)
    return CurvatureOperator(matvec=lambda x: values * x, dim=values.shape[0],
                             unravel=lambda x: x, params=values)


def test_mass_at_exactly_zero_lies_inside_not_the_kernel_tail():
    # 70% of the eigenvalues exactly 0, the rest at 1 and -0.5: Lanczos exhausts the three-
    # dimensional Krylov space, so each probe's measure is known exactly.
    values = np.concatenate([np.zeros(700), np.ones(200), np.full(100, -0.5)])
    density = jax.jit(lambda: spectral_density(_diagonal(values), key=jax.random.key(0),
                                               num_iters=10, num_probes=8, grid_size=500))()
    per_probe = np.sum(np.where(np.abs(np.asarray(density.nodes)) > 0.01,
                                np.asarray(density.weights), 0.0), axis=1)
    bounds = _bounds(density, 0.01)
    np.testing.assert_allclose(float(bounds.lower), per_probe.mean(), atol=1e-5)
    np.testing.assert_allclose(float(bounds.upper), per_probe.mean(), atol=1e-5)
    assert abs(float(_rank(density, 0.01)) - 0.3) < 3 * float(bounds.standard_error)
    # The smoothed measure adds the zero node's kernel tail: 0.7 x 2 (1 - Phi(eps / sigma)).
    smoothed, sigma, tail = _smoothed(density, 0.01)
    # sigma^2 = 1e-5 x spectral width 1.5: eps / sigma = 2.58, a tail of about 0.01 per unit mass
    np.testing.assert_allclose(float(tail), 2 * (1 - jax.scipy.stats.norm.cdf(0.01 / sigma)),
                               rtol=1e-4)
    assert float(tail) > 0.005
    np.testing.assert_allclose(float(smoothed), per_probe.mean() + 0.7 * float(tail), atol=2e-3)
    # All the mass at zero: outside is exactly 0 (bounds included); smoothed is the tail itself.
    zero = jax.jit(lambda: spectral_density(_diagonal(np.zeros(50)), key=jax.random.key(1),
                                            num_iters=5, num_probes=2, grid_size=100))()
    assert float(_rank(zero, 0.01)) == 0.0
    assert float(_bounds(zero, 0.01).upper) == 0.0
    smoothed, sigma, tail = _smoothed(zero, 0.01)
    np.testing.assert_allclose(float(smoothed), float(tail), rtol=1e-4)
    np.testing.assert_allclose(float(tail), 2 * (1 - jax.scipy.stats.norm.cdf(0.01 / sigma)),
                               rtol=1e-4)


def test_gauss_radau_bounds_on_a_known_measure():
    """A continuous spectrum (uniform on [-1, 3], 2,000 eigenvalues), far from exhausted by 12
    steps: the bounds contain the probes' exact mass and are no wider than twice the largest
    weight near +-eps (the Christoffel function is at most the neighbouring weights)."""
    values = np.linspace(-1.0, 3.0, 2000)
    key = jax.random.key(4)
    density = spectral_density(_diagonal(values), key=key, num_iters=12, num_probes=4,
                               grid_size=100)
    probes = np.stack([np.asarray(jax.random.normal(k, (2000,)), np.float64)
                       for k in jax.random.split(key, 4)])
    weights = probes ** 2 / np.sum(probes ** 2, axis=1, keepdims=True)
    for eps in (0.05, 0.5, 1.3):
        exact = np.mean(np.sum(weights * (np.abs(values) > eps), axis=1))
        bounds = _bounds(density, eps)
        assert float(bounds.lower) - 1e-5 <= exact <= float(bounds.upper) + 1e-5
        assert float(bounds.upper - bounds.lower) < 0.5
        threshold = eps + 0.2
        exact_fast = np.mean(np.sum(weights * (values >= threshold), axis=1))
        fast = _fast(density, threshold)
        assert float(fast.lower) - 1e-5 <= exact_fast <= float(fast.upper) + 1e-5
        assert float(fast.lower) <= float(fast.estimate) <= float(fast.upper)


@pytest.mark.parametrize("values, num_iters", [
    # four distinct eigenvalues: 4 Lanczos steps exhaust the Krylov space (exact quadrature)
    (np.concatenate([np.zeros(700), np.ones(150), np.full(100, -0.5), np.full(50, 2.0)]), 6),
    # a continuous spectrum, far from exhausted: the bounds carry the quadrature error
    (np.linspace(-1.0, 3.0, 1000), 12)])
def test_one_probe_interval_covers_the_exact_fraction_at_its_level(values, num_iters):
    """400 single-probe measurements of a known spectrum, at eps 0.3 (a fraction outside of 0.3
    and 0.85): the one-probe standard error (the Beta law of a Gaussian probe's mass) is the
    spread of the one-probe estimates when the quadrature is exact, and the one-probe intervals
    cover the exact fraction about 95% of the time (2 standard errors), or more where the
    certain bounds add the quadrature's slack."""
    eps, trials = 0.3, 400
    exact = float(np.mean(np.abs(values) > eps))

    @jax.jit
    def measure(key):
        density = spectral_density(_diagonal(values), key=key, num_iters=num_iters,
                                   num_probes=1, grid_size=20)
        bounds = epsilon_rank_bounds(density, eps)
        return bounds.estimate, bounds.standard_error, *bounds.interval()

    estimate, se, lo, hi = (np.asarray(a) for a in jax.lax.map(
        measure, jax.random.split(jax.random.key(5), trials)))
    np.testing.assert_allclose(se, np.sqrt(2 * 0.25 / (len(values) + 2)), rtol=0.35)
    coverage = np.mean((lo <= exact) & (exact <= hi))
    if num_iters == 6:  # exact quadrature: the spread is the probes' alone
        np.testing.assert_allclose(np.std(estimate, ddof=1), np.mean(se), rtol=0.12)
        np.testing.assert_allclose(np.mean(estimate), exact, atol=3 * np.mean(se) / 20)
        assert 0.92 <= coverage <= 0.99, coverage
    else:
        assert coverage >= 0.95, coverage


def test_record_holds_every_column_consistently(mlp_problem):
    density = spectral_density(mlp_problem.loss, mlp_problem.params, key=jax.random.key(0),
                               num_iters=20, num_probes=4, grid_size=300)
    record = epsilon_rank_record(density, 0.05)
    assert tuple(record) == EPSILON_RANK_COLUMNS
    bounds = _bounds(density, 0.05)
    lo, hi = bounds.interval()
    np.testing.assert_allclose(
        [float(record[k]) for k in ("epsilon_rank", "epsilon_rank_lo", "epsilon_rank_hi",
                                     "epsilon_rank_se")],
        [float(bounds.estimate), float(lo), float(hi), float(bounds.standard_error)], rtol=1e-6)
    assert float(lo) <= float(record["epsilon_rank"]) <= float(hi)
    smoothed, _, tail = _smoothed(density, 0.05)
    np.testing.assert_allclose(float(record["epsilon_rank_smoothed"]), float(smoothed))
    np.testing.assert_allclose(float(record["epsilon_rank_smoothing_sigma"]),
                               float(jnp.sqrt(density.variance)))
    np.testing.assert_allclose(float(record["epsilon_rank_kernel_tail"]), float(tail))


def test_epsilon_count_and_smoothed_rank_on_known_values():
    values = jnp.asarray([-0.2, -0.01, 0.0, 0.005, 0.01, 0.3])
    assert int(epsilon_count(values, 0.01)) == 2  # strictly outside
    assert int(epsilon_count(values.reshape(2, 3), 0.0)) == 5
    # One node at 0 with the kernel's variance: the smoothed mass is the kernel's tail.
    sigma = 0.004
    density = SpectralDensity(grid=jnp.zeros(2), density=jnp.zeros(2), nodes=jnp.zeros((2, 2)),
                              weights=jnp.asarray([[1.0, 0.0], [1.0, 0.0]]),
                              variance=jnp.asarray(sigma ** 2))
    smoothed, _, tail = _smoothed(density, 0.01)
    expected = 2 * (1 - jax.scipy.stats.norm.cdf(0.01 / sigma))
    np.testing.assert_allclose([float(smoothed), float(tail)], [expected, expected], rtol=1e-5)
    assert float(_rank(density, 0.01)) == 0.0


def test_bad_input_gets_clear_errors(mlp_problem):
    density = spectral_density(mlp_problem.loss, mlp_problem.params, key=jax.random.key(0),
                               num_iters=5, num_probes=2, grid_size=50)
    for function in (epsilon_rank, epsilon_rank_bounds, smoothed_epsilon_rank,
                     epsilon_rank_record):
        with pytest.raises(ValueError, match="eps must be non-negative"):
            function(density, -0.1)
        with pytest.raises(ValueError, match="eps must be non-negative, got nan"):
            function(density, float("nan"))
    with pytest.raises(ValueError, match="eps must be non-negative"):
        epsilon_count(jnp.ones(3), -1.0)
    with pytest.raises(ValueError, match="eps must be a scalar"):
        epsilon_rank(density, jnp.ones(2))
    grid_only = density._replace(nodes=None, weights=None)
    with pytest.raises(ValueError, match="needs the density's quadrature nodes and weights"):
        epsilon_rank_bounds(grid_only, 0.01)
    with pytest.raises(TypeError, match="count eigenvalues with epsilon_count"):
        epsilon_rank(jnp.ones(3), 0.01)
    single_node = spectral_density(mlp_problem.loss, mlp_problem.params, key=jax.random.key(0),
                                   num_iters=1, num_probes=2, grid_size=50)
    with pytest.raises(ValueError, match="at least 2 Ritz nodes"):
        epsilon_rank_bounds(single_node, 0.01)
    one_probe = density._replace(nodes=density.nodes[:1], weights=density.weights[:1])
    assert float(epsilon_rank_bounds(one_probe, 0.01).standard_error) > 0  # dim is known
    with pytest.raises(ValueError, match="single probe needs the operator's dimension"):
        epsilon_rank_bounds(one_probe._replace(dim=None), 0.01)
    with pytest.raises(ValueError, match="threshold must be non-negative"):
        fast_fraction_bounds(density, -1.0)
