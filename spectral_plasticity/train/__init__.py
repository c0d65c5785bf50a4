"""Trainers and the sweep runner: vmapped seeds, sharded runs, orbax checkpoints, results."""

from spectral_plasticity.train.checkpoint import Checkpointer
from spectral_plasticity.train.sweep import (
    ChunkedTrainer,
    ConfigChangedError,
    hparam_grid,
    run_sweep,
)

__all__ = ["Checkpointer", "ChunkedTrainer", "ConfigChangedError", "hparam_grid", "run_sweep"]
