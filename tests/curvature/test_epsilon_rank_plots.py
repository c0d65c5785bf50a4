"""The epsilon-rank figures draw the estimate with its interval."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from spectral_plasticity import plots


def _run(run_dir, seeds=2, tasks=4):
    run_dir.mkdir(parents=True)
    rows = [{"run": s, "seed": s, "task": t, "eval_accuracy": 0.9,
             "epsilon_rank_init": 0.3 + 0.01 * s, "epsilon_rank_lo_init": 0.2 + 0.01 * t,
             "epsilon_rank_hi_init": 0.5 - 0.01 * t + 0.02 * s, "diverged": False}
            for s in range(seeds) for t in range(tasks)]
    pd.DataFrame(rows).to_csv(run_dir / "results.csv", index=False)


def test_interval_columns_follow_the_trainers_names():
    assert plots.interval_columns("epsilon_rank_init") == ("epsilon_rank_lo_init",
                                                           "epsilon_rank_hi_init")
    assert plots.interval_columns("epsilon_rank_end") == ("epsilon_rank_lo_end",
                                                          "epsilon_rank_hi_end")


def test_interval_is_drawn_as_the_seed_mean_of_its_ends(tmp_path):
    _run(tmp_path / "bp")
    tables = plots.load_results(tmp_path)
    columns = plots.PlotColumns.from_config(None)
    fig, ax = plt.subplots()
    assert plots._plot_over_rows(ax, tables, columns.epsilon_rank, columns)
    plots._draw_intervals(ax, tables, columns.epsilon_rank, columns)
    lines = ax.get_lines()
    plt.close(fig)
    assert len(lines) == 3  # the estimate, then its lower and upper ends
    np.testing.assert_allclose(lines[1].get_ydata(), 0.2 + 0.01 * np.arange(4))
    np.testing.assert_allclose(lines[2].get_ydata(), 0.51 - 0.01 * np.arange(4))
    assert lines[1].get_color() == lines[0].get_color() == lines[2].get_color()


def test_measuring_figure_is_written(tmp_path):
    tasks, eps = 3, (0.01, 0.1)
    ones = np.ones((tasks, len(eps)))
    results = {"exact": 0.1 * ones, "epsilon_rank": 0.11 * ones, "epsilon_rank_lo": 0.05 * ones,
               "epsilon_rank_hi": 0.2 * ones, "epsilon_rank_smoothed": 0.5 * ones,
               "epsilon_rank_kernel_tail": 0.4 * ones,
               "epsilon_rank_smoothing_sigma": 0.02 * ones}
    path = plots.epsilon_rank_figure(results, eps, tmp_path / "measuring.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
