"""The figures of a sweep: performance per task, Hessian spectra, epsilon-rank, feature rank.

``plot_experiment(workdir, config)`` reads every method's ``results.csv`` (and the spectral
densities in ``arrays/``) under ``workdir`` and writes PNGs to ``workdir/plots``:

- ``performance.png``: the performance metric per task, one line per method (and swept
  setting), with a 95% confidence band over seeds (Student t);
- ``spectral_density.png``: the Hessian spectral density of the new task's loss at its
  initialization, at chosen tasks, per method (log density);
- ``epsilon_rank.png``: the epsilon-rank at new-task initialization over tasks, with its
  interval (``epsilon_rank_lo``/``_hi``, dotted) where recorded;
- ``epsilon_rank_vs_performance.png``: epsilon-rank against performance, every (run, task), with
  the R^2 of a linear fit per method and overall;
- ``features.png``: the mean effective rank of hidden features and the dormant fraction.

Column names come from ``config.plots`` (see ``PlotColumns``); a figure whose columns are absent
from the results is skipped with a log line, never drawn empty.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from spectral_plasticity import schema
from spectral_plasticity.train.results import load_arrays

# The column prefixes of the KFAC factors' effective ranks (``kfac_diagnostics``).
KFAC_FACTOR_RANKS = {"A": "kfac_erank_a/", "G": "kfac_erank_g/"}

@dataclass(frozen=True)
class PlotColumns:
    """Which result columns the figures use (set per experiment in ``config.plots``)."""

    performance: str = "eval_accuracy"
    performance_label: str = "held-out accuracy"
    epsilon_rank: str = schema.at_init("epsilon_rank")
    effective_rank_prefix: str = "effective_rank/"
    dormant_prefix: str = "dormant_fraction/"
    density: str = schema.at_init("density")
    density_grid: str = "density_grid"
    row: str = "task"

    @classmethod
    def from_config(cls, config: Any) -> PlotColumns:
        overrides = dict(config.get("plots", {}) or {}) if config is not None else {}
        unknown = set(overrides) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config.plots keys {sorted(unknown)}; valid: "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**overrides)


def confidence_band(values: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, ...]:
    """Mean and Student-t confidence interval over axis 0 (seeds): ``(mean, low, high)``.

    With one seed the interval collapses to the mean.
    """
    values = np.asarray(values, dtype=float)
    mean = np.nanmean(values, axis=0)
    n = np.sum(np.isfinite(values), axis=0)
    if values.shape[0] < 2:
        return mean, mean, mean
    sem = np.nanstd(values, axis=0, ddof=1) / np.sqrt(np.maximum(n, 1))
    half = stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * sem
    return mean, mean - half, mean + half


def r_squared(x: np.ndarray, y: np.ndarray) -> float:
    """Coefficient of determination of the least-squares line ``y ~ a x + b``."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (slope * x + intercept)
    return float(1.0 - residual @ residual / np.sum((y - y.mean()) ** 2))


def load_results(workdir: Path) -> dict[str, pd.DataFrame]:
    """``results.csv`` of every method (sub-directory) under ``workdir``."""
    tables = {}
    for path in sorted(Path(workdir).glob("*/results.csv")):
        tables[path.parent.name] = pd.read_csv(path)
    return tables


