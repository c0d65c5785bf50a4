"""Re-derived settings, tuning grids, their checks and the selection on tuning seeds."""

import math

import numpy as np
import pandas as pd
import pytest

from spectral_plasticity import tuning


def test_rescaling_keeps_what_each_setting_does_per_task():
    lr, steps = 0.03, 1000
    ref_lr, ref_steps = tuning.PAPER_LEARNING_RATE, tuning.PAPER_STEPS_PER_TASK
    # L2: the shrink factor per task, (1 - lr * l2) ** steps, is the paper's.
    l2 = tuning.rescale("l2", 1e-3, lr, steps)
    assert (1 - lr * l2) ** steps == pytest.approx((1 - ref_lr * 1e-3) ** ref_steps, rel=1e-3)
    # CBP: the expected replacements per task (rate x steps) are the paper's.
    assert tuning.rescale("replacement_rate", 1e-6, lr, steps) * steps == pytest.approx(
        1e-6 * ref_steps)
    # S&P noise: the variance of the noise summed over a task is the paper's.
    std = tuning.rescale("noise_std", 1e-4, lr, steps)
    assert std**2 * steps == pytest.approx(1e-8 * ref_steps)
    # The ascent keeps its ratio to the SGD step size.
    assert tuning.rescale("erank_learning_rate", 1e-2, lr, steps) / lr == pytest.approx(
        1e-2 / ref_lr)
    assert tuning.rescale("redo_tau", 0.025, lr, steps) == 0.025
    # At the paper's own protocol nothing changes.
    for name in ("l2", "shrink", "noise_std", "erank_learning_rate"):
        assert tuning.rescale(name, 0.5, ref_lr, ref_steps) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        tuning.rescale("l2", 1e-3, 0.0, steps)


def test_derived_settings_and_centred_grids():
    derived = tuning.derived_settings(("bp", "l2", "l2_er", "cbp"), 0.03, 1000)
    assert set(derived) == {"l2", "l2_er", "cbp"}  # bp has no setting of its own
    assert derived["l2_er"] == {"l2": 0.02, "erank_learning_rate": 0.03}
    assert derived["cbp"] == {"replacement_rate": 6e-5}
    grids = tuning.tuning_grids(("bp", "l2", "l2_er", "reset", "cbp"), derived)
    assert grids == {"l2": {"l2": (2e-4, 2e-3, 2e-2)},
                     "l2_er": {"l2": (2e-3, 2e-2, 0.2),
                               "erank_learning_rate": (3e-3, 3e-2, 0.3)},
                     "cbp": {"replacement_rate": (6e-6, 6e-5, 6e-4)}}
    # a method without its own value is centred on the shared setting, else the default
    assert tuning.tuning_grids(("er",), {})["er"]["erank_learning_rate"][1] == 1e-3
    assert tuning.tuning_grids(("er", "l2"), {}, {"erank_learning_rate": 0.5})["er"] == {
        "erank_learning_rate": (0.05, 0.5, 5.0)}
    with pytest.raises(ValueError, match="unknown methods"):
        tuning.derived_settings(("bq",), 0.03, 1000)
    assert math.isclose(tuning.centred_grid(1e-4)[0], 1e-5)


def test_bad_tuning_input_is_refused_with_a_clear_error():
    ok = {"l2": {"l2": (1e-4, 1e-3)}}
    tuning.check_tuning(ok, [0, 1, 2], [1000, 1001])
    with pytest.raises(ValueError, match=r"tuning grid of l2 \(l2\) has 1 distinct value"):
        tuning.check_tuning({"l2": {"l2": (1e-3, 1e-3)}}, [0], [1])
    with pytest.raises(ValueError, match=r"evaluation seeds \[2\] are also tuning seeds"):
        tuning.check_tuning(ok, [0, 1, 2], [2, 3])
    with pytest.raises(ValueError, match="'wd' is not a method setting"):
        tuning.check_tuning({"l2": {"wd": (1e-4, 1e-3)}}, [0], [1])
    with pytest.raises(ValueError, match="a product grid needs strengths the trainers vmap"):
        tuning.check_tuning({"cbp_l2": {"l2": (1e-4, 1e-3), "replacement_rate": (1e-5, 1e-4)}},
                            [0], [1])
    with pytest.raises(ValueError, match="at least one seed"):
        tuning.check_tuning(ok, [], [1])


def test_selection_takes_the_best_mean_and_never_a_setting_that_diverged():
    finals = pd.DataFrame({"l2": np.repeat([1e-4, 1e-3, 1e-2], 3),
                           "final": [0.5, 0.6, 0.4,  0.7, 0.8, 0.75,  0.9, np.nan, 0.95]})
    sel = tuning.select(finals, ["l2"], higher_is_better=True)
    assert sel.value == {"l2": 1e-3}  # 1e-2 has the best mean of its finite seeds but diverged
    row = sel.table.set_index("l2").loc[1e-3]
    assert row["mean"] == pytest.approx(0.75) and row["n"] == 3
    half = 4.302653 * np.std([0.7, 0.8, 0.75], ddof=1) / np.sqrt(3)  # t(0.975, 2)
    assert (row["low"], row["high"]) == pytest.approx((0.75 - half, 0.75 + half), rel=1e-5)
    assert sel.table.set_index("l2").loc[1e-2, "n"] == 2
    losses = finals.assign(final=[0.5, 0.6, 0.4, 0.7, 0.8, 0.75, 0.9, 0.2, 0.95])
    assert tuning.select(losses, ["l2"], higher_is_better=False).value == {"l2": 1e-4}
    # A product grid: the best point of both strengths together.
    grid = pd.DataFrame([{"l2": a, "erank_learning_rate": b, "seed": s,
                          "final": -abs(np.log10(a) + 3) - abs(np.log10(b) + 2) + 0.01 * s}
                         for a in (1e-4, 1e-3, 1e-2) for b in (1e-3, 1e-2, 1e-1)
                         for s in range(2)])
    both = tuning.select(grid, ["l2", "erank_learning_rate"], True)
    assert both.value == {"l2": 1e-3, "erank_learning_rate": 1e-2} and len(both.table) == 9
    with pytest.raises(ValueError, match="every grid point of"):
        tuning.select(finals.assign(final=np.nan), ["l2"], True)
    with pytest.raises(ValueError, match="needs the columns"):
        tuning.select(finals, ["wd"], True)
