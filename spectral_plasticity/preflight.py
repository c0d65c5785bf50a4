"""Preflight of a reproduction plan: every study's config, every method, one tiny chunk each.

``make reproduce SCALE=paper`` runs for days on an accelerator; a config error in its third
study must not surface on the second day. ``check_plan`` takes every study of the plan as it
would run (its config at the plan's scale, with the study's seeds and overrides), shrinks the
*length* of each run (``tiny_config``: two tasks of a few batches, or one PPO update; one seed;
a 4-step Lanczos), and for every method of the study builds the trainer, compiles the chunk
exactly as ``train.sweep.run_sweep`` does (``jit(vmap(run_chunk))``) and runs it once on the
current device. The architecture, the optimizer, the method settings (``method_settings`` and
``method_settings_by_method``), the data source and the Hessian protocol stay the study's, so
whatever would fail in the long run fails here, in minutes. Every failure is collected and then
reported as one line naming the study and the method (``PreflightError``).

``shrink_model=True`` also narrows the networks (for the test suite on a CPU); the real
preflight keeps them.

    python -m spectral_plasticity.reproduce --scale=paper --preflight=only
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from spectral_plasticity import experiment
from spectral_plasticity.train import method_registry
from spectral_plasticity.train.sweep import hparam_grid

# Lengths of the tiny run: tasks (supervised) and batches per task, Lanczos steps.
TASKS = 2
BATCHES_PER_TASK = 2
LANCZOS_STEPS = 4
GRID_SIZE = 32
EXAMPLES = 16
MODES = ("run", "trace", "build")


class PreflightError(ValueError):
    """One or more methods of the plan cannot run; one line per (study, method)."""


class Checked(NamedTuple):
    """One (study, method) of the plan: the seconds its build, compile and run took, or the
    one-line error that stopped it."""

    study: str
    method: str
    seconds: float
    error: str | None


def _shrink_stream(stream: ml_collections.ConfigDict, batch_size: int) -> None:
    """Two tasks of ``BATCHES_PER_TASK`` batches and ``EXAMPLES`` held-out examples."""
    stream.num_tasks = TASKS
    if "train_size" in stream:
        stream.train_size = BATCHES_PER_TASK * batch_size
    if "eval_size" in stream:
        stream.eval_size = min(int(stream.eval_size), EXAMPLES)
    if "flip_after" in stream:  # slowly-changing regression: examples per task
        stream.flip_after = BATCHES_PER_TASK * batch_size
    if "epochs_per_task" in stream:  # continual ImageNet: one pass over the pair
        stream.epochs_per_task = 1
    if "num_classes" in stream and "classes_per_task" in stream:
        stream.num_classes = TASKS * int(stream.classes_per_task)


def _shrink_networks(model: ml_collections.ConfigDict) -> None:
    for name in ("hidden_sizes", "head_hidden_sizes"):
        if name in model:
            model[name] = tuple(min(8, w) for w in model[name])
    if "stage_channels" in model:
        model.stage_channels = tuple(4 for _ in model.stage_channels)


def _clamp_erank_batch(c: ml_collections.ConfigDict, rollout: int) -> None:
    """PPO's ER step reads at most the rollout: the tiny rollout caps every ``erank_batch``."""
    for settings in (c.method_settings, *(c.get("method_settings_by_method", None) or {}
                                          ).values()):
        if settings is not None and "erank_batch" in settings:
            settings.erank_batch = min(int(settings.erank_batch), rollout)