def _curves(table: pd.DataFrame, metric: str, columns: PlotColumns):
    """Per swept setting: (label suffix, rows, seeds x rows matrix of ``metric``)."""
    settings = schema.swept_columns(table.columns)
    groups = table.groupby(settings) if settings else [((), table)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        suffix = ", ".join(f"{s}={v:g}" for s, v in zip(settings, key, strict=True))
        matrix = group.pivot_table(index=schema.SEED, columns=columns.row, values=metric,
                                   dropna=False)
        yield suffix, matrix.columns.to_numpy(), matrix.to_numpy()


def _label(method: str, suffix: str) -> str:
    return f"{method} ({suffix})" if suffix else method


def _palette(n: int) -> list:
    """``n`` distinct colours: tab10's up to 10 curves, tab20's up to 20, then a continuous map
    (matplotlib's default cycle repeats after 10, and sweeps compare 11 methods)."""
    if n <= 20:
        return list(plt.get_cmap("tab10" if n <= 10 else "tab20").colors[:n])
    return [plt.get_cmap("turbo")(i / (n - 1)) for i in range(n)]


def _plot_over_rows(ax, tables, metric, columns) -> bool:
    curves = [(method, suffix, rows, matrix) for method, table in tables.items()
              if metric in table for suffix, rows, matrix in _curves(table, metric, columns)]
    ax.set_prop_cycle(color=_palette(max(len(curves), 1)))
    for method, suffix, rows, matrix in curves:
        keep = np.isfinite(matrix).any(axis=0)
        mean, low, high = confidence_band(matrix[:, keep])
        line = ax.plot(rows[keep], mean, label=_label(method, suffix))[0]
        ax.fill_between(rows[keep], low, high, color=line.get_color(), alpha=0.2)
    ax.set_xlabel(columns.row)
    return bool(curves)


def interval_columns(metric: str) -> tuple[str, str]:
    """The interval columns of an epsilon-rank column: ``epsilon_rank_init`` ->
    (``epsilon_rank_lo_init``, ``epsilon_rank_hi_init``) as the trainers record them."""
    base, _, when = metric.rpartition("_")
    return f"{base}_lo_{when}", f"{base}_hi_{when}"


def _draw_intervals(ax, tables, metric, columns) -> None:
    """Each curve's interval (certain quadrature bounds +- 2 probe standard errors), averaged
    over seeds, as dotted lines in the curve's colour; nothing where the columns are absent."""
    colours = {line.get_label(): line.get_color() for line in ax.get_lines()}
    for method, table in tables.items():
        if not set(interval_columns(metric)) <= set(table):
            continue
        for end in interval_columns(metric):
            for suffix, rows, matrix in _curves(table, end, columns):
                keep = np.isfinite(matrix).any(axis=0)
                ax.plot(rows[keep], np.nanmean(matrix[:, keep], axis=0), ":", linewidth=1,
                        color=colours.get(_label(method, suffix)))


def epsilon_rank_figure(results: dict[str, np.ndarray], eps_values: tuple[float, ...],
                        path: str | Path) -> Path:
    """The measuring figure: per eps, across tasks, the exact fraction of ``|lambda| > eps``,
    the quadrature estimate with its interval, the smoothed measure and its kernel's tail.

    Args:
      results: ``exact``, ``epsilon_rank``, ``epsilon_rank_lo``, ``epsilon_rank_hi``,
        ``epsilon_rank_smoothed``, ``epsilon_rank_kernel_tail``, each ``(tasks, len(eps))``,
        and ``epsilon_rank_smoothing_sigma`` (as ``benchmarks/epsilon_rank.py --figure``).
      eps_values: the thresholds of the columns.
      path: the PNG to write.
    """
    fig, axes = plt.subplots(1, len(eps_values), figsize=(5 * len(eps_values), 3.8),
                             squeeze=False)
    tasks = np.arange(results["exact"].shape[0])
    sigma = results["epsilon_rank_smoothing_sigma"][:, 0]
    for i, (ax, eps) in enumerate(zip(axes[0], eps_values, strict=True)):
        ax.plot(tasks, results["exact"][:, i], "k-o", ms=3, label="exact (dense eigh)")
        ax.plot(tasks, results["epsilon_rank"][:, i], "C0-s", ms=3, label="estimate")
        ax.fill_between(tasks, results["epsilon_rank_lo"][:, i], results["epsilon_rank_hi"][:, i],
                        color="C0", alpha=0.2, label="interval")
        ax.plot(tasks, results["epsilon_rank_smoothed"][:, i], "C3--", label="smoothed (paper)")
        ax.plot(tasks, results["epsilon_rank_kernel_tail"][:, i], "C7:",
                label="kernel tail 2(1-Phi(eps/sigma))")
        ax.set_title(f"eps = {eps}: eps / sigma from {eps / sigma.max():.1f} to "
                     f"{eps / sigma.min():.1f}", fontsize=9)
        ax.set_xlabel("task (at its initialization)")
        ax.set_ylim(-0.02, 1.02)
    axes[0, 0].set_ylabel("fraction of |lambda| > eps")
    axes[0, 0].legend(fontsize=7)
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load_sweep(workdir: str | Path) -> tuple[Path, dict[str, pd.DataFrame], Path]:
    """The sweep's work directory, its results tables by method and its ``plots`` directory
    (created); a directory without results is refused."""
    workdir = Path(workdir)
    tables = load_results(workdir)
    if not tables:
        raise ValueError(f"no results under {workdir}: run `make sweep` first "
                         "(each method writes <workdir>/<method>/results.csv)")
    out = workdir / "plots"
    out.mkdir(exist_ok=True)
    return workdir, tables, out


def plot_experiment(workdir: str | Path, config: Any = None,
                    density_rows: tuple[int, ...] | None = None) -> list[Path]:
    """Writes the figures of the sweep in ``workdir``; returns the PNG paths written."""
    workdir, tables, out = _load_sweep(workdir)
    columns = PlotColumns.from_config(config)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4))
    if _plot_over_rows(ax, tables, columns.performance, columns):
        ax.set_ylabel(columns.performance_label)
        ax.set_title(f"Performance per {columns.row} (mean, 95% CI over seeds)")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "performance.png"))
    else:
        plt.close(fig)
        logging.info("no %r column: performance plot skipped", columns.performance)

    fig, ax = plt.subplots(figsize=(7, 4))
    if _plot_over_rows(ax, tables, columns.epsilon_rank, columns):
        _draw_intervals(ax, tables, columns.epsilon_rank, columns)
        ax.set_ylabel("epsilon-rank at new-task init")
        ax.set_title(f"Hessian epsilon-rank over {columns.row}s (mean, 95% CI; dotted: mean "
                     "interval)", fontsize=9)
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "epsilon_rank.png"))

        fig, ax = plt.subplots(figsize=(5, 4))
        all_x, all_y = [], []
        for method, table in tables.items():
            both = table[[columns.epsilon_rank, columns.performance]].dropna()
            if both.empty:
                continue
            x, y = both[columns.epsilon_rank].to_numpy(), both[columns.performance].to_numpy()
            all_x.append(x)
            all_y.append(y)
            ax.scatter(x, y, s=6, alpha=0.5, label=f"{method} (R²={r_squared(x, y):.2f})")
        if all_x:
            total = r_squared(np.concatenate(all_x), np.concatenate(all_y))
            ax.set_title(f"epsilon-rank vs performance, R² = {total:.3f}")
            ax.set_xlabel("epsilon-rank at new-task init")
            ax.set_ylabel(columns.performance_label)
            ax.legend(fontsize=7)
            written.append(_save(fig, out / "epsilon_rank_vs_performance.png"))
        else:
            plt.close(fig)
    else:
        plt.close(fig)
        logging.info("no %r column: epsilon-rank plots skipped", columns.epsilon_rank)

    written += _plot_densities(workdir, tables, columns, out, density_rows)

    feature_cols = {
        "effective rank (mean over layers)": columns.effective_rank_prefix,
        "dormant fraction (mean over layers)": columns.dormant_prefix,
    }
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for ax, (title, prefix) in zip(axes, feature_cols.items(), strict=True):
        means = {}
        for method, table in tables.items():
            layer_cols = [c for c in table.columns if c.startswith(prefix)]
            if layer_cols:
                means[method] = table.assign(_mean=table[layer_cols].mean(axis=1))
        if means:
            drawn |= _plot_over_rows(ax, means, "_mean", columns)
            ax.set_title(title)
            ax.legend(fontsize=7)
    if drawn:
        written.append(_save(fig, out / "features.png"))
    else:
        plt.close(fig)
    written += plot_kfac_factors(workdir, config, suffix=schema.INIT)
    return written


