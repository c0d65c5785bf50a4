"""Runs many seeds and hyperparameters of one method at once, checkpointed between chunks.

A trainer (supervised streams, PPO) is a ``ChunkedTrainer``: a pure ``init(key, hparams)`` for
one run and a pure ``run_chunk(state, hparams) -> (state, metrics)`` that advances it by a fixed
number of tasks or phases (a ``lax.scan``). ``run_sweep`` stacks every (hyperparameter, seed)
pair on one leading "runs" axis, ``jax.vmap``-s both functions over it, shards that axis over
all devices (``jax.sharding``; on a TPU pod after ``jax.distributed.initialize()`` the devices
of every host), and loops over chunks. After each chunk it appends the result rows, writes an
orbax checkpoint of the whole state, and stops cleanly at a SIGTERM. A restarted sweep resumes
from the newest readable checkpoint and produces bit-identical results.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spectral_plasticity.train import results
from spectral_plasticity.train.checkpoint import Checkpointer
from spectral_plasticity.train.progress import ProgressBar
from spectral_plasticity.train.watchdog import StallWatchdog

PyTree = Any
Hparams = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class ChunkedTrainer(NamedTuple):
    """A continual run, split into equal chunks, as ``run_sweep`` drives it.

    Attributes:
      init: ``init(key, hparams) -> state`` for one run; ``state`` is a pytree of arrays.
      run_chunk: ``run_chunk(state, hparams) -> (state, metrics)``, pure and jit-able; every
        metric has leading axis ``rows_per_chunk`` (one row per task or phase). Metrics with
        shape ``(rows_per_chunk,)`` go to ``results.csv``; larger ones to the chunk's npz.
      num_chunks: chunks in a whole run.
      rows_per_chunk: rows (tasks, phases) each chunk produces.
      row_name: what a row is (``"task"``, ``"phase"``), the name of the row-index column.
      work_per_row: units of work in one row, for the progress bar (e.g. environment steps).
      work_unit: name of that unit.
      data: arrays every run reads but none owns (a stream's images), passed to ``run_chunk``
        as a third, unbatched argument ``run_chunk(state, hparams, data)`` rather than closed
        over (which would embed them in the compiled program); ``()`` when there are none.
      divergence_keys: the metrics whose non-finite values mean that a run diverged (its
        loss, its weight norm). Other metrics may be NaN where nothing was measured (a
        Hessian measured every few tasks, a return before any episode ended). ``None``: every
        floating metric counts.
    """

    init: Callable[[jax.Array, Hparams], PyTree]
    run_chunk: Callable[[PyTree, Hparams], tuple[PyTree, Metrics]]
    num_chunks: int
    rows_per_chunk: int
    row_name: str = "task"
    work_per_row: int = 1
    work_unit: str = "tasks"
    divergence_keys: tuple[str, ...] | None = None
    data: PyTree = ()


class ConfigChangedError(ValueError):
    """The work directory holds a run of another configuration."""


def hparam_grid(sweep: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the swept values: ``{'lr': [1, 2], 'l2': [3]}`` -> 2 dicts."""
    for name, values in sweep.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"sweep.{name} must be a non-empty list of numbers, got {values!r}")
    names = list(sweep)
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(sweep[n] for n in names))]


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise OSError(
            f"cannot write to the work directory {run_dir}: {error.strerror or error}. "
            "Choose a writable WORKDIR with free space; nothing was changed."
        ) from error


def _check_config(run_dir: Path, config: Mapping[str, Any]) -> None:
    path = run_dir / "summary.json"
    if not path.exists():
        return
    saved = json.loads(path.read_text()).get("config", {})
    now = json.loads(json.dumps(dict(config), default=str))
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
        raise ConfigChangedError(
            f"{run_dir} holds a run with another config ({details}). Resume with the same "
            "config, or use a new WORKDIR (the saved run is left untouched)."
        )


def _runs_sharding() -> tuple[NamedSharding, int]:
    devices = np.array(jax.devices())
    mesh = Mesh(devices, ("runs",))
    return NamedSharding(mesh, PartitionSpec("runs")), len(devices)


