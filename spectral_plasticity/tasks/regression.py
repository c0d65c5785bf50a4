"""Slowly-changing regression (Dohare et al. 2024), generated on the fly.

Inputs are ``num_inputs`` = m = 20 bits: the first ``num_slow_bits`` = f = 15 are constant within
a task and change between tasks, the remaining m - f = 5 are fresh random bits for every
example. The target is a fixed random network of linear threshold units (LTUs), Dohare et al.'s
``FixLTUNet`` (``lop/nets/fix_ltu_net.py``): ``y = w2 . LTU(W1 x + b1) + b2`` with every weight
and bias drawn from {-1, +1}, ``num_target_features`` = 100 hidden units, and unit ``i`` firing
when ``(W1 x + b1)_i > tau_i`` (strictly, ``lop/utils/ltu.py``) with

    tau_i = beta (m + 1) - S_i,    S_i = (m - sum_j W1_ji + b1_i) / 2,    beta = 0.7,

exactly their expression (``(m - sum_j W1_ji) / 2`` counts the -1 input weights; their code adds
``b1_i / 2`` to it, so a unit with bias -1 needs its input sum 2 higher to fire than a "count
the -1 entries, bias included" reading would give; with bias +1 both agree. We follow the code,
which generated all their data). A task lasts ``flip_after`` = T = 10,000 examples; between
tasks one uniformly chosen slow bit is flipped (``flip_one``: the paper's description, Nature
Extended Data Fig. 2, and their ``cfg/flip_one_prob.json``), or all slow bits are redrawn
(their ``cfg/prob.json``, the data of their other configurations). The learner (paper: an MLP
with 5 hidden units) sees every example once, online, with squared error.

The eval examples of a task cycle through all ``2 ** (m - f)`` settings of its fast bits in a
random order, so with ``eval_size`` a multiple of 32 (default 1,024) the eval loss and its
Hessian are the task's exact expected ones; a smaller ``eval_size`` is a uniform subset.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from spectral_plasticity.tasks.stream import TaskStream

MAX_FAST_BITS = 20


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


def ltu_thresholds(w1: jax.Array, b1: jax.Array, beta: float) -> jax.Array:
    """Dohare et al.'s thresholds ``beta (m + 1) - (m - sum_j W1_ji + b1_i) / 2``, ``(features,)``.

    ``w1`` is ``(m, features)`` (inputs first), ``b1`` is ``(features,)``, both in {-1, +1}.
    """
    num_inputs = w1.shape[0]
    s = (num_inputs - jnp.sum(w1, axis=0) + b1) / 2
    return beta * (num_inputs + 1) - s


def target_network(key: jax.Array, num_inputs: int, num_features: int,
                   beta: float) -> TargetNetwork:
    """The fixed random LTU target network of a run."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1, b1 = _signs(k1, (num_inputs, num_features)), _signs(k2, (num_features,))
    return TargetNetwork(w1, b1, _signs(k3, (num_features,)), _signs(k4, ()),
                         ltu_thresholds(w1, b1, beta))


def target_output(target: TargetNetwork, x: jax.Array) -> jax.Array:
    """``w2 . LTU(x W1 + b1) + b2`` for a batch ``x``, shape ``(batch, 1)``."""
    hidden = (x @ target.w1 + target.b1 > target.tau).astype(jnp.float32)
    return (hidden @ target.w2 + target.b2)[:, None]


class SlowlyChangingRegression(TaskStream):
    """Dohare et al.'s slowly-changing regression stream (see the module docstring)."""

    loss = "squared_error"

    def __init__(self, *, num_tasks: int = 100, flip_after: int = 10_000, num_inputs: int = 20,
                 num_slow_bits: int = 15, num_target_features: int = 100, beta: float = 0.7,
                 flip_one: bool = True, eval_size: int = 1024) -> None:
        if not 0 < num_slow_bits <= num_inputs:
            raise ValueError(f"num_slow_bits must lie in [1, num_inputs={num_inputs}], got "
                             f"{num_slow_bits}")
        if num_inputs - num_slow_bits > MAX_FAST_BITS:
            raise ValueError(f"at most {MAX_FAST_BITS} fast bits (num_inputs - num_slow_bits): "
                             f"the eval examples enumerate their settings; got "
                             f"{num_inputs - num_slow_bits}")
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

    def _examples(self, task: RegressionTask, fast: jax.Array):
        n = fast.shape[0]
        x = jnp.concatenate([jnp.broadcast_to(task.slow_bits, (n, self.num_slow_bits)),
                             fast.astype(jnp.float32)], axis=1)
        return x, target_output(task.target, x)

    def train_batch(self, task_state: RegressionTask, step: jax.Array, batch_size: int):
        fast_bits = self.input_shape[0] - self.num_slow_bits
        fast = jax.random.randint(jax.random.fold_in(task_state.key, step),
                                  (batch_size, fast_bits), 0, 2)
        return self._examples(task_state, fast)

    def eval_data(self, task_state: RegressionTask):
        fast_bits = self.input_shape[0] - self.num_slow_bits
        # Train steps fold in indices < train_size; the eval order uses train_size itself.
        order = jax.random.permutation(jax.random.fold_in(task_state.key, self.train_size),
                                       2**fast_bits)
        codes = order[jnp.arange(self.eval_size) % 2**fast_bits]
        fast = (codes[:, None] >> jnp.arange(fast_bits - 1, -1, -1)) & 1
        return self._examples(task_state, fast)
