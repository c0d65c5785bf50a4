"""The interface of a continual task stream, as the trainer consumes it inside ``jax.jit``.

A stream is a sequence of ``num_tasks`` tasks. The trainer asks for one task at a time, inside
its compiled loop, with a traced task index:

- ``begin_task(key, task) -> task_state``: a small pytree (a permutation, a class subset, the
  slow bits...) drawn from ``key`` and ``task`` only, so a run is reproducible from its key and
  a task can be re-created after a restart;
- ``train_batch(task_state, step, batch_size) -> (x, y)``: the ``step``-th batch of the task's
  single pass over its ``train_size`` examples (materialised per batch, never per stream);
- ``eval_data(task_state) -> (x, y)``: the task's ``eval_size`` held-out examples (evaluation and
  the new-task Hessian);
- ``output_mask(task_state) -> (num_outputs,) bool``: the logits that are valid in this task;
- ``hessian_data(task_state, split, size) -> (x, y)``: the examples of the new-task Hessian.

Shapes are static; everything is pure and works under ``jax.vmap`` over run keys.

Streams whose tasks present a pool of examples for several epochs (continual ImageNet) or
whose pool grows from task to task (class-incremental CIFAR) keep ``train_size`` static by
indexing the pool with ``epoch_order``: position ``p`` of the task's presentation sequence falls
in epoch ``p // pool`` and each epoch visits the pool in a fresh uniformly random order.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

TaskState = Any


class TaskStream(abc.ABC):
    """Base class of continual task streams (see the module docstring)."""

    name: str
    num_tasks: int
    input_shape: tuple[int, ...]
    num_outputs: int
    train_size: int
    eval_size: int
    loss: ClassVar[str] = "cross_entropy"  # or "squared_error"
    reset_head: bool = False

    @abc.abstractmethod
    def begin_task(self, key: jax.Array, task: jax.Array) -> TaskState: ...

    @abc.abstractmethod
    def train_batch(self, task_state: TaskState, step: jax.Array, batch_size: int
                    ) -> tuple[jax.Array, jax.Array]: ...

    @abc.abstractmethod
    def eval_data(self, task_state: TaskState) -> tuple[jax.Array, jax.Array]: ...

    def arrays(self) -> dict[str, jax.Array]:
        """The stream's data arrays (images, labels), to be passed into ``jax.jit`` as arguments.

        A jitted function that closes over an array embeds it in the compiled program as a
        constant (seconds of compilation per 100 MB, and a copy per executable). The trainers
        instead pass ``arrays()`` as an argument and call the stream methods on
        ``with_arrays(traced)``. Every array attribute of the stream counts.
        """
        return {k: v for k, v in vars(self).items() if isinstance(v, jax.Array)}

    def with_arrays(self, arrays: dict[str, jax.Array]) -> TaskStream:
        """A shallow copy of the stream reading ``arrays`` instead of its own (see ``arrays``)."""
        unknown = set(arrays) - set(self.arrays())
        if unknown:
            raise ValueError(f"{self.name} has no data arrays {sorted(unknown)}")
        bound = copy.copy(self)
        vars(bound).update(arrays)
        return bound

    def hessian_data(self, task_state: TaskState, split: str, size: int
                     ) -> tuple[jax.Array, jax.Array]:
        """``size`` examples of the task for its Hessian: the first ``size`` of its held-out
        examples (``split="eval"``) or of its training presentation (``"train"``)."""
        if split == "eval":
            x, y = self.eval_data(task_state)
            return x[:size], y[:size]
        return self.train_batch(task_state, 0, size)

    def output_mask(self, task_state: TaskState) -> jax.Array:
        del task_state
        return jnp.ones((self.num_outputs,), bool)

    def check_batch_size(self, batch_size: int) -> int:
        """Steps per task for ``batch_size``; a clear error unless it divides the task."""
        if batch_size < 1 or batch_size > self.train_size:
            raise ValueError(f"batch_size {batch_size} must lie in [1, {self.train_size}] "
                             f"(the examples per task of {self.name})")
        if self.train_size % batch_size:
            raise ValueError(f"batch_size {batch_size} must divide the {self.train_size} "
                             f"examples per task of {self.name}")
        return self.train_size // batch_size


def valid_first_order(key: jax.Array, valid: jax.Array) -> jax.Array:
    """A uniformly random order of the positions where ``valid`` holds, then the others.

    ``valid`` is a ``(n,)`` bool array whose number of True entries may be traced; the result is
    a permutation of ``range(n)`` whose first ``sum(valid)`` entries are the valid positions in
    uniformly random order (a uniform permutation, stably partitioned).
    """
    shuffled = jax.random.permutation(key, valid.shape[0])
    return shuffled[jnp.argsort(~valid[shuffled], stable=True)]


def epoch_order(key: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
    """The pool item shown at each of ``positions`` when the valid items are presented epoch
    after epoch, epoch ``e`` in the order ``valid_first_order(fold_in(key, e), valid)``.

    ``positions`` are consecutive and span at most two epochs (a batch no larger than the pool);
    returns indices into ``valid``'s axis.
    """
    pool = jnp.sum(valid)
    first = positions[0] // pool
    current = valid_first_order(jax.random.fold_in(key, first), valid)
    following = valid_first_order(jax.random.fold_in(key, first + 1), valid)
    offset = positions % pool
    return jnp.where(positions // pool == first, current[offset], following[offset])
