"""The claims' statistics on synthetic results tables whose answer is known by construction."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectral_plasticity import claims


def _table(seeds, tasks, columns, diverged_seed=None):
    """A results table: one row per (seed, task), ``columns[name](seed, task)`` values."""
    rows = [{"run": i, "seed": s, "task": t, **{k: f(s, t) for k, f in columns.items()},
             "diverged": s == diverged_seed}
            for i, s in enumerate(seeds) for t in range(tasks)]
    return pd.DataFrame(rows)


def test_t_interval_matches_scipy():
    x = np.array([0.3, -0.1, 0.5, 0.2, 0.4])
    i = claims.t_interval(x)
    ref = stats.ttest_1samp(x, 0.0)
    low, high = ref.confidence_interval(0.95)
    assert i.n == 5 and i.p == pytest.approx(ref.pvalue)
    assert (i.low, i.high) == pytest.approx((low, high))
    assert np.isnan(claims.t_interval([1.0]).low)


def test_seed_averaging_removes_per_seed_noise_that_cancels_over_seeds():
    # y = x + d_s where d sums to zero over seeds at every task: averaged, the line is exact;
    # per seed it is not. The first task and the diverged seed are left out.
    d = {0: 1.0, 1: -1.0, 2: 0.0}
    cols = {"erank": lambda s, t: np.sin(t),
            "acc": lambda s, t: np.sin(t) + d[s % 3] * np.cos(3 * t) if s < 3 else 99.0}
    tables = {"bp": _table(range(4), 12, cols, diverged_seed=3)}
    pts = claims.points(tables, "erank", "acc", "task")
    assert set(pts["seed"]) == {0, 1, 2} and pts["row"].min() == 1
    assert claims.r2_seed_averaged(pts).r2 == pytest.approx(1.0)
    per_seed, r = claims.r2_per_seed(pts)
    assert per_seed.set_index("seed").loc[2, "r2"] == pytest.approx(1.0)
    assert per_seed.set_index("seed").loc[0, "r2"] < 0.9 and r.n == 3
    ref = stats.linregress(pts.loc[pts.seed == 0, "x"], pts.loc[pts.seed == 0, "y"])
    assert per_seed.set_index("seed").loc[0, "r"] == pytest.approx(ref.rvalue)


def test_epsilon_rank_from_quadrature_and_from_the_smoothed_density():
    nodes = np.array([[[[0.0, 0.005, 0.5], [0.0, 0.02, 2.0]]]])  # (runs, rows, probes, steps)
    weights = np.array([[[[0.5, 0.2, 0.3], [0.6, 0.1, 0.3]]]])
    ranks = claims.epsilon_rank_at({claims.NODES: nodes, claims.WEIGHTS: weights},
                                   [0.001, 0.01, 1.0], smoothed=False)
    np.testing.assert_allclose(ranks[0, 0], [(0.5 + 0.4) / 2, (0.3 + 0.4) / 2, 0.3 / 2])
    # A smoothed density of two Gaussians: the mass outside [-eps, eps] in closed form.
    grid = np.linspace(-3, 3, 60_001)
    sigma, w, mu = 0.05, np.array([0.7, 0.3]), np.array([0.0, 1.0])
    density = (w[:, None] * stats.norm.pdf(grid, mu[:, None], sigma)).sum(0)
    arrays = {claims.DENSITY: density[None, None], claims.DENSITY_GRID: grid}
    eps = np.array([0.01, 0.1])
    got = claims.epsilon_rank_at(arrays, eps, smoothed=True)[0, 0]
    inside = (w[:, None] * (stats.norm.cdf(eps, mu[:, None], sigma)
                            - stats.norm.cdf(-eps, mu[:, None], sigma))).sum(0)
    np.testing.assert_allclose(got, 1 - inside, atol=1e-6)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        claims.epsilon_rank_at(arrays, [-0.1], smoothed=True)


def test_r2_over_eps_peaks_at_the_eps_that_drives_performance_and_is_chosen():
    rng = np.random.default_rng(0)
    runs, tasks, probes, steps = 4, 10, 2, 20
    nodes = rng.lognormal(-3, 1.5, (runs, tasks, probes, steps))
    weights = np.full(nodes.shape, 1.0 / steps)
    arrays = {claims.NODES: nodes, claims.WEIGHTS: weights}
    truth = claims.epsilon_rank_at(arrays, [0.05], smoothed=False)[..., 0]
    table = _table(range(runs), tasks, {"acc": lambda s, t: truth[s, t]})
    eps = [0.005, 0.05, 0.5]
    ranks = claims.epsilon_rank_at(arrays, eps, smoothed=False)
    curve = claims.r2_over_eps({"bp": table}, {"bp": ranks}, eps, "acc", "task")
    assert curve.set_index("eps").loc[0.05, "r2"] == pytest.approx(1.0)
    assert curve["r2"].drop(index=1).max() < 0.9
    assert claims.choose_eps(curve) == 0.05
    with pytest.raises(ValueError, match="no eps resolved by the measurement gives a positive"):
        claims.choose_eps(curve.assign(r=-curve["r"].abs()))
    # An eps the measurement does not resolve is never chosen, whatever its R^2.
    unresolved = curve.assign(half_width=np.where(curve["eps"] == 0.05, 0.2, 0.01))
    assert claims.choose_eps(unresolved) != 0.05


def test_resolution_is_the_half_width_of_the_estimates_interval():
    import jax

    from spectral_plasticity.curvature import (
        CurvatureOperator,
        epsilon_rank_bounds,
        spectral_density,
    )

    values = jax.numpy.asarray(np.linspace(-0.2, 3.0, 400) ** 3, jax.numpy.float32)
    op = CurvatureOperator(matvec=lambda x: values * x, dim=400, unravel=lambda x: x,
                           params=values)
    densities = [spectral_density(op, key=jax.random.key(k), num_iters=12, num_probes=2,
                                  grid_size=100) for k in range(2)]
    nan = np.full((2, 12), np.nan)
    arrays = {claims.NODES: np.stack([[d.nodes for d in densities], [nan, nan]]),
              claims.WEIGHTS: np.stack([[d.weights for d in densities], [nan, nan]])}
    table = pd.DataFrame({claims.DIM: [np.nan, 400.0, 400.0]})
    got = claims.resolution_at(arrays, [0.01, 0.5], claims.recorded_dim(table))
    # Results recorded before the dimension was: the standard error over the 2 probes.
    legacy = claims.resolution_at(arrays, [0.01, 0.5], claims.recorded_dim(pd.DataFrame()))
    assert got.shape == legacy.shape == (2, 2, 2) and np.all(np.isnan(got[1]))
    bounds = jax.jit(epsilon_rank_bounds)
    for k, density in enumerate(densities):
        for j, eps in enumerate((0.01, 0.5)):
            for half_width, dim in ((got, density.dim), (legacy, None)):
                lo, hi = bounds(density._replace(dim=dim), eps).interval()
                np.testing.assert_allclose(half_width[0, k, j], (float(hi) - float(lo)) / 2,
                                           rtol=1e-5)
    assert np.all((got[0] > 0) & (got[0] <= 0.5))


def _lead_lag_tables(erank_first: bool, seeds=6, tasks=40):
    """e drives the next a (erank_first) or a drives the next e, with innovations."""
    tables = {}
    for method, scale in (("bp", 1.0), ("l2", 0.5)):
        rows = []
        for s in range(seeds):
            rng = np.random.default_rng(100 * s + int(scale * 10))
            e, a = np.zeros(tasks), np.zeros(tasks)
            for t in range(1, tasks):
                shock_e, shock_a = rng.normal(0, 1, 2)
                if erank_first:
                    e[t] = 0.5 * e[t - 1] + shock_e
                    a[t] = 0.5 * a[t - 1] + 0.8 * e[t - 1] + 0.3 * shock_a
                else:
                    a[t] = 0.5 * a[t - 1] + shock_a
                    e[t] = 0.5 * e[t - 1] + 0.8 * a[t - 1] + 0.3 * shock_e
            rows += [{"seed": s, "task": t, "erank": e[t] * scale, "acc": a[t] * scale,
                      "diverged": False} for t in range(tasks)]
        tables[method] = pd.DataFrame(rows)
    return tables


def test_lead_lag_tells_which_series_moves_first():
    forward = claims.lead_lag(_lead_lag_tables(True), "erank", "acc", "task")
    assert forward.lead.n == 6 and forward.lead.low > 0.5
    assert abs(forward.lag.mean) < 0.2 and forward.difference.low > 0
    backward = claims.lead_lag(_lead_lag_tables(False), "erank", "acc", "task")
    assert backward.lag.low > 0.5 and backward.difference.high < 0


def test_predictive_power_ranks_the_signal_that_drives_the_next_tasks_first():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1, (5, 30))
    driver = rng.uniform(0, 1, (5, 30))
    # Performance at task t is driven by the weight norm at the end of task t - 1; the
    # epsilon-rank (measured at every other task's start) is unrelated noise.
    cols = {"acc": lambda s, t: driver[s, t - 1] if t else 0.5,
            "weight_norm": lambda s, t: driver[s, t],
            "erank": lambda s, t: noise[s, t] if t % 2 == 0 else np.nan,
            "effective_rank/h0": lambda s, t: noise[s, t] + driver[s, t],
            "effective_rank/h1": lambda s, t: noise[s, t] - driver[s, t]}
    tables = {"bp": _table(range(5), 30, cols)}
    signals = {"epsilon-rank": "erank", "weight norm": "weight_norm",
               "effective rank": "effective_rank/"}
    per_seed, intervals = claims.predictive_power(
        tables, signals, at_end=("weight norm", "effective rank"), performance="acc",
        row="task", horizon=1)
    assert len(per_seed) == 5
    assert per_seed["weight norm"].to_numpy() == pytest.approx(np.ones(5))
    # the layer mean of effective rank is the noise alone: as unrelated as the epsilon-rank
    assert intervals["weight norm"].mean > max(intervals["epsilon-rank"].high,
                                               intervals["effective rank"].high)
    # horizon 2: the mean of tasks t and t+1, the first of which the weight norm fixes
    _, two = claims.predictive_power(tables, signals, ("weight norm", "effective rank"), "acc",
                                     "task", horizon=2)
    assert 0.2 < two["weight norm"].mean < 0.9
