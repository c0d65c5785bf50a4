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


def test_eleven_methods_get_eleven_colours(tmp_path):
    import matplotlib.pyplot as plt

    for i in range(11):  # the reproduction's 11 methods: the default cycle repeats after 10
        _fake_run(tmp_path / f"method_{i:02d}", 0.5 + 0.01 * i, seeds=2, tasks=3)
    fig, ax = plt.subplots()
    assert plots._plot_over_rows(ax, plots.load_results(tmp_path), "eval_accuracy",
                                 plots.PlotColumns.from_config(None))
    colours = {tuple(line.get_color()) for line in ax.get_lines()}
    plt.close(fig)
    assert len(ax.get_lines()) == 11 and len(colours) == 11


def test_missing_results_and_bad_plot_keys_are_reported(tmp_path):
    with pytest.raises(ValueError, match="no results under"):
        plots.plot_experiment(tmp_path)
    with pytest.raises(ValueError, match="unknown config.plots keys"):
        plots.PlotColumns.from_config({"plots": {"colour": "red"}})


def _fake_kfac_run(run_dir, erank_a, seeds=2, tasks=4, k=3):
    """A method's results with KFAC diagnostics recorded at task 0 and 2 (NaN elsewhere):
    ``kfac_erank_a/hidden_0 = erank_a - task + 0.1 seed``, ``kfac_erank_g = 5``; top spectra of
    A ``(1, r, r^2)`` with ``r = 0.5`` at task 0 and ``r = 0.1`` at task 2, of G ``(2, 1, 0)``."""
    run_dir.mkdir(parents=True)
    rows = []
    for seed in range(seeds):
        for task in range(tasks):
            measured = task % 2 == 0
            rows.append({"run": seed, "seed": seed, "task": task, "eval_accuracy": 0.9,
                         "kfac_erank_a/hidden_0": erank_a - task + 0.1 * seed if measured
                         else np.nan,
                         "kfac_erank_g/hidden_0": 5.0 if measured else np.nan,
                         "diverged": False})
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)
    top_a = np.full((seeds, tasks, k), np.nan)
    top_a[:, 0] = 3.0 * 0.5 ** np.arange(k)
    top_a[:, 2] = 3.0 * 0.1 ** np.arange(k)
    top_g = np.full((seeds, tasks, k), np.nan)
    top_g[:, [0, 2]] = [2.0, 1.0, 0.0]
    save_chunk_arrays(run_dir, 0, {"kfac_top_a/hidden_0": top_a, "kfac_top_g/hidden_0": top_g})


def test_plot_kfac_factors_draws_ranks_and_normalized_spectra(tmp_path, monkeypatch):
    _fake_kfac_run(tmp_path / "bp", erank_a=20.0)
    _fake_kfac_run(tmp_path / "l2_er", erank_a=30.0)
    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    written = plots.plot_kfac_factors(tmp_path)
    assert sorted(p.name for p in written) == ["kfac_factor_ranks.png", "kfac_factor_spectra.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ranks = figures["kfac_factor_ranks.png"].axes  # rows A, G; one column (hidden_0)
    assert [ax.get_title() for ax in ranks] == ["hidden_0: effective rank of A",
                                                "hidden_0: effective rank of G"]
    # Means over seeds 0 and 1 of erank_a - task + 0.1 seed at tasks 0 and 2, and of 5.
    expected = {(0, "bp"): [20.05, 18.05], (0, "l2_er"): [30.05, 28.05],
                (1, "bp"): [5.0, 5.0], (1, "l2_er"): [5.0, 5.0]}
    for (panel, method), means in expected.items():
        lines = {line.get_label(): line for line in ranks[panel].get_lines()}
        assert set(lines) == {"bp", "l2_er"}
        x, y = lines[method].get_data()
        np.testing.assert_array_equal(x, [0, 2])  # unmeasured tasks are left out
        np.testing.assert_allclose(y, means)

    spectra = figures["kfac_factor_spectra.png"].axes
    a_lines = {line.get_label(): line.get_data() for line in spectra[0].get_lines()}
    assert set(a_lines) == {"bp, task 0", "bp, task 2", "l2_er, task 0", "l2_er, task 2"}
    np.testing.assert_allclose(a_lines["bp, task 0"][1], [1.0, 0.5, 0.25])
    np.testing.assert_allclose(a_lines["l2_er, task 2"][1], [1.0, 0.1, 0.01])
    np.testing.assert_array_equal(a_lines["bp, task 2"][0], [1, 2, 3])
    g_lines = {line.get_label(): line.get_data() for line in spectra[1].get_lines()}
    np.testing.assert_allclose(g_lines["bp, task 0"][1], [1.0, 0.5, 0.0])


def test_plot_kfac_factors_skips_results_without_diagnostics(tmp_path):
    _fake_run(tmp_path / "bp", 0.9)
    assert plots.plot_kfac_factors(tmp_path) == []
