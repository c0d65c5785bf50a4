"""The result schema: the columns of ``results.csv``, their direction, and the measurement suffixes.

``run_sweep`` writes one row per (run, task or phase) with, in this order:

- ``run``, ``seed``: the run's index in the sweep and its PRNG seed;
- the swept hyperparameters, one column each, named as swept: ``learning_rate`` or a method
  setting (``methods.catalog.SETTINGS``); ``swept_columns`` finds them by name;
- the row index, ``task`` (supervised) or ``phase`` (PPO);
- every scalar metric of the trainer (``METRICS``; ``metric/layer`` columns by ``PREFIXES``);
- ``diverged``: the run met a non-finite loss or weight norm at or before this row.

A quantity measured at a task's (phase's) start and end is two columns, ``<name>_init`` (at the
new task's initialization: the parameters where the previous task ended) and ``<name>_end``
(``at_init``, ``at_end``); a measurement taken on a subset of tasks is NaN on the others.
Larger metrics (spectral densities, KFAC spectra) go to ``arrays/`` with the same names.

Every metric has a direction: higher is better (``True``), lower is better (``False``), or
neither (``None``: a diagnostic, such as a weight norm or a PPO loss term). ``higher_is_better``
is what a comparison of methods reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, TypeVar

from spectral_plasticity.methods.catalog import SETTINGS

RUN, SEED, DIVERGED = "run", "seed", "diverged"
ROW_NAMES = ("task", "phase")
INIT, END = "_init", "_end"
SWEPT = ("learning_rate", *SETTINGS)
T = TypeVar("T")


class Metric(NamedTuple):
    """A metric's direction (``None``: no better direction) and meaning."""

    higher_is_better: bool | None
    doc: str


METRICS: dict[str, Metric] = {
    "train_loss": Metric(False, "online training loss, mean over the task's steps"),
    "eval_loss": Metric(False, "held-out loss at the task's end"),
    "train_accuracy": Metric(True, "online training accuracy"),
    "eval_accuracy": Metric(True, "held-out accuracy at the task's end"),
    "weight_norm": Metric(None, "L2 norm of all parameters at the row's end"),
    "epsilon_rank": Metric(True, "Hessian epsilon-rank, the quadrature estimate (_init, _end)"),
    "epsilon_rank_lo": Metric(True, "lower end of its interval (certain bounds - 2 SE)"),
    "epsilon_rank_hi": Metric(True, "upper end of its interval (certain bounds + 2 SE)"),
    "epsilon_rank_se": Metric(None, "its standard error over Lanczos probes"),
    "epsilon_rank_smoothed": Metric(True, "the paper code's Gaussian-smoothed epsilon-rank"),
    "epsilon_rank_smoothing_sigma": Metric(None, "the smoothing kernel's sigma"),
    "epsilon_rank_kernel_tail": Metric(None, "the zero node's kernel tail outside [-eps, eps]"),
    "top_eigenvalue": Metric(None, "largest Ritz value of the Hessian (_init, _end)"),
    "curvature_dim": Metric(None, "dimension of the measured Hessian: the probes' n (_init, _end)"),
    "episode_return": Metric(True, "online episodic return over the phase"),
    "episode_return_last": Metric(True, "online episodic return over the phase's last tenth"),
    "episodes": Metric(None, "episodes completed in the phase"),
    "reward_per_step": Metric(True, "mean reward per environment step"),
    "recycled_units": Metric(None, "units re-initialized by CBP or ReDo in the phase"),
    "policy_loss": Metric(None, "PPO clipped surrogate loss"),
    "value_loss": Metric(None, "PPO value loss"),
    "entropy": Metric(None, "policy entropy"),
    "approx_kl": Metric(None, "approximate KL between old and new policy"),
    "clip_fraction": Metric(None, "fraction of clipped probability ratios"),
    "env_steps": Metric(None, "environment steps at the phase's end"),
    # arrays (arrays/*.npz)
    "density": Metric(None, "Hessian spectral density on density_grid (_init, _end)"),
    "density_grid": Metric(None, "the grid of the spectral densities"),
    "ritz_nodes": Metric(None, "Lanczos Ritz values, (probes, steps) (_init, _end)"),
    "ritz_weights": Metric(None, "their Gauss quadrature weights (_init, _end)"),
    "update_return_sum": Metric(None, "per update: sum of the returns of finished episodes"),
    "update_episodes": Metric(None, "per update: episodes finished"),
}
# Columns ``<prefix><layer or name>``: feature metrics (``metrics.FEATURE_METRICS``) per hidden
# layer, per-network weight norms, the environment's dynamics, KFAC diagnostics.
PREFIXES: dict[str, Metric] = {
    "effective_rank/": Metric(True, "effective rank of a layer's features"),
    "srank/": Metric(True, "srank of a layer's features"),
    "stable_rank/": Metric(True, "stable rank of a layer's features"),
    "feature_rank/": Metric(True, "numerical rank of a layer's features"),
    "dormant_fraction/": Metric(False, "fraction of tau-dormant units (tau = 0.025)"),
    "dead_fraction/": Metric(False, "fraction of units inactive on every example"),
    "active_fraction/": Metric(True, "fraction of active unit outputs"),
    "weight_norm/": Metric(None, "L2 norm of one network's parameters"),
    "env/": Metric(None, "the phase's dynamics"),
    "kfac_": Metric(None, "KFAC factor diagnostics (_init)"),
}


def at_init(name: str) -> str:
    """The column of ``name`` measured at a new task's initialization."""
    return name + INIT


def at_end(name: str) -> str:
    """The column of ``name`` measured at a task's end."""
    return name + END


def start_end_columns(start: Mapping[str, T], end: Mapping[str, T]) -> dict[str, T]:
    """A measurement taken at a row's start and end as columns: ``<name>_init`` and
    ``<name>_end``, except the start's spectral-density grid, which is ``density_grid``."""
    columns = {at_init(k): v for k, v in start.items()}
    columns |= {at_end(k): v for k, v in end.items()}
    columns["density_grid"] = columns.pop(at_init("density_grid"))
    return columns


def metric(column: str) -> Metric:
    """The ``Metric`` of a result column (``_init``/``_end`` measurements included)."""
    base = column.removesuffix(INIT).removesuffix(END)
    if base in METRICS:
        return METRICS[base]
    for prefix, found in PREFIXES.items():
        if column.startswith(prefix):
            return found
    raise KeyError(f"{column!r} is not a result metric; see spectral_plasticity.schema")


def higher_is_better(column: str) -> bool:
    """True when a higher ``column`` is better, False when lower is; a column without a
    direction (a diagnostic) is refused."""
    direction = metric(column).higher_is_better
    if direction is None:
        raise ValueError(f"{column!r} has no better direction; compare methods on a loss, an "
                         "accuracy, a return or a rank")
    return direction


def swept_columns(columns: Iterable[str]) -> list[str]:
    """The swept hyperparameter columns among ``columns``, in their order."""
    return [c for c in columns if c in SWEPT]
