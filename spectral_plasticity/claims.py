"""Statistics of the paper's claims over results tables, with intervals over seeds.

Pure functions over the ``results.csv`` tables of a study (``{method: DataFrame}`` with the
columns ``seed``, the row index (``task`` / ``phase``), the performance metric, the curvature
and feature metrics, and ``diverged``). A seed is the unit of replication: every interval is a
95% Student-t interval over seeds (or Fisher-z for one pooled correlation), never over rows
of one run as if they were independent.

- ``r2_seed_averaged`` / ``r2_per_seed``: claim 2, R^2 of performance on the epsilon-rank at
  new-task initialization, seeds averaged as the paper does and per seed;
- ``epsilon_rank_at``, ``r2_over_eps`` and ``choose_eps``: the curve of R^2 over eps from the
  recorded spectra, and eps chosen on tuning seeds before the evaluation runs;
- ``lead_lag``: does a fall in epsilon-rank come *before* a fall in performance?
- ``predictive_power``: which signal at a task's start best predicts the next tasks'
  performance (epsilon-rank, feature effective rank, dormant fraction, weight norm)?
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
# Arrays of a run (``train.results.load_arrays``) from which epsilon-ranks at any eps follow:
# Ritz values and weights per probe (the quadrature; the unbiased estimate), and the smoothed
# density on its grid (the paper's measure).
NODES, WEIGHTS = "ritz_nodes_init", "ritz_weights_init"
DIM = "curvature_dim_init"
DENSITY, DENSITY_GRID = "density_init", "density_grid"
# An eps is resolved when the estimate's interval half-width there is at most this (median over
# the measured tasks): the target of docs/MEASURING.md.
RESOLUTION = 0.03


class Interval(NamedTuple):
    """Mean over ``n`` seeds with its 95% Student-t interval and the two-sided p of mean 0."""

    n: int
    mean: float
    low: float
    high: float
    p: float


def t_interval(values: Sequence[float] | np.ndarray) -> Interval:
    """Mean, 95% Student-t interval and one-sample t-test p (against 0) of finite ``values``."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        mean = float(x.mean()) if n else float("nan")
        return Interval(n, mean, float("nan"), float("nan"), float("nan"))
    mean, sem = float(x.mean()), float(x.std(ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sem
    p = float(stats.ttest_1samp(x, 0.0).pvalue) if sem > 0 else (0.0 if mean else 1.0)
    return Interval(n, mean, mean - half, mean + half, p)


def points(tables: Mapping[str, pd.DataFrame], x: str, y: str, row: str,
           skip_first: bool = True) -> pd.DataFrame:
    """Rows where both ``x`` and ``y`` are finite, of runs that did not diverge, as a table of
    ``method, seed, row, x, y``; ``skip_first`` drops the first row (the untrained network)."""
    parts = []
    for method, table in tables.items():
        if x not in table or y not in table:
            continue
        keep = np.isfinite(table[x]) & np.isfinite(table[y]) & ~table["diverged"].astype(bool)
        if skip_first:
            keep &= table[row] > table[row].min()
        part = table.loc[keep, ["seed", row, x, y]].set_axis(["seed", "row", "x", "y"], axis=1)
        parts.append(part.assign(method=method))
    if not parts:
        return pd.DataFrame(columns=["method", "seed", "row", "x", "y"])
    return pd.concat(parts, ignore_index=True)[["method", "seed", "row", "x", "y"]]


class Fit(NamedTuple):
    """A least-squares line ``y ~ x``: R^2, Pearson r with its Fisher-z 95% interval, slope,
    its p and the number of points."""

    r2: float
    r: float
    low: float
    high: float
    slope: float
    p: float
    n: int


def fit(x: np.ndarray, y: np.ndarray) -> Fit:
    """``Fit`` of finite pairs; NaN fields with fewer than 3 points or a constant variable."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return Fit(nan, nan, nan, nan, nan, nan, len(x))
    line = stats.linregress(x, y)
    r = float(line.rvalue)
    z = np.arctanh(np.clip(r, -0.999999, 0.999999))
    half = stats.norm.ppf(1 - ALPHA / 2) / np.sqrt(max(len(x) - 3, 1))
    return Fit(r * r, r, float(np.tanh(z - half)), float(np.tanh(z + half)),
               float(line.slope), float(line.pvalue), len(x))


def r2_seed_averaged(pts: pd.DataFrame) -> Fit:
    """The paper's R^2: ``x`` and ``y`` averaged over seeds per (method, row), then one line
    over those points (the interval of r treats the averaged points as independent)."""
    mean = pts.groupby(["method", "row"])[["x", "y"]].mean()
    return fit(mean["x"].to_numpy(), mean["y"].to_numpy())


def r2_per_seed(pts: pd.DataFrame) -> tuple[pd.DataFrame, Interval]:
    """R^2 and r of one line per seed (over its methods and rows), and the interval of r over
    seeds (the seeds are independent replications; r keeps the sign that R^2 loses)."""
    rows = [{"seed": s, **fit(g["x"], g["y"])._asdict()} for s, g in pts.groupby("seed")]
    table = pd.DataFrame(rows, columns=["seed", *Fit._fields])
    return table, t_interval(table["r"])


def epsilon_rank_at(arrays: Mapping[str, np.ndarray], eps: Sequence[float],
                    smoothed: bool) -> np.ndarray:
    """Epsilon-ranks at every ``eps`` from a run's recorded spectra, ``(runs, rows, len(eps))``
    (NaN where nothing was measured).

    ``smoothed=False``: the estimate from the quadrature, ``mean_probes sum_i w_i
    1{|theta_i| > eps}`` over the arrays ``NODES`` and ``WEIGHTS`` ``(runs, rows, probes,
    steps)``. ``smoothed=True``: the paper's measure, the share of the smoothed density
    ``DENSITY`` ``(runs, rows, grid)`` outside ``[-eps, eps]`` (trapezoid rule on
    ``DENSITY_GRID``).
    """
    eps = np.asarray(eps, float)
    if np.any(~np.isfinite(eps)) or np.any(eps < 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps.tolist()}")
    if smoothed:
        density, grid = np.asarray(arrays[DENSITY], float), np.asarray(arrays[DENSITY_GRID], float)
        total = np.trapezoid(density, grid, axis=-1)
        inside = [np.trapezoid(np.where(np.abs(grid) <= e, density, 0.0), grid, axis=-1)
                  for e in eps]
        return 1.0 - np.stack(inside, axis=-1) / total[..., None]
    nodes, weights = np.asarray(arrays[NODES], float), np.asarray(arrays[WEIGHTS], float)
    outside = np.abs(nodes)[..., None] > eps
    return np.sum(weights[..., None] * outside, axis=-2).mean(axis=-2)


def recorded_dim(table: pd.DataFrame) -> float | None:
    """The measured Hessian's dimension (``DIM``) of a run's results, ``None`` in results
    recorded before it was (their standard errors then come from 2 or more probes)."""
    values = table[DIM].dropna() if DIM in table else ()
    return float(values.iloc[0]) if len(values) else None


def resolution_at(arrays: Mapping[str, np.ndarray], eps: Sequence[float],
                  dim: float | None = None) -> np.ndarray:
    """Half-width of the estimate's interval (``FractionBounds.interval()``: the certain
    Chebyshev-Markov-Stieltjes bounds widened by 2 standard errors over probes) at every
    ``eps``, from the recorded quadratures ``NODES``/``WEIGHTS``: ``(runs, rows, len(eps))``,
    NaN where nothing was measured. ``dim`` is the Hessian's dimension (``recorded_dim``),
    which gives the probes' exact standard error; without it, the sample one over the probes.
    Where the half-width is large, eps is below what the Lanczos run resolves
    (docs/MEASURING.md) and the estimate there must not be read as precise."""
    import jax
    import jax.numpy as jnp

    from spectral_plasticity.curvature import SpectralDensity, epsilon_rank_bounds

    nodes, weights = np.asarray(arrays[NODES]), np.asarray(arrays[WEIGHTS])
    lead = nodes.shape[:-2]
    flat_nodes = nodes.reshape(-1, *nodes.shape[-2:])
    flat_weights = weights.reshape(flat_nodes.shape)
    measured = np.all(np.isfinite(flat_nodes), axis=(-2, -1))
    empty = jnp.zeros((1,))

    @jax.jit
    def half_widths(n: jax.Array, w: jax.Array) -> jax.Array:
        def one(e: jax.Array) -> jax.Array:
            lo, hi = epsilon_rank_bounds(SpectralDensity(empty, empty, n, w, empty[0], dim),
                                         e).interval()
            return (hi - lo) / 2
        return jax.vmap(one)(jnp.asarray(eps, n.dtype))

    out = np.full((flat_nodes.shape[0], len(eps)), np.nan)
    for i in np.flatnonzero(measured):
        out[i] = np.asarray(half_widths(flat_nodes[i], flat_weights[i]))
    return out.reshape(*lead, len(eps))


def r2_over_eps(tables: Mapping[str, pd.DataFrame], ranks: Mapping[str, np.ndarray],
                eps: Sequence[float], performance: str, row: str) -> pd.DataFrame:
    """R^2 (seeds averaged) of ``performance`` on the epsilon-rank at every ``eps``.

    Args:
      tables: results per method (columns ``run``, ``seed``, ``row``, ``performance``, ...).
      ranks: per method, ``epsilon_rank_at(...)`` of its runs, ``(runs, rows, len(eps))``.
      eps: the thresholds.
      performance: the performance column (sign it so that higher is better beforehand).
      row: the row-index column.

    Returns:
      One row per eps: ``eps``, ``r2``, ``r``, ``n``.
    """
    out = []
    for k, e in enumerate(eps):
        with_rank = {}
        for method, table in tables.items():
            if method in ranks:
                values = ranks[method][table["run"].to_numpy(), table[row].to_numpy(), k]
                with_rank[method] = table.assign(_erank=values)
        f = r2_seed_averaged(points(with_rank, "_erank", performance, row))
        out.append({"eps": float(e), "r2": f.r2, "r": f.r, "n": f.n})
    return pd.DataFrame(out)


def choose_eps(curve: pd.DataFrame, resolution: float = RESOLUTION) -> float:
    """The eps of the highest R^2 among those where the link has the claimed sign (r > 0)
    and, where the curve has a ``half_width`` column (median interval half-width of the
    estimate on the tuning runs), the instrument resolves eps (``half_width <= resolution``);
    the pre-registered choice, made on tuning seeds only."""
    valid = curve[np.isfinite(curve["r2"]) & (curve["r"] > 0)]
    if "half_width" in curve:
        valid = valid[valid["half_width"] <= resolution]
    if valid.empty:
        raise ValueError("no eps resolved by the measurement gives a positive link between "
                         "epsilon-rank and performance on the tuning seeds; keep the "
                         "configured eps")
    return float(valid.loc[valid["r2"].idxmax(), "eps"])


def _residual(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``y`` minus its least-squares line on ``x`` (both already centred)."""
    denom = x @ x
    return y - (x @ y / denom) * x if denom > 0 else y


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    denom = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / denom) if denom > 0 else float("nan")


