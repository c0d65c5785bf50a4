"""Trainers and the sweep runner: vmapped seeds, sharded runs, orbax checkpoints, results."""

from spectral_plasticity.train.checkpoint import Checkpointer
from spectral_plasticity.train.lock import WorkDirBusyError, work_dir_lock
from spectral_plasticity.train.sweep import (
    ChunkedTrainer,
    ConfigChangedError,
    UnreadableCheckpointsError,
    check_config,
    hparam_grid,
    run_sweep,
)

__all__ = ["Checkpointer", "ChunkedTrainer", "ConfigChangedError", "UnreadableCheckpointsError",
           "WorkDirBusyError", "check_config", "hparam_grid", "run_sweep", "work_dir_lock"]