def _to_host(metrics: Metrics) -> dict[str, np.ndarray]:
    """Metrics as numpy arrays on this host; gathered from every host on a multi-host run."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        metrics = multihost_utils.process_allgather(metrics, tiled=True)
    return {k: np.asarray(v) for k, v in metrics.items()}


def _split_metrics(
    metrics: Mapping[str, np.ndarray], rows_per_chunk: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    scalars, arrays = {}, {}
    for name, value in metrics.items():
        if value.ndim < 2 or value.shape[1] != rows_per_chunk:
            raise ValueError(
                f"metric {name!r} has shape {value.shape}; every metric needs the leading axes "
                f"(runs, rows_per_chunk={rows_per_chunk})"
            )
        (scalars if value.ndim == 2 else arrays)[name] = value
    return scalars, arrays


def run_sweep(
    trainer: ChunkedTrainer,
    *,
    seeds: Sequence[int],
    hparams: Sequence[Mapping[str, float]],
    run_dir: str | Path,
    config: Mapping[str, Any],
    keep: int = 3,
    label: str = "",
    max_chunks: int | None = None,
    stall_seconds: float = 60.0,
) -> pd.DataFrame:
    """Runs every (hyperparameters, seed) pair of one method; returns its results table.

    Args:
      trainer: what to run.
      seeds: one run per seed and hyperparameter setting; the seed is the run's PRNG key.
      hparams: hyperparameter settings (dicts of floats with the same keys), e.g. from
        ``hparam_grid``; use ``[{}]`` when nothing is swept.
      run_dir: the run's directory: checkpoints, ``results.csv``, ``arrays/``, ``summary.json``.
      config: the run's configuration (JSON-able); a resume with another config is refused.
      keep: checkpoints kept.
      label: shown in the progress bar and the log.
      max_chunks: stop after this many chunks in this call (the run resumes later).
      stall_seconds: on CPU, exit with ``watchdog.EXIT_STALLED`` when a chunk uses no CPU for
        this long (an intermittent XLA CPU hang; see ``train.watchdog``); 0 disables.

    Returns:
      The whole ``results.csv`` as a DataFrame (including rows of earlier, resumed calls).
    """
    if not seeds:
        raise ValueError("seeds must not be empty")
    if not hparams:
        raise ValueError("hparams must hold at least one setting (use [{}] for none)")
    names = sorted(hparams[0])
    if any(sorted(h) != names for h in hparams):
        raise ValueError(f"every hyperparameter setting needs the same keys {names}")
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    _check_config(run_dir, config)

    runs = [(h, s) for h in hparams for s in seeds]
    sharding, num_devices = _runs_sharding()
    padded = -(-len(runs) // num_devices) * num_devices
    runs_padded = runs + [runs[-1]] * (padded - len(runs))
    keys = jax.device_put(
        jax.vmap(jax.random.key)(jnp.asarray([s for _, s in runs_padded], jnp.uint32)), sharding
    )
    hp = {n: jax.device_put(jnp.asarray([h[n] for h, _ in runs_padded], jnp.float32), sharding)
          for n in names}

    init = jax.jit(jax.vmap(trainer.init), out_shardings=sharding)
    if trainer.data:
        data = jax.device_put(trainer.data, NamedSharding(sharding.mesh, PartitionSpec()))
        chunk_fn = jax.jit(jax.vmap(trainer.run_chunk, in_axes=(0, 0, None)),
                           out_shardings=sharding, donate_argnums=0)
        run_chunk = lambda state, hp: chunk_fn(state, hp, data)
    else:
        run_chunk = jax.jit(jax.vmap(trainer.run_chunk), out_shardings=sharding,
                            donate_argnums=0)

    checkpointer = Checkpointer(run_dir / "checkpoints", keep=keep)
    table = results.ResultsTable(run_dir)
    state = init(keys, hp)
    restored = checkpointer.restore_latest(template=state)
    start, rows_written, diverged = 0, 0, [False] * len(runs)
    if restored is not None:
        start, state = restored.step, restored.state
        rows_written = int(restored.record["rows"])
        diverged = list(restored.record.get("diverged", diverged))
        logging.info("%s: resuming after chunk %d of %d", label, start, trainer.num_chunks)
    table.truncate(rows_written)

    summary = {"config": dict(config), "versions": results.library_versions(),
               "runs": [{"seed": s, **h} for h, s in runs], "devices": num_devices,
               "num_chunks": trainer.num_chunks, "row_name": trainer.row_name,
               "chunks_done": start}
    if jax.process_index() == 0:
        results.write_summary(run_dir, summary)

    stop = {"requested": False}
    previous_handler = signal.getsignal(signal.SIGTERM)

    def request_stop(signum: int, frame: Any) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, request_stop)
    rows_total = trainer.num_chunks * trainer.rows_per_chunk
    bar = ProgressBar(rows_total * trainer.work_per_row, trainer.work_unit, label,
                      start=start * trainer.rows_per_chunk * trainer.work_per_row)
    end = trainer.num_chunks if max_chunks is None else min(trainer.num_chunks,
                                                            start + max_chunks)
    watchdog = StallWatchdog(stall_seconds, label or str(run_dir))
    try:
        for chunk in range(start, end):
            t0 = time.perf_counter()
            with watchdog.watch(f"chunk {chunk + 1}"):
                state, metrics = run_chunk(state, hp)
                metrics_np = {k: v[: len(runs)] for k, v in _to_host(metrics).items()}
            scalars, arrays = _split_metrics(metrics_np, trainer.rows_per_chunk)
            for i, (h, s) in enumerate(runs):
                bad = [k for k, v in metrics_np.items()
                       if (trainer.divergence_keys is None or k in trainer.divergence_keys)
                       and np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v[i]))]
                if bad and not diverged[i]:
                    diverged[i] = True
                    logging.warning("%s: run seed=%d %s diverged (non-finite %s) in chunk %d; "
                                    "its rows are marked diverged, the other runs go on",
                                    label, s, h, ", ".join(bad[:4]), chunk)
            rows = pd.DataFrame({
                "run": np.repeat(np.arange(len(runs)), trainer.rows_per_chunk),
                "seed": np.repeat([s for _, s in runs], trainer.rows_per_chunk),
                **{n: np.repeat([h[n] for h, _ in runs], trainer.rows_per_chunk) for n in names},
                trainer.row_name: np.tile(
                    chunk * trainer.rows_per_chunk + np.arange(trainer.rows_per_chunk), len(runs)
                ),
                **{k: v.reshape(-1) for k, v in scalars.items()},
                "diverged": np.repeat(diverged, trainer.rows_per_chunk),
            })
            try:
                if jax.process_index() == 0:
                    results.save_chunk_arrays(run_dir, chunk, arrays)
                    rows_written = table.append(rows)
                checkpointer.save(chunk + 1, state, {"rows": rows_written, "diverged": diverged})
            except OSError as error:
                raise OSError(
                    f"{label}: could not write chunk {chunk + 1} to {run_dir} "
                    f"({error.strerror or error}); the checkpoint of chunk {chunk} and the rows "
                    "before it are intact: free space or fix permissions, then run the same "
                    "command to resume"
                ) from error
            summary.update(chunks_done=chunk + 1, seconds_last_chunk=time.perf_counter() - t0)
            if jax.process_index() == 0:
                results.write_summary(run_dir, summary)
            bar.update((chunk + 1) * trainer.rows_per_chunk * trainer.work_per_row)
            if stop["requested"]:
                logging.warning("%s: SIGTERM received; stopped cleanly after chunk %d (saved)",
                                label, chunk + 1)
                break
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
        checkpointer.close()
    if stop["requested"]:
        raise SystemExit(143)
    if not table.path.exists():
        return pd.DataFrame()
    return pd.read_csv(table.path)
