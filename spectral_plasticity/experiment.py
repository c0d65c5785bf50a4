"""Experiments: config files, command-line overrides and ``train_and_evaluate``.

An experiment is a Python file ``experiments/<name>.py`` whose ``get_config(scale)`` returns an
``ml_collections.ConfigDict`` (flax-examples / big_vision style) with at least

- ``trainer``: which trainer runs it (``"supervised"`` or ``"ppo"``);
- ``methods``: the plasticity methods to compare (names of ``train.method_registry``);
- ``seeds``: how many seeds per method and hyperparameter setting (vmapped), the seeds
  ``seed_offset, ..., seed_offset + seeds - 1`` (``seed_offset`` optional, default 0);
- ``sweep``: hyperparameter lists vmapped together with the seeds (may be empty);
- ``method_settings`` (shared) and ``method_settings_by_method`` (one method's own values
  over the shared ones, e.g. ``{"l2_er": {"l2": 1e-3, "erank_learning_rate": 1e-2}}``);

and every field the trainer reads. ``train_and_evaluate(config, workdir)`` runs each method as
one sweep in ``workdir/<method>``, resuming whatever was already done there.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from spectral_plasticity.train.sweep import ChunkedTrainer, hparam_grid, run_sweep

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
SCALES = ("small", "paper")
TRAINERS = {
    "supervised": "spectral_plasticity.train.supervised",
    "ppo": "spectral_plasticity.rl.ppo",
}


def available_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the experiment config files in ``directory``."""
    return sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))


def load_config(name: str, scale: str = "small",
                directory: Path = EXPERIMENTS_DIR) -> ml_collections.ConfigDict:
    """``get_config(scale)`` of ``experiments/<name>.py``; clear errors for unknown names."""
    valid = available_experiments(directory)
    if name not in valid:
        raise ValueError(f"unknown experiment {name!r}; choose one of {valid}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    spec = importlib.util.spec_from_file_location(f"experiments.{name}", directory / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(directory))  # experiment files may build on each other
    try:
        spec.loader.exec_module(module)
        config = module.get_config(scale)
    finally:
        sys.path.remove(str(directory))
    config.experiment = name
    config.scale = scale
    return config


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies ``"a.b=value"`` to ``config`` in place (value parsed as a Python literal).

    Unknown keys and values of the wrong type are refused with the valid choices.
    """
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key=value")
    path, text = assignment.split("=", 1)
    *parents, leaf = path.strip().split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            where = ".".join(parents[:i]) or "the config"
            raise ValueError(f"unknown config key {path!r}: {where} has no section {part!r}; "
                             f"valid keys: {sorted(node.keys())}")
        node = node[part]
    if leaf not in node:
        where = ".".join(parents) or "the config"
        raise ValueError(f"unknown config key {path!r}; valid keys of {where}: "
                         f"{sorted(node.keys())}")
    try:
        value: Any = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    current = node[leaf]
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and isinstance(value, str):
        value = tuple(v for v in value.split(",") if v)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    try:
        node[leaf] = value
    except TypeError as error:
        raise ValueError(f"bad value for {path}: {text!r} ({error})") from error


def make_trainer(config: ml_collections.ConfigDict) -> ChunkedTrainer:
    """The trainer named by ``config.trainer``, built for ``config.method``."""
    if config.trainer not in TRAINERS:
        raise ValueError(f"unknown trainer {config.trainer!r}; choose one of {sorted(TRAINERS)}")
    module = importlib.import_module(TRAINERS[config.trainer])
    make_train: Callable[[ml_collections.ConfigDict], ChunkedTrainer] = module.make_train
    return make_train(config)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       methods: Sequence[str] | None = None,
                       max_chunks: int | None = None) -> dict[str, Path]:
    """Runs every method of ``config`` (or ``methods``) as a resumable sweep under ``workdir``.

    Returns the run directory of each method.
    """
    from spectral_plasticity.train import method_registry

    methods = list(methods or config.methods)
    method_registry.check_methods(methods)
    by_method = config.get("method_settings_by_method", None) or {}
    method_registry.check_settings_by_method(
        {m: dict(v or {}) for m, v in dict(by_method).items()}, list(config.methods))
    offset = int(config.get("seed_offset", 0))
    seeds = list(range(offset, offset + config.seeds))
    grid = hparam_grid(dict(config.sweep)) if config.sweep else [{}]
    run_dirs = {}
    for method in methods:
        run_config = ml_collections.ConfigDict(config.to_dict())
        run_config.method = method
        run_dir = Path(workdir) / method
        logging.info("%s / %s: %d seeds x %d settings -> %s", config.experiment, method,
                     len(seeds), len(grid), run_dir)
        trainer = make_trainer(run_config)
        run_sweep(trainer, seeds=seeds, hparams=grid, run_dir=run_dir,
                  config=run_config.to_dict(), label=f"{config.experiment}/{method}",
                  max_chunks=max_chunks)
        run_dirs[method] = run_dir
    return run_dirs
