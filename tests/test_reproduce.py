"""The statistics of `make reproduce` against scipy and hand-built result tables."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from spectral_plasticity import plots, reproduce


def test_paired_comparison_matches_scipy_ttest_rel():
    rng = np.random.default_rng(0)
    a = pd.Series(rng.normal(1.0, 1.0, 7), index=range(7))
    b = pd.Series(rng.normal(0.0, 1.0, 7), index=range(7))
    c = reproduce.paired(a, b)
    ref = stats.ttest_rel(a, b)
    d = a - b
    half = stats.t.ppf(0.975, 6) * d.std(ddof=1) / np.sqrt(7)
    assert c.n == 7 and c.p == pytest.approx(ref.pvalue)
    assert (c.low, c.high) == pytest.approx((d.mean() - half, d.mean() + half))


def test_paired_aligns_on_seeds_and_drops_missing():
    a = pd.Series([1.0, 2.0, 3.0], index=[0, 1, 2])
    b = pd.Series([0.5, 1.0], index=[2, 0])
    c = reproduce.paired(a, b)
    assert c.n == 2 and c.mean == pytest.approx(((1.0 - 1.0) + (3.0 - 0.5)) / 2)


def _table(seeds, tasks, value, diverged_seed=None):
    rows = [{"seed": s, "task": t, "eval_accuracy": value(s, t), "epsilon_rank_init":
             value(s, t) / 2 if t % 2 == 0 else np.nan, "diverged": s == diverged_seed}
            for s in seeds for t in range(tasks)]
    return pd.DataFrame(rows)


def test_per_seed_windows_and_diverged_runs_are_excluded():
    table = _table(range(3), 10, lambda s, t: s + t, diverged_seed=2)
    early = reproduce.per_seed(table, "eval_accuracy", "task", "early", 3)
    late = reproduce.per_seed(table, "eval_accuracy", "task", "late", 3)
    assert list(early.index) == [0, 1] and early.tolist() == [1.0, 2.0]
    assert late.tolist() == [8.0, 9.0]


def test_claims_on_a_stream_where_bp_decays_and_l2_er_holds():
    rng = np.random.default_rng(1)
    noise = {s: rng.normal(0, 0.005, 20) for s in range(5)}
    tables = {
        "bp": _table(range(5), 20, lambda s, t: 0.9 - 0.02 * t + noise[s][t]),
        "l2_er": _table(range(5), 20, lambda s, t: 0.9 + noise[s][t] / 2),
        "reset": _table(range(5), 20, lambda s, t: 0.88 + noise[s][t]),
    }
    res = reproduce.StudyResults(reproduce.Study("x", tuple(tables), window=5), tables,
                                 plots.PlotColumns(), higher_is_better=True)
    verdicts = {claim: verdict for claim, _, _, verdict in reproduce.claim_rows(res)}
    assert verdicts["1. BP loses plasticity"] == "reproduced"
    assert verdicts["2. epsilon-rank tracks performance (`epsilon_rank_init`)"] == "reproduced"
    assert verdicts["3. L2-ER maintains plasticity"] == "reproduced"
    assert verdicts["3. L2-ER at or above RESET"] == "reproduced"
    ranking = [m for m, _, _ in reproduce.ranking_rows(res)]
    assert ranking == ["l2_er", "reset", "bp"]


def test_a_loss_metric_flips_the_direction():
    tables = {"bp": _table(range(4), 10, lambda s, t: 0.1 + 0.05 * t + 0.001 * s)}
    columns = plots.PlotColumns(performance="eval_accuracy")
    res = reproduce.StudyResults(reproduce.Study("x", ("bp",), window=3), tables,
                                 columns, higher_is_better=False)
    claims = reproduce.claim_rows(res)
    # A loss that grows over tasks is a loss of plasticity.
    assert claims[0][3] == "reproduced"


def test_the_fraction_of_early_performance_lost_against_its_hand_computed_value():
    # Accuracy 0.8 -> 0.2 (3/4 lost, strong); a loss 0.5 -> 0.6 (1/5 lost, weak); per seed
    # offsets so the interval over seeds has a width.
    def lost(higher_is_better, value):
        tables = {"bp": _table(range(4), 10, value)}
        res = reproduce.StudyResults(reproduce.Study("x", ("bp",), window=2), tables,
                                     plots.PlotColumns(), higher_is_better=higher_is_better)
        return next(c for c in reproduce.claim_rows(res) if c[0] == "1. ... strongly")

    row = lost(True, lambda s, t: (0.8 if t < 2 else 0.2 if t >= 8 else 0.5) + 0.01 * s)
    per_seed = [((0.8 + 0.01 * s) - (0.2 + 0.01 * s)) / (0.8 + 0.01 * s) for s in range(4)]
    assert row[2].startswith(f"{np.mean(per_seed):.3f} [")
    assert row[3] == "strong: at least 0.3"
    row = lost(False, lambda s, t: (0.5 if t < 2 else 0.6 if t >= 8 else 0.55) + 0.001 * s)
    assert row[2].startswith(f"{np.mean([0.1 / (0.5 + 0.001 * s) for s in range(4)]):.3f} [")
    assert row[3] == "weak: below 0.3"


def test_a_significant_but_weak_epsilon_rank_link_is_not_called_reproduced():
    rng = np.random.default_rng(0)
    rows = [{"seed": s, "task": t, "eval_accuracy": e + rng.normal(0, 1.0),
             "epsilon_rank_init": e, "diverged": False}
            for s in range(5) for t, e in enumerate(rng.uniform(0, 1, 200))]
    tables = {"bp": pd.DataFrame(rows)}
    res = reproduce.StudyResults(reproduce.Study("x", ("bp",), window=5), tables,
                                 plots.PlotColumns(), higher_is_better=True)
    claim = next(c for c in reproduce.claim_rows(res) if c[0].startswith("2."))
    # slope 1 against noise of std 1 over uniform [0, 1] inputs: R^2 about 0.08, p << 0.05
    assert claim[3] == f"weak (positive over seeds, but R^2 < {reproduce.STRONG_R2})", claim


def test_paper_scale_runs_the_preflight_first_and_preflight_only_stops_there(monkeypatch,
                                                                            tmp_path):
    from absl.testing import flagsaver

    calls = []
    monkeypatch.setattr(reproduce.preflight, "check_plan",
                        lambda plan, **_: calls.append([name for name, _, _ in plan]))
    monkeypatch.setattr(reproduce, "run_study", lambda *_: calls.append("train") or 0.0)
    monkeypatch.setattr(reproduce, "report", lambda *_: "")
    if not reproduce.FLAGS.is_parsed():
        reproduce.FLAGS.mark_as_parsed()
    paper = [s.experiment for s in reproduce.PAPER_STUDIES]
    paths = {"workdir": str(tmp_path), "report": str(tmp_path / "report.md")}
    with flagsaver.flagsaver(scale="paper", preflight="only", **paths):
        reproduce.main([])
    assert calls == [paper]
    calls.clear()
    with flagsaver.flagsaver(scale="paper", preflight="auto", **paths):
        reproduce.main([])
    assert calls == [paper] + ["train"] * len(paper)
    calls.clear()
    with flagsaver.flagsaver(scale="small", preflight="auto", only=["slippery_ant"], **paths):
        reproduce.main([])
    assert calls == [["slippery_ant"], "train"]


TINY = ("stream.num_tasks=4", "stream.flip_after=40", "stream.eval_size=64", "tasks_per_chunk=2",
        "hessian.num_iters=10", "hessian.grid_size=400", "hessian.examples=64")


@pytest.mark.slow
def test_tune_on_tuning_seeds_then_evaluate_the_selection_on_fresh_seeds(tmp_path):
    import json

    study = reproduce.Study("slowly_changing_regression", ("bp", "l2", "cbp"), tuning_seeds=2,
                            eval_seeds=2, overrides=TINY, window=2, eps_grid=(1e-3, 1e-2, 0.1))
    plan = reproduce.plan_study(study, "small")
    assert plan.grids["l2"] == {"l2": (1e-5, 1e-4, 1e-3)}  # the shared default, centred
    reproduce.run_study(tmp_path, plan, "small")
    directory = tmp_path / "slowly_changing_regression-small"
    tuned_l2 = pd.read_csv(directory / "tuning" / "l2" / "results.csv")
    assert sorted(set(tuned_l2["seed"])) == [0, 1] and sorted(set(tuned_l2["l2"])) == [
        pytest.approx(v) for v in (1e-5, 1e-4, 1e-3)]
    # CBP's replacement rate is not vmapped: one run per value.
    assert len(list(directory.glob("tuning-replacement_rate=*/cbp/results.csv"))) == 3
    # The selection, by hand: lowest mean held-out loss over the last 2 tasks and 2 seeds.
    last = tuned_l2[tuned_l2["task"] >= 2]
    best = last.groupby("l2")["eval_loss"].mean().idxmin()
    tuned = reproduce.select_on_tuning_seeds(directory, plan)
    assert tuned.selections["l2"].value == {"l2": pytest.approx(best)}
    assert set(tuned.curves) == {"estimate", "smoothed"} and tuned.eps in study.eps_grid
    for method in study.methods:
        table = pd.read_csv(directory / "eval" / method / "results.csv")
        assert sorted(set(table["seed"])) == [1000, 1001]  # fresh seeds
        config = json.loads((directory / "eval" / method / "summary.json").read_text())["config"]
        assert config["hessian"]["eps"] == tuned.eps
    config = json.loads((directory / "eval" / "l2" / "summary.json").read_text())["config"]
    assert config["method_settings_by_method"]["l2"]["l2"] == pytest.approx(best)
    figures = tmp_path / "figures"
    figures.mkdir()
    text = reproduce.report(tmp_path, [study], "small", figures, {})
    assert f"**{best:g}: " in text and "| l2 | `l2` |" in text
    assert (figures / "slowly_changing_regression-r2_over_eps.png").exists()
    assert "1. BP loses plasticity" in text and "fresh evaluation seeds from 1000" in text


def test_bad_plans_are_refused_before_anything_runs(tmp_path):
    overlapping = reproduce.Study("slowly_changing_regression", ("bp", "l2"),
                                  tuning_seeds=reproduce.EVAL_SEED_OFFSET + 1)
    with pytest.raises(ValueError, match=r"evaluation seeds \[1000\] are also tuning seeds"):
        reproduce.plan_study(overlapping, "small")
    with pytest.raises(ValueError, match="unknown methods"):
        reproduce.plan_study(reproduce.Study("slowly_changing_regression", ("bp", "l3")),
                             "small")
    assert list(tmp_path.iterdir()) == []


def _write_run(run_dir, table, arrays=None):
    run_dir.mkdir(parents=True)
    table.to_csv(run_dir / "results.csv", index=False)
    if arrays:
        (run_dir / "arrays").mkdir()
        np.savez(run_dir / "arrays" / "chunk_000000.npz", **arrays)


def test_report_from_synthetic_runs_shows_selections_eps_claims_and_signals(tmp_path):
    rng = np.random.default_rng(0)
    study = reproduce.Study("slowly_changing_regression", ("bp", "l2"), tuning_seeds=2,
                            eval_seeds=4, window=3, eps_grid=(0.01, 0.1, 1.0))
    directory = tmp_path / "slowly_changing_regression-small"
    tasks, grid = 8, np.linspace(-5, 5, 2001)
    # Tuning: L2's loss is lowest at 1e-4 (runs 2, 3); the density of each run has mass e at
    # |x| ~ 0.5, the rest at 0 but for a random bit at 0.05, and the loss is 1 - e: R^2 is
    # highest at eps = 0.1, lower at 0.01 (the random bit counts) and undefined at 1.
    mass = rng.uniform(0.1, 0.7, (6, tasks)) + np.array([0, 0, 0.2, 0.2, 0, 0])[:, None]
    bump = lambda c: np.exp(-0.5 * ((grid - c) / 0.004) ** 2)
    density = ((1 - mass)[..., None] * bump(0.0) + mass[..., None] * bump(0.5)
               + 0.3 * rng.uniform(0, 1, (6, tasks, 1)) * bump(0.05))
    arrays = {"density_init": density, "density_grid": np.broadcast_to(grid, density.shape)}
    runs = [(v, s) for v in (1e-5, 1e-4, 1e-3) for s in (0, 1)]
    l2 = pd.DataFrame([{"run": i, "seed": s, "l2": v, "task": t,
                        "eval_loss": 1 - mass[i, t],
                        "diverged": False} for i, (v, s) in enumerate(runs)
                       for t in range(tasks)])
    _write_run(directory / "tuning" / "l2", l2, arrays)
    bp = l2[l2["l2"] == 1e-4].drop(columns="l2").assign(run=lambda d: d["run"] - 2)
    _write_run(directory / "tuning" / "bp", bp, {k: v[2:4] for k, v in arrays.items()})
    # Evaluation on fresh seeds: BP's loss grows, L2's does not; the epsilon-rank falls as the
    # loss grows, one task ahead.
    rows = []
    for method, slope in (("bp", 0.1), ("l2", 0.0)):
        for s in range(1000, 1004):
            noise = rng.normal(0, 0.02, tasks)
            for t in range(tasks):
                rows.append({"method": method, "run": s - 1000, "seed": s, "task": t,
                             "eval_loss": 0.2 + slope * t + noise[t],
                             "epsilon_rank_init": 0.9 - slope * t + rng.normal(0, 0.01),
                             "epsilon_rank_smoothed_init": 0.5 + rng.normal(0, 0.05),
                             "effective_rank/hidden_0": 5 - slope * t,
                             "dormant_fraction/hidden_0": rng.uniform(),
                             "weight_norm": 3 + rng.normal(), "diverged": False})
    table = pd.DataFrame(rows)
    for method in ("bp", "l2"):
        _write_run(directory / "eval" / method,
                   table[table["method"] == method].drop(columns="method"))
    figures = tmp_path / "figures"
    figures.mkdir()
    text = reproduce.report(tmp_path, [study], "small", figures, {"slowly_changing_regression":
                                                                   600.0})
    assert "| l2 | `l2` | 1e-05: " in text and "; **0.0001: " in text
    assert "eps = 0.1 (chosen on the tuning seeds by the R^2 of the smoothed measure)" in text
    assert (figures / "slowly_changing_regression-r2_over_eps.png").exists()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert lines["1. BP loses plasticity"].endswith("| reproduced |")
    assert lines["2. epsilon-rank tracks performance (`epsilon_rank_init`)"].endswith(
        "| reproduced |")
    # the smoothed column is noise here: no link
    assert lines["2. epsilon-rank tracks performance (`epsilon_rank_smoothed_init`)"].endswith(
        "| inconclusive (the interval contains 0) |")
    assert "2. the collapse precedes the loss" in lines
    assert "| epsilon-rank | " in text and "| weight norm | " in text
    assert "this invocation 10 min" in text


def test_the_cpu_plan_meets_the_decisive_studys_design():
    """Every tuned CPU study: its methods over at least 3 values of each of their strengths,
    at least 8 fresh evaluation seeds, none of them a tuning seed; the protocols that can lose
    plasticity strongly (random labels, Dohare's regression at its published scale) are in."""
    tuned = [s for s in reproduce.CPU_STUDIES if s.tune]
    assert {"random_label_fashion_mnist", "slowly_changing_regression"} <= {
        s.experiment for s in tuned}
    for study in tuned:
        plan = reproduce.plan_study(study, "small")
        assert study.eval_seeds >= 8, study.experiment
        assert not set(study.tuning_seed_list()) & set(study.eval_seed_list())
        assert set(plan.grids) == set(study.methods) - {"bp", "reset"}, study.experiment
        for method, strengths in plan.grids.items():
            assert all(len(set(v)) >= 3 for v in strengths.values()), (study.experiment, method)
    regression = next(s for s in tuned if s.experiment == "slowly_changing_regression")
    config = reproduce.study_config(regression, "small")
    assert (config.optimizer.name, config.stream.flip_after, config.batch_size) == ("sgd",
                                                                                     10_000, 1)
