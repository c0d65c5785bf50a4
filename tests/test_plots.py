"""Figures: the statistics they draw against direct formulas, and the files they write."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectral_plasticity import plots
from spectral_plasticity.train.results import save_chunk_arrays


def test_confidence_band_matches_student_t():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(5, 7))
    mean, low, high = plots.confidence_band(values)
    for j in range(7):
        lo, hi = stats.t.interval(0.95, 4, loc=values[:, j].mean(), scale=stats.sem(values[:, j]))
        np.testing.assert_allclose([low[j], high[j]], [lo, hi], rtol=1e-10)
    np.testing.assert_allclose(mean, values.mean(0))


def test_r_squared_matches_linregress():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = 2 * x + rng.normal(size=50)
    assert plots.r_squared(x, y) == pytest.approx(stats.linregress(x, y).rvalue ** 2, rel=1e-9)
    assert np.isnan(plots.r_squared(np.ones(5), np.arange(5.0)))


def _fake_run(run_dir, offset, seeds=3, tasks=6, grid_points=20):
    run_dir.mkdir(parents=True)
    rows = []
    for seed in range(seeds):
        for task in range(tasks):
            measured = task % 2 == 0
            rows.append({"run": seed, "seed": seed, "task": task,
                         "eval_accuracy": offset - 0.01 * task + 0.001 * seed,
                         "epsilon_rank_init": (0.5 - 0.02 * task) if measured else np.nan,
                         "effective_rank/hidden_0": 10.0 - task, "dormant_fraction/hidden_0": 0.1,
                         "diverged": False})
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)
    grid = np.broadcast_to(np.linspace(-1, 5, grid_points), (seeds, tasks, grid_points))
    density = np.where((np.arange(tasks) % 2 == 0)[None, :, None], 0.5, np.nan) * np.ones_like(grid)
    save_chunk_arrays(run_dir, 0, {"density_grid": grid, "density_init": density})


def test_plot_experiment_writes_every_figure(tmp_path):
    _fake_run(tmp_path / "bp", 0.9)
    _fake_run(tmp_path / "l2_er", 0.95)
    written = plots.plot_experiment(tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["epsilon_rank.png", "epsilon_rank_vs_performance.png", "features.png",
                     "performance.png", "spectral_density.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_and_bad_plot_keys_are_reported(tmp_path):
    with pytest.raises(ValueError, match="no results under"):
        plots.plot_experiment(tmp_path)
    with pytest.raises(ValueError, match="unknown config.plots keys"):
        plots.PlotColumns.from_config({"plots": {"colour": "red"}})