def _plot_densities(workdir, tables, columns, out, density_rows) -> list[Path]:
    curves = {}
    for method in tables:
        arrays = load_arrays(workdir / method)
        if columns.density in arrays and columns.density_grid in arrays:
            curves[method] = (arrays[columns.density_grid], arrays[columns.density])
    if not curves:
        logging.info("no %r arrays: spectral density plot skipped", columns.density)
        return []
    any_density = next(iter(curves.values()))[1]
    measured = np.flatnonzero(np.isfinite(any_density[0]).all(axis=-1)
                              & (np.abs(any_density[0]).sum(axis=-1) > 0))
    if density_rows is None:
        density_rows = tuple(measured[[0, len(measured) // 2, -1]]) if len(measured) else ()
    if not density_rows:
        return []
    fig, axes = plt.subplots(1, len(density_rows), figsize=(4.5 * len(density_rows), 3.8),
                             squeeze=False)
    for ax, row in zip(axes[0], density_rows, strict=True):
        for method, (grid, density) in curves.items():
            ax.semilogy(grid[0, row], np.maximum(density[0, row], 1e-12), label=method, lw=1)
        ax.set_title(f"new-task init, {columns.row} {row} (seed 0)")
        ax.set_xlabel("eigenvalue")
    axes[0, 0].set_ylabel("density")
    axes[0, 0].legend(fontsize=7)
    return [_save(fig, out / "spectral_density.png")]


def plot_kfac_factors(workdir: str | Path, config: Any = None, *, suffix: str = "",
                      layers: tuple[str, ...] | None = None) -> list[Path]:
    """Figures of the KFAC factors ``A`` and ``G`` over tasks, per method (``kfac_diagnostics``).

    Reads the columns ``kfac_erank_a/<layer><suffix>`` and ``kfac_erank_g/<layer><suffix>`` of
    every method's ``results.csv`` and the arrays ``kfac_top_a/<layer><suffix>``,
    ``kfac_top_g/<layer><suffix>`` (shape ``(runs, rows, k)``, the largest eigenvalues) of its
    ``arrays/``, and writes to ``workdir/plots``:

    - ``kfac_factor_ranks.png``: effective rank of ``A`` (top row) and ``G`` (bottom row) per
      layer (columns) over tasks, mean and 95% CI over seeds, one line per method and setting.
      The KFAC block's effective rank is their product, so a falling ``A`` curve is curvature
      directions lost to the features (Martens & Grosse 2015; He et al. 2025);
    - ``kfac_factor_spectra.png``: the normalized top spectrum ``lambda_i / lambda_1`` of
      ``A`` and ``G`` per layer at the first (dashed) and last (solid) measured task, mean
      over the runs of each method (log scale): a steeper decay at the last task is a
      collapsing factor.

    Args:
      workdir: the sweep's work directory (one sub-directory per method).
      config: the experiment config; ``config.plots`` sets the row column (``PlotColumns``).
      suffix: appended to the metric names, e.g. ``"_init"`` when the trainer records the
        diagnostics at a new task's initialization as ``kfac_erank_a/hidden_0_init``.
      layers: the layers drawn (default: every layer in the first method's results).

    Returns:
      The PNG paths written (none when no KFAC column or array is present).
    """
    workdir, tables, out = _load_sweep(workdir)
    columns = PlotColumns.from_config(config)
    if layers is None:
        prefix = KFAC_FACTOR_RANKS["A"]
        layers = tuple(sorted(c[len(prefix):len(c) - len(suffix)]
                              for c in next(iter(tables.values()))
                              if c.startswith(prefix) and c.endswith(suffix)))
    if not layers:
        logging.info("no kfac_erank_a/*%s column: KFAC factor plots skipped", suffix)
        return []
    written = _plot_factor_ranks(tables, columns, layers, suffix, out)
    spectra = {}
    for method in tables:
        arrays = load_arrays(workdir / method)
        for layer in layers:
            for factor in ("a", "g"):
                name = f"kfac_top_{factor}/{layer}{suffix}"
                if name in arrays:
                    spectra[method, layer, factor] = arrays[name]
    if not spectra:
        logging.info("no kfac_top_*%s arrays: KFAC factor spectra plot skipped", suffix)
        return written
    return [*written, _plot_factor_spectra(spectra, list(tables), columns, layers, out)]


def _plot_factor_ranks(tables: dict[str, pd.DataFrame], columns: PlotColumns,
                       layers: tuple[str, ...], suffix: str, out: Path) -> list[Path]:
    """``kfac_factor_ranks.png`` (see ``plot_kfac_factors``), when any column is present."""
    fig, axes = plt.subplots(2, len(layers), figsize=(3.6 * len(layers), 6.4), squeeze=False)
    drawn = False
    for col, layer in enumerate(layers):
        for row, (factor, prefix) in enumerate(KFAC_FACTOR_RANKS.items()):
            ax = axes[row, col]
            drawn |= _plot_over_rows(ax, tables, f"{prefix}{layer}{suffix}", columns)
            ax.set_title(f"{layer}: effective rank of {factor}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    if drawn:
        return [_save(fig, out / "kfac_factor_ranks.png")]
    plt.close(fig)
    return []


def _plot_factor_spectra(spectra: dict[tuple[str, str, str], np.ndarray], methods: list[str],
                         columns: PlotColumns, layers: tuple[str, ...], out: Path) -> Path:
    """``kfac_factor_spectra.png`` (see ``plot_kfac_factors``) of ``spectra[method, layer,
    factor]``, each ``(runs, rows, k)``."""
    fig, axes = plt.subplots(2, len(layers), figsize=(3.6 * len(layers), 6.4), squeeze=False)
    colors = dict(zip(methods, _palette(len(methods)), strict=True))
    for (method, layer, factor), values in spectra.items():
        ax = axes["ag".index(factor), layers.index(layer)]
        normalized = values / values[..., :1]  # (runs, rows, k): lambda_i / lambda_1
        measured = np.flatnonzero(np.isfinite(normalized[..., 0]).any(axis=0))
        if not len(measured):
            continue
        for row, style in ((measured[0], "--"), (measured[-1], "-")):
            mean = np.nanmean(normalized[:, row], axis=0)
            ax.semilogy(np.arange(1, mean.size + 1), mean, style, color=colors[method],
                        label=f"{method}, {columns.row} {row}", marker=".")
        ax.set_title(f"{layer}: top spectrum of {factor.upper()}", fontsize=9)
        ax.set_xlabel("i")
    axes[0, 0].set_ylabel("lambda_i / lambda_1")
    axes[1, 0].set_ylabel("lambda_i / lambda_1")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, out / "kfac_factor_spectra.png")
