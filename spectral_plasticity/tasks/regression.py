"""Slowly-changing regression (Dohare et al. 2024), generated on the fly.

Inputs are ``num_inputs`` = 20 bits: the first ``num_slow_bits`` = 15 are constant within a task
and change between tasks, the remaining 5 are fresh random bits for every example. The target
is a fixed random network of linear threshold units (LTUs): ``y = w2 . LTU(W1 x + b1) + b2``
with all weights and biases drawn from {-1, +1}, ``num_target_features`` = 100 hidden units,
and unit ``i`` firing when ``(W1 x + b1)_i > tau_i`` with ``tau_i = beta (num_inputs + 1) - S_i``,
``S_i`` the number of -1 among its incoming weights and bias, ``beta`` = 0.7. A task lasts
``flip_after`` = 10,000 examples; between tasks one random slow bit is flipped (``flip_one``,
the paper's setting), or all slow bits are redrawn. The learner (paper: an MLP with 5 hidden
units) sees every example once, online, with squared error.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spectral_plasticity.tasks.stream import TaskStream


class TargetNetwork(NamedTuple):
    w1: jax.Array  # (num_inputs, features)
    b1: jax.Array  # (features,)
    w2: jax.Array  # (features,)
    b2: jax.Array  # ()
    tau: jax.Array  # (features,)


class RegressionTask(NamedTuple):
    target: TargetNetwork
    slow_bits: jax.Array  # (num_slow_bits,) float 0/1
    key: jax.Array


def _signs(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.randint(key, shape, 0, 2).astype(jnp.float32) * 2.0 - 1.0


def target_network(key: jax.Array, num_inputs: int, num_features: int,
                   beta: float) -> TargetNetwork:
    """The fixed random LTU target network of a run."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1, b1 = _signs(k1, (num_inputs, num_features)), _signs(k2, (num_features,))
    # S_i counts the -1 entries among the incoming weights and the bias.
    negatives = jnp.sum(w1 < 0, axis=0) + (b1 < 0)
    tau = beta * (num_inputs + 1) - negatives
    return TargetNetwork(w1, b1, _signs(k3, (num_features,)), _signs(k4, ()), tau)


def target_output(target: TargetNetwork, x: jax.Array) -> jax.Array:
    """``w2 . LTU(x W1 + b1) + b2`` for a batch ``x``, shape ``(batch, 1)``."""
    hidden = (x @ target.w1 + target.b1 > target.tau).astype(jnp.float32)
    return (hidden @ target.w2 + target.b2)[:, None]


class SlowlyChangingRegression(TaskStream):
    """Dohare et al.'s slowly-changing regression stream (see the module docstring)."""

    loss = "squared_error"

    def __init__(self, *, num_tasks: int = 100, flip_after: int = 10_000, num_inputs: int = 20,
                 num_slow_bits: int = 15, num_target_features: int = 100, beta: float = 0.7,
                 flip_one: bool = True, eval_size: int = 1000) -> None:
        if not 0 < num_slow_bits <= num_inputs:
            raise ValueError(f"num_slow_bits must lie in [1, num_inputs={num_inputs}], got "
                             f"{num_slow_bits}")
        if min(num_tasks, flip_after, num_target_features, eval_size) < 1:
            raise ValueError("num_tasks, flip_after, num_target_features and eval_size must be "
                             "positive")
        self.name = "slowly_changing_regression"
        self.num_tasks, self.train_size, self.eval_size = num_tasks, flip_after, eval_size
        self.input_shape, self.num_outputs = (num_inputs,), 1
        self.num_slow_bits, self.num_target_features = num_slow_bits, num_target_features
        self.beta, self.flip_one = beta, flip_one

    def slow_bits(self, key: jax.Array, task: jax.Array) -> jax.Array:
        """The slow bits of ``task``: the initial bits with one bit flipped per task so far."""
        initial = jax.random.randint(jax.random.fold_in(key, 1), (self.num_slow_bits,), 0, 2)
        if not self.flip_one:
            return jax.random.randint(jax.random.fold_in(jax.random.fold_in(key, 2), task),
                                      (self.num_slow_bits,), 0, 2).astype(jnp.float32)
        flips = jax.random.randint(jax.random.fold_in(key, 3), (self.num_tasks,), 0,
                                   self.num_slow_bits)
        happened = jnp.arange(self.num_tasks) < task  # flips before tasks 1..task
        counts = jnp.sum(jax.nn.one_hot(flips, self.num_slow_bits) * happened[:, None], axis=0)
        return jnp.mod(initial + counts, 2).astype(jnp.float32)

    def begin_task(self, key: jax.Array, task: jax.Array) -> RegressionTask:
        target = target_network(jax.random.fold_in(key, 0), self.input_shape[0],
                                self.num_target_features, self.beta)
        return RegressionTask(target, self.slow_bits(key, task),
                              jax.random.fold_in(jax.random.fold_in(key, 4), task))

    def _examples(self, task: RegressionTask, key: jax.Array, n: int):
        fast = jax.random.randint(key, (n, self.input_shape[0] - self.num_slow_bits), 0, 2)
        x = jnp.concatenate([jnp.broadcast_to(task.slow_bits, (n, self.num_slow_bits)),
                             fast.astype(jnp.float32)], axis=1)
        return x, target_output(task.target, x)

    def train_batch(self, task_state: RegressionTask, step: jax.Array, batch_size: int):
        return self._examples(task_state, jax.random.fold_in(task_state.key, step), batch_size)

    def eval_data(self, task_state: RegressionTask):
        # Train steps fold in indices < train_size; the eval draw uses train_size itself.
        return self._examples(task_state, jax.random.fold_in(task_state.key, self.train_size),
                              self.eval_size)
