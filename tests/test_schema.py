"""The result schema: directions, the _init/_end convention, swept columns by name."""

import pandas as pd
import pytest

from spectral_plasticity import metrics, plots, schema
from spectral_plasticity.train import method_registry


@pytest.mark.parametrize(("column", "higher"), [
    ("eval_accuracy", True), ("train_accuracy", True), ("episode_return", True),
    ("eval_loss", False), ("train_loss", False), ("epsilon_rank_init", True),
    ("epsilon_rank_end", True), ("effective_rank/hidden_0", True),
    ("dormant_fraction/critic/hidden_0", False)])
def test_directions(column, higher):
    assert schema.higher_is_better(column) is higher


def test_diagnostics_and_unknown_columns_are_refused():
    with pytest.raises(ValueError, match="'weight_norm' has no better direction"):
        schema.higher_is_better("weight_norm")
    with pytest.raises(ValueError, match="no better direction"):
        schema.higher_is_better("policy_loss")  # a loss, yet not a measure of performance
    with pytest.raises(KeyError, match="'eval_los' is not a result metric"):
        schema.higher_is_better("eval_los")


def test_the_measurement_suffixes():
    assert schema.at_init("epsilon_rank") == "epsilon_rank_init"
    assert schema.at_end("density") == "density_end"
    assert plots.PlotColumns().epsilon_rank == schema.at_init("epsilon_rank")
    start, end = {"density_grid": 1, "epsilon_rank": 2}, {"density_grid": 3, "epsilon_rank": 4}
    assert schema.start_end_columns(start, end) == {
        "density_grid": 1, "epsilon_rank_init": 2, "density_grid_end": 3, "epsilon_rank_end": 4}


def test_every_feature_metric_and_every_setting_is_in_the_schema():
    for name in metrics.FEATURE_METRICS:
        schema.metric(f"{name}/hidden_0")
    assert set(schema.SWEPT) == {"learning_rate", *method_registry.DEFAULTS}


def test_swept_columns_are_found_by_name_wherever_they_are():
    table = pd.DataFrame({"run": [0, 1], "seed": [0, 0], "task": [0, 0],
                          "eval_accuracy": [0.5, 0.6], "l2": [0.1, 0.2],
                          "learning_rate": [1e-3, 1e-2], "diverged": [False, False]})
    assert schema.swept_columns(table.columns) == ["l2", "learning_rate"]
    curves = list(plots._curves(table, "eval_accuracy", plots.PlotColumns()))
    assert [c[0] for c in curves] == ["l2=0.1, learning_rate=0.001", "l2=0.2, learning_rate=0.01"]
