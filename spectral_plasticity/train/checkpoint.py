"""Checkpoints of a whole run state with orbax, restored exactly or not at all.

A checkpoint holds the run state (a pytree of arrays: parameters, optimizer and method states,
PRNG keys, stream positions) and a small JSON record (chunks done, result rows written). The
last ``keep`` checkpoints are kept; a new one is written before an old one is removed, so an
interrupted save never costs the previous checkpoint. Restoring walks back from the newest
checkpoint and skips any that is corrupt or truncated, reporting each one it skips and moving it
aside (to ``unreadable_step_{step}_{time}``) rather than deleting it.

Typed PRNG keys (``jax.random.key``) are stored as their raw ``uint32`` key data and wrapped
again on restore, so any state a trainer keeps can be checkpointed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PyTree = Any


class Restored(NamedTuple):
    """A restored checkpoint: its step (chunks done), state and JSON record."""

    step: int
    state: PyTree
    record: dict[str, Any]


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(state: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, state)


def _from_storable(stored: PyTree, template: PyTree) -> PyTree:
    def restore_leaf(value: Any, like: Any) -> Any:
        if _is_typed_key(like):
            return jax.random.wrap_key_data(value, impl=jax.random.key_impl(like))
        return value

    return jax.tree.map(restore_leaf, stored, template)


def _abstract(state: PyTree) -> PyTree:
    """Shape/dtype/sharding template of ``state`` in its storable form."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, _to_storable(state))


class Checkpointer:
    """Saves and restores run states under ``directory`` (one orbax step per chunk done).

    Args:
      directory: where the checkpoints live; created if missing.
      keep: how many of the newest checkpoints to keep (at least 1).
    """

    def __init__(self, directory: str | os.PathLike[str], keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=False, create=True
            ),
        )

    def steps(self) -> list[int]:
        """Steps of the checkpoints on disk, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: PyTree, record: dict[str, Any]) -> None:
        """Writes ``state`` and ``record`` as checkpoint ``step`` and waits until it is on disk."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)),
                record=ocp.args.JsonSave(record),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore_latest(self, template: PyTree) -> Restored | None:
        """The newest readable checkpoint, shaped and sharded like ``template``; None if none.

        A checkpoint that cannot be read (corrupt, truncated, or of another state structure)
        is reported with a warning and the one before it is tried.
        """
        abstract = _abstract(template)
        for step in reversed(self.steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract),
                        record=ocp.args.JsonRestore(),
                    ),
                )
            except Exception as error:
                kept = self.directory / f"unreadable_step_{step}_{int(time.time())}"
                (self.directory / str(step)).rename(kept)
                logging.warning(
                    "checkpoint %d in %s is unreadable (%s: %s); moved it to %s and trying the "
                    "previous one", step, self.directory, type(error).__name__,
                    str(error).splitlines()[0][:300], kept.name,
                )
                self._manager.reload()
                continue
            state = _from_storable(restored["state"], template)
            return Restored(step=step, state=state, record=dict(restored["record"]))
        return None

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
