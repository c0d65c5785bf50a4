"""``make reproduce``: the paper's claims at CPU scale, with statistics over seeds.

Runs a fixed list of studies (experiment, methods, seeds, reduced-scale overrides) with the
resumable runner, draws their figures, and writes ``docs/REPRODUCTION.md``: per claim the
statistic, its 95% confidence interval over seeds, a paired test across seeds (the runs of one
seed see the same task sequence under every method, so seeds pair) with n and p, and a verdict.

Claims (He, Guo, Prakash et al. 2025):
  1. plain backprop loses plasticity (late tasks worse than early ones);
  2. the epsilon-rank of the Hessian at new-task initialization tracks performance (R^2);
  3. L2-ER maintains plasticity: above backprop, at or above RESET;
  4. ER alone does not; L2 alone only partly; LayerNorm+L2 underperforms L2-ER.

    python -m spectral_plasticity.reproduce --workdir=workdirs/reproduce [--scale=paper]
        [--preflight=only|skip]   (``spectral_plasticity.preflight``; at the paper scale it
                                   runs first by default)
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import ml_collections
import numpy as np
import pandas as pd
from absl import app, flags, logging
from scipy import stats

from spectral_plasticity import experiment, plots, preflight, runtime, schema

ALPHA = 0.05
# Claim 2 counts as reproduced when epsilon-rank explains at least this share of the variance
# of performance (the paper reports 0.711); a significant but smaller R^2 is reported as weak.
STRONG_R2 = 0.5
# In the order they run: the methods of the paper's claims first.
METHODS = ("bp", "l2_er", "reset", "l2", "er", "layernorm_l2", "cbp", "shrink_perturb",
           "l2_init", "redo", "spectral_norm")


class Study(NamedTuple):
    """One experiment of the reproduction, at a reduced (CPU) scale or the paper's.

    ``window`` rows (tasks or phases) at the start and at the end of the run are averaged into
    a run's early and final performance.
    """

    experiment: str
    methods: tuple[str, ...]
    seeds: int
    overrides: tuple[str, ...] = ()
    window: int = 5


# Reduced scale: fits in about an hour on a 2-core CPU (measured figures in REPRODUCTION.md).
CPU_STUDIES = (
    Study("permuted_fashion_mnist", METHODS, seeds=5, window=5, overrides=(
        "stream.num_tasks=30", "stream.train_size=1000", "stream.eval_size=500",
        "optimizer.learning_rate=0.03", "tasks_per_chunk=5", "hessian.examples=300",
        "hessian.num_iters=30", "hessian.grid_size=2000",
        # KFAC is no claim of the paper; with it, the ER methods' chunk never finishes on
        # XLA's CPU runtime (see README, "Known problems").
        "kfac.enabled=False")),
    Study("slowly_changing_regression", ("bp", "l2", "er", "l2_er", "cbp", "shrink_perturb",
                                         "l2_init", "redo", "reset"), seeds=5, window=5),
    # The gymnax continual task: ten phases, where a short Slippery Ant has only three.
    Study("continual_cartpole", ("bp", "l2_er", "l2", "er"), seeds=5, window=3),
    # A short Slippery Ant (40 PPO updates per friction, of the paper's 977): the paper's own
    # RL benchmark, end to end at the small scale's settings; too short to lose plasticity.
    Study("slippery_ant", ("bp", "l2_er"), seeds=5, window=1, overrides=(
        "num_phases=3", "steps_per_phase=81920")),
)
# Seeds as the paper's code (lop-jax: 5, 20, 5, 5); on CIFAR-100, a day per method on one
# accelerator, the paper's eight methods only.
PAPER_STUDIES = (
    Study("permuted_mnist", METHODS, seeds=5, window=50),
    Study("continual_imagenet", METHODS, seeds=20, window=200),
    Study("incremental_cifar", ("bp", "l2_er", "reset", "l2", "er", "layernorm_l2", "cbp",
                                "spectral_norm"), seeds=5, window=4),
    Study("slippery_ant", ("bp", "l2", "er", "l2_er", "cbp_l2", "layernorm_l2", "spectral_norm",
                           "shrink_perturb", "redo"), seeds=5, window=2),
)


class Comparison(NamedTuple):
    """Paired difference ``a - b`` over seeds: mean, 95% CI, paired t-test."""

    n: int
    mean: float
    low: float
    high: float
    p: float


def paired(a: pd.Series, b: pd.Series) -> Comparison:
    """Paired comparison of per-seed values ``a`` and ``b`` (aligned on their seed index)."""
    joined = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    d = (joined["a"] - joined["b"]).to_numpy(float)
    n = len(d)
    if n < 2:
        mean = float(d.mean()) if n else float("nan")
        return Comparison(n, mean, float("nan"), float("nan"), float("nan"))
    mean, sem = float(d.mean()), float(d.std(ddof=1) / np.sqrt(n))
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sem
    p = float(stats.ttest_1samp(d, 0.0).pvalue) if sem > 0 else (0.0 if mean else 1.0)
    return Comparison(n, mean, mean - half, mean + half, p)


def per_seed(table: pd.DataFrame, metric: str, row: str, which: str, window: int) -> pd.Series:
    """Per seed, ``metric`` averaged over the first or last ``window`` rows (not diverged)."""
    rows = np.sort(table[row].unique())
    chosen = rows[:window] if which == "early" else rows[-window:]
    part = table[table[row].isin(chosen)]
    values = part.groupby("seed")[metric].mean()
    diverged = part.groupby("seed")["diverged"].any()
    return values[~diverged.reindex(values.index, fill_value=False)]


def direction_verdict(c: Comparison, better: bool) -> str:
    """'reproduced' when the difference is significant in the expected direction."""
    if not np.isfinite(c.p):
        return "inconclusive (fewer than 2 seeds)"
    expected = c.mean > 0 if better else c.mean < 0
    if c.p < ALPHA:
        return "reproduced" if expected else "not reproduced (significant, other direction)"
    return "inconclusive (not significant)"


def fmt(c: Comparison) -> str:
    return (f"{c.mean:+.4g} [{c.low:+.4g}, {c.high:+.4g}] \\| n={c.n}, "
            f"p={c.p:.2g}")


class StudyResults(NamedTuple):
    study: Study
    tables: dict[str, pd.DataFrame]
    columns: plots.PlotColumns
    higher_is_better: bool


def load_study(workdir: Path, study: Study, scale: str) -> StudyResults:
    config = experiment.load_config(study.experiment, scale)
    columns = plots.PlotColumns.from_config(config)
    tables = plots.load_results(experiment.run_dir(workdir, study.experiment, scale))
    # Only finished runs: a method stopped part-way would be compared on other tasks.
    last = max((t[columns.row].max() for t in tables.values() if len(t)), default=0)
    done = {m: t for m, t in tables.items() if len(t) and
            t.groupby("seed")[columns.row].max().min() == last}
    for method in sorted(set(tables) - set(done)):
        logging.warning("%s: %s has not finished; left out of the tables", study.experiment,
                        method)
    tables = done
    return StudyResults(study, tables, columns, schema.higher_is_better(columns.performance))


def claim_rows(res: StudyResults) -> list[tuple[str, str, str, str]]:
    """(claim, statistic, estimate [CI] | n, p, verdict) rows of one study."""
    t, col, w = res.tables, res.columns, res.study.window
    metric, row, sign = col.performance, col.row, 1.0 if res.higher_is_better else -1.0
    final = {m: sign * per_seed(tab, metric, row, "late", w) for m, tab in t.items()}
    out = []
    if "bp" in t:
        early = sign * per_seed(t["bp"], metric, row, "early", w)
        c = paired(final["bp"], early)
        out.append(("1. BP loses plasticity",
                    f"BP {metric}: last {w} minus first {w} {row}s (sign: + is better)",
                    fmt(c), direction_verdict(c, better=False)))
    x, y = [], []
    for tab in t.values():
        if col.epsilon_rank in tab:
            keep = np.isfinite(tab[col.epsilon_rank]) & np.isfinite(tab[metric]) & ~tab["diverged"]
            x.append(tab.loc[keep, col.epsilon_rank])
            y.append(tab.loc[keep, metric])
    if x:
        xs, ys = np.concatenate(x), np.concatenate(y)
        if len(xs) >= 3 and np.ptp(xs) > 0:
            fit = stats.linregress(xs, ys)
            r2 = fit.rvalue ** 2
            z = np.arctanh(np.clip(fit.rvalue, -0.999999, 0.999999))
            r_low, r_high = np.tanh(z + np.array([-1.0, 1.0]) * stats.norm.ppf(1 - ALPHA / 2)
                                    / np.sqrt(max(len(xs) - 3, 1)))
            expected = fit.slope * sign > 0
            if fit.pvalue >= ALPHA:
                verdict = "inconclusive (not significant)"
            elif not expected:
                verdict = "not reproduced (significant, other direction)"
            else:  # the paper's claim is a strong link (R^2 0.711), not any significant one
                verdict = ("reproduced" if r2 >= STRONG_R2 else
                           f"weak (significant, but R^2 < {STRONG_R2})")
            out.append(("2. epsilon-rank tracks performance",
                        f"R^2 of {metric} ~ {col.epsilon_rank} over measured {row}s, all methods "
                        "(paper: 0.711 on Continual ImageNet)",
                        f"R^2 {r2:.3f}; r {fit.rvalue:+.3f} [{r_low:+.3f}, {r_high:+.3f}] \\| "
                        f"n={len(xs)}, p={fit.pvalue:.2g}", verdict))
    if "l2_er" in t and "bp" in t:
        c = paired(final["l2_er"], final["bp"])
        out.append(("3. L2-ER maintains plasticity", f"L2-ER minus BP, final {metric}", fmt(c),
                    direction_verdict(c, better=True)))
    if "l2_er" in t and "reset" in t:
        c = paired(final["l2_er"], final["reset"])
        at_or_above = c.n >= 2 and not (c.p < ALPHA and c.mean < 0)
        out.append(("3. L2-ER at or above RESET", f"L2-ER minus RESET, final {metric}", fmt(c),
                    "reproduced" if at_or_above else "not reproduced"))
    if "er" in t and "bp" in t:
        c = paired(final["er"], final["bp"])
        verdict = ("reproduced (no significant gain)" if c.n >= 2 and not (c.p < ALPHA and
                                                                          c.mean > 0)
                   else "not reproduced (ER alone helps)")
        out.append(("4. ER alone does not help", f"ER minus BP, final {metric}", fmt(c), verdict))
    if "l2" in t and "l2_er" in t and "bp" in t:
        above_bp, below = paired(final["l2"], final["bp"]), paired(final["l2"], final["l2_er"])
        partial = above_bp.mean > 0 and below.mean < 0
        significant = above_bp.p < ALPHA and below.p < ALPHA
        verdict = ("reproduced" if partial and significant else
                   "inconclusive" if partial else "not reproduced")
        out.append(("4. L2 alone only partly", f"L2 minus BP; L2 minus L2-ER, final {metric}",
                    f"{fmt(above_bp)}; {fmt(below)}", verdict))
    if "layernorm_l2" in t and "l2_er" in t:
        c = paired(final["layernorm_l2"], final["l2_er"])
        out.append(("4. LayerNorm+L2 underperforms", f"LayerNorm+L2 minus L2-ER, final {metric}",
                    fmt(c), direction_verdict(c, better=False)))
    return out


def ranking_rows(res: StudyResults) -> list[tuple[str, str, str]]:
    """(method, final performance mean [CI], difference to BP) sorted best first."""
    t, col, w = res.tables, res.columns, res.study.window
    sign = 1.0 if res.higher_is_better else -1.0
    final = {m: per_seed(tab, col.performance, col.row, "late", w) for m, tab in t.items()}
    order = sorted(final, key=lambda m: -sign * final[m].mean())
    rows = []
    for m in order:
        mean, low, high = plots.confidence_band(final[m].to_numpy()[:, None])
        vs_bp = fmt(paired(final[m], final["bp"])) if "bp" in final and m != "bp" else "—"
        rows.append((m, f"{mean[0]:.4g} [{low[0]:.4g}, {high[0]:.4g}] (n={len(final[m])})",
                     vs_bp))
    return rows


def report(workdir: Path, studies: Sequence[Study], scale: str, figures_dir: Path,
           seconds: dict[str, float]) -> str:
    """The markdown tables of ``docs/REPRODUCTION.md`` (claims, rankings, figures)."""
    lines = []
    for study in studies:
        res = load_study(workdir, study, scale)
        if not res.tables:
            lines.append(f"### {study.experiment}\n\nnot run.\n")
            continue
        took = seconds.get(study.experiment)
        lines += [f"### {study.experiment} ({scale} scale, {study.seeds} seeds"
                  + (f", this invocation {took / 60:.0f} min" if took else "") + ")", "",
                  "Overrides: " + (", ".join(f"`{o}`" for o in study.overrides) or "none"), "",
                  "| claim | statistic | estimate [95% CI] \\| paired test | verdict |",
                  "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in claim_rows(res)]
        lines += ["", f"Ranking by final {res.columns.performance} (last {study.window} "
                  f"{res.columns.row}s):", "",
                  "| method | final (mean [95% CI]) | minus BP [95% CI] \\| paired test |",
                  "|---|---|---|"]
        lines += [f"| {m} | {f} | {d} |" for m, f, d in ranking_rows(res)]
        src = experiment.run_dir(workdir, study.experiment, scale) / "plots"
        for png in sorted(src.glob("*.png")):
            target = figures_dir / f"{study.experiment}-{png.name}"
            shutil.copyfile(png, target)
            lines.append(f"\n![{study.experiment} {png.stem}](figures/{target.name})")
        lines.append("")
    return "\n".join(lines)


def study_config(study: Study, scale: str) -> ml_collections.ConfigDict:
    """The config a study runs: the experiment at ``scale`` with the study's seeds and
    overrides."""
    config = experiment.load_config(study.experiment, scale)
    config.seeds = study.seeds
    for assignment in study.overrides:
        experiment.apply_override(config, assignment)
    return config


def run_study(workdir: Path, study: Study, scale: str) -> float:
    """Runs (or resumes) one study and draws its figures; returns the seconds it took."""
    config = study_config(study, scale)
    run_dir = experiment.run_dir(workdir, study.experiment, scale)
    start = time.perf_counter()
    experiment.train_and_evaluate(config, run_dir, methods=study.methods)
    plots.plot_experiment(run_dir, config)
    return time.perf_counter() - start


FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "workdirs/reproduce", "Where the runs are written (resumable).")
flags.DEFINE_enum("scale", "small", list(experiment.SCALES), "small: CPU studies; paper: protocol.")
flags.DEFINE_list("only", None, "Run only these experiments of the plan.")
flags.DEFINE_bool("report_only", False, "Only write the report from the results already in "
                  "--workdir (no training).")
flags.DEFINE_string("report", None, "Where the tables are written (default: "
                    "docs/REPRODUCTION_RESULTS.md, or docs/REPRODUCTION_RESULTS_paper.md).")
flags.DEFINE_enum("preflight", "auto", ["auto", "only", "skip"], "Run every method of every "
                  "study for one tiny chunk first (spectral_plasticity/preflight.py): auto: at "
                  "the paper scale; only: that and nothing else; skip: never.")


def main(argv: list[str]) -> None:
    del argv
    studies = CPU_STUDIES if FLAGS.scale == "small" else PAPER_STUDIES
    if FLAGS.only:
        names = {s.experiment for s in studies}
        unknown = sorted(set(FLAGS.only) - names)
        if unknown:
            raise app.UsageError(f"unknown studies {unknown}; the plan has {sorted(names)}")
        studies = tuple(s for s in studies if s.experiment in FLAGS.only)
    if FLAGS.preflight == "only" or (FLAGS.preflight == "auto" and FLAGS.scale == "paper"
                                     and not FLAGS.report_only):
        preflight.check_plan([(s.experiment, study_config(s, FLAGS.scale), s.methods)
                              for s in studies])
        if FLAGS.preflight == "only":
            return
    workdir = Path(FLAGS.workdir)
    seconds = {}
    for study in () if FLAGS.report_only else studies:
        logging.info("study %s: %d methods x %d seeds", study.experiment, len(study.methods),
                     study.seeds)
        seconds[study.experiment] = run_study(workdir, study, FLAGS.scale)
    report_path = Path(FLAGS.report or ("docs/REPRODUCTION_RESULTS.md" if FLAGS.scale == "small"
                                        else "docs/REPRODUCTION_RESULTS_paper.md"))
    figures = report_path.parent / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report(workdir, studies, FLAGS.scale, figures, seconds))
    print(report_path)


if __name__ == "__main__":
    runtime.configure_runtime()
    app.run(main)
