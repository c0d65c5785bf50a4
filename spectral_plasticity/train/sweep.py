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

import errno
import itertools
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spectral_plasticity.train import results
from spectral_plasticity.train.checkpoint import Checkpointer
from spectral_plasticity.train.lock import work_dir_lock
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


class UnreadableCheckpointsError(RuntimeError):
    """Chunks were done in the work directory but no checkpoint of them can be read."""


def hparam_grid(sweep: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """Every combination of the swept values: ``{'lr': [1, 2], 'l2': [3]}`` -> 2 dicts."""
    for name, values in sweep.items():
        if isinstance(values, str) or not isinstance(values, Sequence) or len(values) == 0:
            raise ValueError(f"sweep.{name} must be a non-empty list of numbers, got {values!r}")
    names = list(sweep)
    return [dict(zip(names, combo, strict=True))
            for combo in itertools.product(*(sweep[n] for n in names))]


_WRITE_PROBLEMS = {
    errno.ENOTDIR: "a part of its path is a file, not a directory",
    errno.EEXIST: "it is a file, not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
}


def write_problem(error: OSError) -> str:
    """A short reason for a failed write (``"the disk is full"``)."""
    return _WRITE_PROBLEMS.get(error.errno, error.strerror or str(error))


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except FileExistsError as error:  # mkdir on a path that is a file
        raise OSError(errno.EEXIST, f"cannot use the work directory {run_dir}: it is a file, "
                      "not a directory; choose another WORKDIR (nothing was changed)") from error
    except OSError as error:
        raise OSError(error.errno, f"cannot write to the work directory {run_dir}: "
                      f"{write_problem(error)}; choose a writable WORKDIR with free space "
                      "(nothing was changed)") from error


def _saved_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_config(run_dir: str | Path, config: Mapping[str, Any]) -> None:
    """Refuses to resume ``run_dir`` with another config than the one it was run with.

    Raises:
      ConfigChangedError: naming the changed keys, their saved and new values.
    """
    run_dir = Path(run_dir)
    saved = _saved_summary(run_dir).get("config")
    if saved is None:
        return
    saved, now = _flat(saved), _flat(json.loads(json.dumps(dict(config), default=str)))
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


class _Runs(NamedTuple):
    """Every (hyperparameters, seed) pair, stacked on the leading "runs" axis."""

    pairs: list[tuple[Mapping[str, float], int]]
    names: list[str]
    keys: jax.Array
    hparams: Hparams
    sharding: NamedSharding


def _stack_runs(seeds: Sequence[int], hparams: Sequence[Mapping[str, float]]) -> _Runs:
    if not seeds:
        raise ValueError("seeds must not be empty")
    if not hparams:
        raise ValueError("hparams must hold at least one setting (use [{}] for none)")
    names = sorted(hparams[0])
    if any(sorted(h) != names for h in hparams):
        raise ValueError(f"every hyperparameter setting needs the same keys {names}")
    pairs = [(h, s) for h in hparams for s in seeds]
    sharding, num_devices = _runs_sharding()
    padded = pairs + [pairs[-1]] * (-len(pairs) % num_devices)
    keys = jax.device_put(
        jax.vmap(jax.random.key)(jnp.asarray([s for _, s in padded], jnp.uint32)), sharding)
    hp = {n: jax.device_put(jnp.asarray([h[n] for h, _ in padded], jnp.float32), sharding)
          for n in names}
    return _Runs(pairs, names, keys, hp, sharding)


def _compile(trainer: ChunkedTrainer, sharding: NamedSharding
             ) -> tuple[Callable[..., PyTree], Callable[[PyTree, Hparams], tuple[PyTree, Metrics]]]:
    """The vmapped, sharded ``init`` and ``run_chunk`` (state donated)."""
    init = jax.jit(jax.vmap(trainer.init), out_shardings=sharding)
    if not trainer.data:
        return init, jax.jit(jax.vmap(trainer.run_chunk), out_shardings=sharding,
                             donate_argnums=0)
    data = jax.device_put(trainer.data, NamedSharding(sharding.mesh, PartitionSpec()))
    chunk_fn = jax.jit(jax.vmap(trainer.run_chunk, in_axes=(0, 0, None)),
                       out_shardings=sharding, donate_argnums=0)
    return init, lambda state, hp: chunk_fn(state, hp, data)


class _Progress(NamedTuple):
    chunks_done: int
    state: PyTree
    rows_written: int
    diverged: list[bool]


def _resume(checkpointer: Checkpointer, table: results.ResultsTable, state: PyTree,
            num_runs: int, saved_chunks: int | None, restart: bool) -> _Progress:
    """The newest readable checkpoint's progress, the table cut to its rows; or a fresh start.

    ``saved_chunks``: the chunks done by ``summary.json`` (None: no summary). Rows of done
    chunks without a readable checkpoint are refused unless ``restart``, which moves the old
    ``results.csv`` aside (never deletes it) and starts over. Rows of a first chunk that ran
    before its checkpoint was written (``saved_chunks == 0``) are recomputed.
    """
    restored = checkpointer.restore_latest(template=state)
    if restored is None and saved_chunks != 0 and table.num_rows():
        if not restart:
            raise UnreadableCheckpointsError(
                f"{table.path.parent} holds {table.num_rows()} result rows but no readable "
                f"checkpoint of them (unreadable ones are moved aside in "
                f"{checkpointer.directory}); nothing was deleted. Rerun with --restart "
                "(run_sweep(restart=True)) to start this run over, keeping the old rows as "
                "results.csv.replaced_<time>."
            )
        kept = table.path.with_name(f"results.csv.replaced_{int(time.time())}")
        table.path.rename(kept)
        logging.warning("%s: starting over; the old rows are kept in %s", table.path, kept.name)
    if restored is None:
        table.truncate(0)
        return _Progress(0, state, 0, [False] * num_runs)
    rows = int(restored.record["rows"])
    table.truncate(rows)
    diverged = list(restored.record.get("diverged", [False] * num_runs))
    return _Progress(restored.step, restored.state, rows, diverged)


def _mark_diverged(trainer: ChunkedTrainer, runs: _Runs, metrics: Mapping[str, np.ndarray],
                   diverged: list[bool], label: str, chunk: int) -> None:
    for i, (h, s) in enumerate(runs.pairs):
        bad = [k for k, v in metrics.items()
               if (trainer.divergence_keys is None or k in trainer.divergence_keys)
               and np.issubdtype(v.dtype, np.floating) and not np.all(np.isfinite(v[i]))]
        if bad and not diverged[i]:
            diverged[i] = True
            logging.warning("%s: run seed=%d %s diverged (non-finite %s) in chunk %d; its rows "
                            "are marked diverged, the other runs go on", label, s, h,
                            ", ".join(bad[:4]), chunk)


def _rows(trainer: ChunkedTrainer, runs: _Runs, chunk: int, scalars: Mapping[str, np.ndarray],
          diverged: list[bool]) -> pd.DataFrame:
    per_run = trainer.rows_per_chunk
    return pd.DataFrame({
        "run": np.repeat(np.arange(len(runs.pairs)), per_run),
        "seed": np.repeat([s for _, s in runs.pairs], per_run),
        **{n: np.repeat([h[n] for h, _ in runs.pairs], per_run) for n in runs.names},
        trainer.row_name: np.tile(chunk * per_run + np.arange(per_run), len(runs.pairs)),
        **{k: v.reshape(-1) for k, v in scalars.items()},
        "diverged": np.repeat(diverged, per_run),
    })


def _announce(message: str) -> None:
    """One line for a person watching: the time and ``message``, on stderr."""
    tqdm.tqdm.write(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr)


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
    restart: bool = False,
    record: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Runs every (hyperparameters, seed) pair of one method; returns its results table.

    Args:
      trainer: what to run.
      seeds: one run per seed and hyperparameter setting; the seed is the run's PRNG key.
      hparams: hyperparameter settings (dicts of floats with the same keys), e.g. from
        ``hparam_grid``; use ``[{}]`` when nothing is swept.
      run_dir: the run's directory: checkpoints, ``results.csv``, ``arrays/``, ``summary.json``.
        A second sweep on a directory in use is refused (``lock.WorkDirBusyError``).
      config: the run's configuration (JSON-able); a resume with another config is refused.
      keep: checkpoints kept.
      label: names the run in its start and end lines and the progress bar.
      max_chunks: stop after this many chunks in this call (the run resumes later).
      stall_seconds: on CPU, exit with ``watchdog.EXIT_STALLED`` when a chunk uses no CPU for
        this long (an intermittent XLA CPU hang; see ``train.watchdog``); 0 disables.
      restart: start over when chunks were done but no checkpoint can be read (otherwise
        ``UnreadableCheckpointsError``); the old rows are kept aside.
      record: more JSON-able entries for ``summary.json`` (e.g. the data actually read).

    Returns:
      The whole ``results.csv`` as a DataFrame (including rows of earlier, resumed calls).
    """
    runs = _stack_runs(seeds, hparams)
    run_dir = Path(run_dir)
    _check_writable(run_dir)
    with work_dir_lock(run_dir):
        check_config(run_dir, config)
        saved_chunks = _saved_summary(run_dir).get("chunks_done")
        init, run_chunk = _compile(trainer, runs.sharding)
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=keep)
        try:
            table = results.ResultsTable(run_dir)
            progress = _resume(checkpointer, table, init(runs.keys, runs.hparams),
                               len(runs.pairs), saved_chunks, restart)
            summary = {"config": dict(config), "versions": results.library_versions(),
                       "runs": [{"seed": s, **h} for h, s in runs.pairs], "swept": runs.names,
                       "devices": runs.sharding.mesh.size, "num_chunks": trainer.num_chunks,
                       "row_name": trainer.row_name, "chunks_done": progress.chunks_done,
                       **(record or {})}
            end = trainer.num_chunks if max_chunks is None else min(
                trainer.num_chunks, progress.chunks_done + max_chunks)
            _announce(f"{label or run_dir}: {len(seeds)} seeds x {len(hparams)} settings, "
                      f"chunks {progress.chunks_done}/{trainer.num_chunks} done -> {run_dir}")
            t0 = time.perf_counter()
            done = _run_chunks(trainer, runs, run_chunk, progress, end, summary, table,
                               checkpointer, run_dir, label, stall_seconds)
        finally:
            checkpointer.close()
    what = "finished" if done == trainer.num_chunks else "stopped (resumable)"
    _announce(f"{label or run_dir}: {what} at chunk {done}/{trainer.num_chunks} in "
              f"{time.perf_counter() - t0:.0f} s -> {table.path}")
    return pd.read_csv(table.path) if table.path.exists() else pd.DataFrame()


def _run_chunks(trainer: ChunkedTrainer, runs: _Runs, run_chunk: Callable[..., Any],
                progress: _Progress, end: int, summary: dict[str, Any],
                table: results.ResultsTable, checkpointer: Checkpointer, run_dir: Path,
                label: str, stall_seconds: float) -> int:
    """Chunks ``progress.chunks_done .. end``, each saved; returns the chunks done.

    A SIGTERM stops after the running chunk is saved (``SystemExit(143)``).
    """
    state, rows_written, diverged = progress.state, progress.rows_written, progress.diverged
    main = jax.process_index() == 0
    if main:
        results.write_summary(run_dir, summary)
    stop = {"requested": False}
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(requested=True))
    work = trainer.rows_per_chunk * trainer.work_per_row
    bar = tqdm.tqdm(total=trainer.num_chunks * work, initial=progress.chunks_done * work,
                    unit=f" {trainer.work_unit}", desc=label, unit_scale=True, file=sys.stderr,
                    disable=None if main else True, dynamic_ncols=True, leave=False)
    watchdog = StallWatchdog(stall_seconds, label or str(run_dir))
    chunk = progress.chunks_done
    try:
        for chunk in range(progress.chunks_done, end):
            t0 = time.perf_counter()
            with watchdog.watch(f"chunk {chunk + 1}"):
                state, metrics = run_chunk(state, runs.hparams)
                metrics_np = {k: v[: len(runs.pairs)] for k, v in _to_host(metrics).items()}
            scalars, arrays = _split_metrics(metrics_np, trainer.rows_per_chunk)
            _mark_diverged(trainer, runs, metrics_np, diverged, label, chunk)
            try:
                if main:
                    results.save_chunk_arrays(run_dir, chunk, arrays)
                    rows_written = table.append(_rows(trainer, runs, chunk, scalars, diverged))
                checkpointer.save(chunk + 1, state, {"rows": rows_written, "diverged": diverged})
                summary.update(chunks_done=chunk + 1, seconds_last_chunk=time.perf_counter() - t0)
                if main:
                    results.write_summary(run_dir, summary)
            except OSError as error:
                raise OSError(
                    error.errno, f"{label}: could not write chunk {chunk + 1} to {run_dir} "
                    f"({write_problem(error)}); the checkpoint of chunk {chunk} and the rows "
                    "before it are intact: free space or fix permissions, then run the same "
                    "command to resume") from error
            bar.update(work)
            if stop["requested"]:
                logging.warning("%s: SIGTERM received; stopped cleanly after chunk %d (saved)",
                                label, chunk + 1)
                raise SystemExit(143)
        return end
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        bar.close()
