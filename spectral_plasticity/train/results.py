"""Result files of a run: a table of per-task rows and per-chunk arrays, written atomically.

A run directory holds

- ``results.csv``: one row per (run, task or phase) with scalar metrics, read by
  ``pandas.read_csv`` directly; rows are appended after every chunk;
- ``arrays/chunk_{k}.npz``: the non-scalar metrics of chunk ``k`` (spectral densities, Ritz
  nodes, per-unit statistics), each with leading axes ``(runs, rows)``;
- ``summary.json``: the config, the versions of the libraries and the progress.

The table is kept consistent with the checkpoints: a checkpoint records how many rows were
written when it was taken, and ``ResultsTable.truncate`` drops the rows of a chunk that ran after
the last checkpoint (they are recomputed, bit for bit, when the run resumes), so no row is lost
or duplicated across a restart.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "brax",
                      "gymnax", "numpy")


def write_atomically(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename: all or nothing."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def library_versions() -> dict[str, str]:
    """Versions of Python and of the libraries that determine the numbers of a run."""
    versions = {"python": platform.python_version()}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


class ResultsTable:
    """The append-only ``results.csv`` of a run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "results.csv"

    def num_rows(self) -> int:
        if not self.path.exists():
            return 0
        return len(pd.read_csv(self.path))

    def append(self, rows: pd.DataFrame) -> int:
        """Appends ``rows`` (same columns every time); returns the number of rows now stored."""
        header = not self.path.exists()
        with open(self.path, "a") as f:
            rows.to_csv(f, header=header, index=False)
            f.flush()
            os.fsync(f.fileno())
        return self.num_rows()

    def truncate(self, num_rows: int) -> None:
        """Keeps the first ``num_rows`` rows (those covered by the restored checkpoint)."""
        if not self.path.exists():
            if num_rows:
                raise ValueError(
                    f"{self.path} is missing but the checkpoint records {num_rows} rows written; "
                    "restore the file or start a fresh run in a new work directory"
                )
            return
        table = pd.read_csv(self.path)
        if len(table) < num_rows:
            raise ValueError(
                f"{self.path} has {len(table)} rows but the checkpoint records {num_rows}; "
                "the results file was truncated outside the run"
            )
        if len(table) > num_rows:
            write_atomically(self.path, table.iloc[:num_rows].to_csv(index=False).encode())


def save_chunk_arrays(run_dir: Path, chunk: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes the non-scalar metrics of ``chunk`` to ``arrays/chunk_{chunk:06d}.npz``."""
    if not arrays:
        return
    directory = run_dir / "arrays"
    directory.mkdir(exist_ok=True)
    path = directory / f"chunk_{chunk:06d}.npz"
    tmp = directory / f".chunk_{chunk:06d}.tmp.npz"
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    os.replace(tmp, path)


def load_arrays(run_dir: Path) -> dict[str, np.ndarray]:
    """All chunks' arrays of a run, concatenated along the rows axis (axis 1)."""
    files = sorted((run_dir / "arrays").glob("chunk_*.npz"))
    if not files:
        return {}
    loaded = [dict(np.load(f)) for f in files]
    return {k: np.concatenate([part[k] for part in loaded], axis=1) for k in loaded[0]}


def write_summary(run_dir: Path, summary: Mapping[str, Any]) -> None:
    """Writes ``summary.json`` (config, versions, progress) atomically."""
    text = json.dumps(dict(summary), indent=2, sort_keys=True, default=str)
    write_atomically(run_dir / "summary.json", text.encode())
