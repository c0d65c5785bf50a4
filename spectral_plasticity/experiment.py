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
- optionally ``optimizer_by_method``: one method's optimizer options over ``optimizer``
  (``method_config``);

and every field the trainer reads. ``train_and_evaluate(config, workdir)`` runs each method as
one sweep in ``workdir/<method>``, resuming whatever was already done there;
``run_dir(workdir, name, scale)`` is the directory of an experiment at a scale.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_flags import config_flags

from spectral_plasticity.train.sweep import ChunkedTrainer, check_config, hparam_grid, run_sweep

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
SCALES = ("small", "paper")
TRAINERS = {
    "supervised": "spectral_plasticity.train.supervised",
    "ppo": "spectral_plasticity.rl.ppo",
}


def available_experiments(directory: Path = EXPERIMENTS_DIR) -> list[str]:
    """Names of the experiment config files in ``directory``."""
    return sorted(p.stem for p in directory.glob("*.py") if not p.stem.startswith("_"))


def run_dir(workdir: str | Path, name: str, scale: str) -> Path:
    """The directory of experiment ``name`` at ``scale`` under ``workdir``."""
    return Path(workdir) / f"{name}-{scale}"


def load_config(name: str, scale: str = "small",
                directory: Path = EXPERIMENTS_DIR) -> ml_collections.ConfigDict:
    """``get_config(scale)`` of ``experiments/<name>.py``; clear errors for unknown names.

    The file is loaded as ``ml_collections.config_flags`` loads ``--config=<file>:<scale>``.
    """
    valid = available_experiments(directory)
    if name not in valid:
        raise ValueError(f"unknown experiment {name!r}; choose one of {valid}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {list(SCALES)}")
    parser = config_flags.ConfigFileFlagParser(name=f"experiments.{name}", lock_config=False)
    config = parser.parse(f"{directory / name}.py:{scale}")
    config.experiment = name
    config.scale = scale
    return config