def _run_pairs(tables: Mapping[str, pd.DataFrame], erank: str, performance: str,
               row: str) -> pd.DataFrame:
    """Consecutive measured rows of every run: ``seed, e, a, e_next, a_next``, each centred
    within its run (so that only changes within a run count, not differences between runs)."""
    parts = []
    for table in tables.values():
        if erank not in table:
            continue
        ok = np.isfinite(table[erank]) & np.isfinite(table[performance]) & ~table["diverged"]
        for seed, run in table[ok].sort_values(row).groupby("seed"):
            e, a = run[erank].to_numpy(float), run[performance].to_numpy(float)
            if len(e) < 3:
                continue
            cols = {"e": e[:-1], "a": a[:-1], "e_next": e[1:], "a_next": a[1:]}
            parts.append(pd.DataFrame({"seed": seed, **{k: v - v.mean() for k, v in
                                                         cols.items()}}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["seed", "e", "a", "e_next", "a_next"])


class LeadLag(NamedTuple):
    """Per seed ``lead`` and ``lag`` (see ``lead_lag``) and their intervals over seeds."""

    per_seed: pd.DataFrame
    lead: Interval
    lag: Interval
    difference: Interval


def lead_lag(tables: Mapping[str, pd.DataFrame], erank: str, performance: str,
             row: str) -> LeadLag:
    """Does the epsilon-rank lead performance (cross-lagged partial correlations)?

    Over consecutive measured rows ``t, t'`` of each run, centred within the run and pooled
    over the methods of one seed:

    - ``lead = corr(e_t, a_t' | a_t)``: the epsilon-rank at ``t`` against the *next* performance
      once the current performance is accounted for (the change in performance it predicts);
    - ``lag = corr(a_t, e_t' | e_t)``: the reverse, performance predicting the next
      epsilon-rank.

    "The collapse precedes the loss of plasticity" predicts ``lead > 0`` and ``lead > lag``;
    the intervals are over seeds. ``performance`` must be signed so that higher is better.
    """
    pairs = _run_pairs(tables, erank, performance, row)
    rows = []
    for seed, g in pairs.groupby("seed"):
        e, a, e_next, a_next = (g[k].to_numpy() for k in ("e", "a", "e_next", "a_next"))
        rows.append({"seed": seed, "pairs": len(g),
                     "lead": _corr(_residual(e, a), _residual(a_next, a)),
                     "lag": _corr(_residual(a, e), _residual(e_next, e))})
    per_seed = pd.DataFrame(rows, columns=["seed", "pairs", "lead", "lag"])
    return LeadLag(per_seed, t_interval(per_seed["lead"]), t_interval(per_seed["lag"]),
                   t_interval(per_seed["lead"] - per_seed["lag"]))


def _has_signal(table: pd.DataFrame, signal: str) -> bool:
    if signal.endswith("/"):
        return any(c.startswith(signal) for c in table.columns)
    return signal in table


def signal_values(table: pd.DataFrame, signal: str) -> pd.Series:
    """Column ``signal``, or the mean over layers of the columns starting with ``signal`` when
    it ends in ``/`` (``"effective_rank/"``: the mean effective rank of the hidden layers)."""
    if not signal.endswith("/"):
        return table[signal]
    return table[[c for c in table.columns if c.startswith(signal)]].mean(axis=1)


def predictive_power(tables: Mapping[str, pd.DataFrame], signals: Mapping[str, str],
                     at_end: Sequence[str], performance: str, row: str, horizon: int
                     ) -> tuple[pd.DataFrame, dict[str, Interval]]:
    """R^2 of the next ``horizon`` rows' mean performance on each signal at a row's start.

    At every row ``t`` where every signal is known (the epsilon-rank is measured at the start
    of some rows only), the target is the mean ``performance`` over rows ``t .. t+horizon-1``
    (the ones that start from that state). Signals in ``at_end`` are recorded at the end of a
    row (feature metrics, weight norm) and are taken from row ``t-1``: the same parameters, the
    ones row ``t`` starts from. Per seed, one line over its methods and rows.

    Returns:
      The per-seed table (``seed``, then one R^2 column per signal) and per signal the interval
      of its R^2 over seeds.
    """
    frames = []
    for table in tables.values():
        if not all(_has_signal(table, s) for s in signals.values()):
            continue
        for seed, run in table.sort_values(row).groupby("seed"):
            if run["diverged"].any():
                continue
            run = run.set_index(row)
            target = run[performance].rolling(horizon).mean().shift(-(horizon - 1))
            cols = {name: signal_values(run, s).shift(1 if name in at_end else 0)
                    for name, s in signals.items()}
            frames.append(pd.DataFrame({"seed": seed, "target": target, **cols}).dropna())
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["seed", "target", *signals])
    rows = [{"seed": seed, **{name: fit(g[name], g["target"]).r2 for name in signals}}
            for seed, g in data.groupby("seed")]
    per_seed = pd.DataFrame(rows, columns=["seed", *signals])
    return per_seed, {name: t_interval(per_seed[name]) for name in signals}