def tiny_config(config: ml_collections.ConfigDict, *, shrink_model: bool = False
                ) -> ml_collections.ConfigDict:
    """``config`` with one chunk of a tiny length (see the module docstring)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.seeds = 1
    c.hessian.update(num_iters=LANCZOS_STEPS, grid_size=GRID_SIZE)
    if "examples" in c.hessian:
        c.hessian.examples = min(int(c.hessian.examples), EXAMPLES)
    if "kfac" in c:
        c.kfac.num_iters = LANCZOS_STEPS
    if c.trainer == "ppo":
        c.num_phases = c.phases_per_chunk = 1
        c.ppo.update(num_envs=2, num_steps=8 * int(c.ppo.num_minibatches), update_epochs=1)
        c.steps_per_phase = int(c.ppo.num_envs * c.ppo.num_steps)
        _clamp_erank_batch(c, c.steps_per_phase)
        c.feature_samples = min(int(c.feature_samples), EXAMPLES)
    else:
        _shrink_stream(c.stream, int(c.batch_size))
        c.tasks_per_chunk = TASKS
    if shrink_model:
        _shrink_networks(c.model)
    return c


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "(no message)"
    return f"{type(error).__name__}: {text}"


def run_one_chunk(config: ml_collections.ConfigDict, mode: str = "run") -> None:
    """Builds ``config``'s trainer and runs its first chunk as ``run_sweep`` would (one run,
    vmapped, jitted), with the first point of its sweep; raises on a non-finite metric.

    ``mode``: ``"run"`` (compile and run), ``"trace"`` (only trace the chunk, no compilation:
    shape and config errors, in seconds) or ``"build"`` (only build the trainer: the model,
    the method's plan, the data).
    """
    if mode not in MODES:
        raise ValueError(f"unknown preflight mode {mode!r}; choose one of {list(MODES)}")
    trainer = experiment.make_trainer(config)
    if mode == "build":
        return
    point = hparam_grid(dict(config.sweep))[0] if config.sweep else {}
    hparams = {k: jnp.asarray([v], jnp.float32) for k, v in point.items()}
    init = jax.vmap(trainer.init)
    chunk = jax.vmap(trainer.run_chunk, in_axes=(0, 0, None) if trainer.data else (0, 0))
    data = (trainer.data,) if trainer.data else ()
    keys = jax.random.split(jax.random.key(0), 1)
    if mode == "trace":
        jax.eval_shape(chunk, jax.eval_shape(init, keys, hparams), hparams, *data)
        return
    _, metrics = jax.jit(chunk)(jax.jit(init)(keys, hparams), hparams, *data)
    keys = trainer.divergence_keys or tuple(metrics)
    bad = sorted(k for k in keys if k in metrics
                 and not np.all(np.isfinite(np.asarray(metrics[k], np.float64))))
    if bad:
        raise FloatingPointError(f"non-finite {bad} after one tiny chunk")


def check_study(study: str, config: ml_collections.ConfigDict, methods: Sequence[str], *,
                mode: str = "run", shrink_model: bool = False) -> list[Checked]:
    """Every method of one study, one tiny chunk each (errors are returned, not raised)."""
    try:
        method_registry.check_methods(list(methods))
        by_method = config.get("method_settings_by_method", None) or {}
        method_registry.check_settings_by_method(
            {m: dict(v or {}) for m, v in dict(by_method).items()}, list(config.methods))
        tiny = tiny_config(config, shrink_model=shrink_model)
    except Exception as error:  # reported with the study's name
        return [Checked(study, "(config)", math.nan, _one_line(error))]
    checked = []
    for method in methods:
        start = time.perf_counter()
        try:
            run_one_chunk(experiment.method_config(tiny, method), mode)
            error = None
        except Exception as failure:  # every failure is reported at the end
            error = _one_line(failure)
        checked.append(Checked(study, method, time.perf_counter() - start, error))
        logging.info("preflight %s / %s: %s (%.1f s)", study, method, error or "ok",
                     checked[-1].seconds)
    return checked


def check_plan(plan: Sequence[tuple[str, ml_collections.ConfigDict, Sequence[str]]], *,
               mode: str = "run", shrink_model: bool = False) -> list[Checked]:
    """Checks every ``(study, config, methods)`` of ``plan`` (``mode``: see
    ``run_one_chunk``); returns what was checked.

    Raises:
      PreflightError: one line ``preflight: <study> / <method>: <error>`` per failure.
    """
    checked = [c for study, config, methods in plan
               for c in check_study(study, config, methods, mode=mode,
                                    shrink_model=shrink_model)]
    failures = [f"preflight: {c.study} / {c.method}: {c.error}" for c in checked if c.error]
    if failures:
        raise PreflightError("\n".join(failures))
    return checked