def _node_of(config: ml_collections.ConfigDict, path: str
             ) -> tuple[ml_collections.ConfigDict, str]:
    """The section holding ``path``'s last key, and that key; unknown keys are refused."""
    *parents, leaf = path.strip().split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            where = ".".join(parents[:i]) or "the config"
            raise ValueError(f"unknown config key {path!r}: {where} has no section {part!r}; "
                             f"valid keys: {sorted(node.keys())}")
        node = node[part]
    if leaf not in node and parents != ["sweep"]:
        where = ".".join(parents) or "the config"
        raise ValueError(f"unknown config key {path!r}; valid keys of {where}: "
                         f"{sorted(node.keys())}")
    return node, leaf


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _typed(path: str, text: str, current: Any) -> Any:
    """``text`` as a value of ``current``'s type (lists of numbers for a ``sweep`` entry)."""
    try:
        value: Any = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if path.startswith("sweep."):
        if not isinstance(value, list | tuple) or not value or not all(map(_is_number, value)):
            raise ValueError(f"bad value for {path}: {text!r}; a sweep entry is a list of "
                             "numbers, e.g. sweep.learning_rate=[0.01,0.03]")
        return list(value)
    if isinstance(current, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        value = tuple(value) if isinstance(value, list | tuple) else (value,)
        kinds = {int if isinstance(v, int) else type(v) for v in current if not isinstance(v, bool)}
        if kinds == {int} and not all(isinstance(v, int) and not isinstance(v, bool)
                                      for v in value):
            raise ValueError(f"bad value for {path}: {text!r}; expected integers, e.g. "
                             f"{path}={','.join(map(str, current))}")
        if kinds and kinds <= {int, float} and not all(map(_is_number, value)):
            raise ValueError(f"bad value for {path}: {text!r}; expected numbers, e.g. "
                             f"{path}={','.join(map(str, current))}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> None:
    """Applies ``"a.b=value"`` to ``config`` in place (value parsed as a Python literal).

    Unknown keys and values of the wrong type are refused with the valid choices. Entries of
    ``sweep`` (hyperparameter lists) may be added: ``sweep.learning_rate=[0.01,0.03]``.
    """
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like key=value")
    path, text = assignment.split("=", 1)
    node, leaf = _node_of(config, path)
    value = _typed(path.strip(), text, node.get(leaf, None))
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


def method_config(config: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
    """The config ``method`` runs: a copy of ``config`` with ``method`` set and the method's own
    optimizer options ``config.optimizer_by_method[method]`` (e.g. its learning rate or Adam
    betas, where the paper selected them per method) over ``config.optimizer``."""
    run_config = ml_collections.ConfigDict(config.to_dict())
    run_config.method = method
    own = dict((config.get("optimizer_by_method", None) or {}).get(method, None) or {})
    unknown = sorted(set(own) - set(config.optimizer))
    if unknown:
        raise ValueError(f"optimizer_by_method.{method}: unknown optimizer options {unknown}; "
                         f"valid: {sorted(config.optimizer)}")
    run_config.optimizer.update(own)
    return run_config


def check_before_running(config: ml_collections.ConfigDict, workdir: str | Path,
                         methods: Sequence[str]) -> None:
    """Everything that can be refused without training, for every method, before any runs.

    Seeds, method names and settings, the optimizer, and that no method's directory holds a run
    of another config: a bad value never costs a finished method's minutes, and nothing is
    created on disk before it is refused.
    """
    from spectral_plasticity.train import method_registry

    if isinstance(config.seeds, bool) or not isinstance(config.seeds, int) or config.seeds < 1:
        raise ValueError(f"seeds must be a positive number of seeds, got {config.seeds!r}")
    method_registry.check_methods(methods)
    by_method = config.get("method_settings_by_method", None) or {}
    method_registry.check_settings_by_method(
        {m: dict(v or {}) for m, v in dict(by_method).items()}, list(config.methods))
    for method in methods:
        run_config = method_config(config, method)
        if "optimizer" in run_config:
            settings = method_registry.resolve_settings(
                method_registry.config_settings(run_config))
            try:
                method_registry.optimizer(method_registry.get(method), settings,
                                          dict(run_config.optimizer), {})
            except ValueError as error:
                raise ValueError(f"config.optimizer of method {method!r}: {error}") from error
        check_config(Path(workdir) / method, run_config.to_dict())


def data_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Where the stream's data was read from, for ``summary.json`` (none for generated data)."""
    stream = config.get("stream", None)
    if stream is None or "name" not in stream:
        return {}
    from spectral_plasticity.tasks import data_source

    return {"data": {"stream": stream.name,
                     "source": data_source(stream.name, stream.get("data_dir", "") or None)}}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path,
                       methods: Sequence[str] | None = None, max_chunks: int | None = None,
                       restart: bool = False) -> dict[str, Path]:
    """Runs every method of ``config`` (or ``methods``) as a resumable sweep under ``workdir``.

    Seeds are ``seed_offset, ..., seed_offset + seeds - 1`` (``seed_offset`` 0 unless set).
    ``restart``: start a method over when its rows have no readable checkpoint (see
    ``run_sweep``). Returns the run directory of each method.
    """
    methods = list(methods or config.methods)
    check_before_running(config, workdir, methods)
    offset = int(config.get("seed_offset", 0))
    seeds = list(range(offset, offset + config.seeds))
    grid = hparam_grid(dict(config.sweep)) if config.sweep else [{}]
    run_dirs = {}
    for method in methods:
        run_config = method_config(config, method)
        trainer = make_trainer(run_config)
        run_dirs[method] = Path(workdir) / method
        run_sweep(trainer, seeds=seeds, hparams=grid, run_dir=run_dirs[method],
                  config=run_config.to_dict(), label=f"{config.experiment}/{method}",
                  max_chunks=max_chunks, restart=restart, record=data_record(run_config))
    return run_dirs
