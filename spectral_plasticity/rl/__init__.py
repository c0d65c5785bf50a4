"""Continual reinforcement learning: PPO on environments whose dynamics change every phase."""

from spectral_plasticity.rl.envs import (
    ENVIRONMENTS,
    ContinualEnv,
    EnvState,
    EnvStep,
    auto_reset,
    make_env,
    phase_dynamics,
)
from spectral_plasticity.rl.losses import clipped_surrogate, gae, value_loss
from spectral_plasticity.rl.ppo import RunnerState, default_config, make_train, train_fn

__all__ = [
    "ENVIRONMENTS",
    "ContinualEnv",
    "EnvState",
    "EnvStep",
    "RunnerState",
    "auto_reset",
    "clipped_surrogate",
    "default_config",
    "gae",
    "make_env",
    "make_train",
    "phase_dynamics",
    "train_fn",
    "value_loss",
]
