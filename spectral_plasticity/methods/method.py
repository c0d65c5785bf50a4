"""A plasticity method as one object: its settings, optax transforms, state and hooks.

A ``Method`` is a name and a tuple of ``Part`` s, each one ingredient (an L2 term, the
alternating effective-rank ascent, CBP, a reset, ...). A part declares the settings it reads
and contributes any of:

- ``before`` / ``after``: optax transforms chained before / after the base optimizer, built
  from the setting values — python numbers from the config, or traced swept values;
- ``init_state``: its state, carried by the trainer between steps (CBP's utilities);
- ``after_update``: a hook run after every optimizer step of a network, given ``StepInputs``;
- ``at_task_start``: a hook run when a new task (or RL phase) begins.

Both trainers (``train.supervised``, ``rl.ppo``) drive every method through the same four
calls: ``Method.optimizer``, ``Method.init_state``, ``Method.after_update`` (per network, per
optimizer step) and ``Method.at_task_start``. Nothing about a particular method lives in a
trainer.

A setting is *sweepable* when its value may be a traced array (``run_sweep`` vmaps swept values
as float32): every strength and every hook period or rate. Structural settings (the size of the
feature buffer, the layer selection) fix array shapes or Python control flow and come only from
the config. Periodic hooks (``every``) stay a real ``lax.cond`` when their period is a config
value; a swept period differs between vmapped runs, so the hook's branch is then selected per
run (both branches computed at every step): slower, same results.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Features = Mapping[str, jax.Array]
Values = Mapping[str, Any]
LayerPairs = Sequence[tuple[str, str]]
TRAINERS = ("supervised", "ppo")


class Setting(NamedTuple):
    """A method setting: its default, what it means, and whether a sweep may vary it."""

    default: Any
    doc: str
    sweepable: bool = True


class StepInputs(NamedTuple):
    """What a trainer hands ``after_update`` after one optimizer step of one network.

    Attributes:
      step: the step's index within the task or phase, computed from scan indices (the same
        for every vmapped run, so periodic hooks stay a real ``lax.cond``).
      features: the network's hidden features on this step's batch (the forward pass of the
        gradient, before the update).
      features_fn: ``params -> features`` on a batch of recent examples (the supervised
        trainer's buffer of the last ``erank_batch`` inputs; PPO's minibatch).
      scoring_features: ``params -> features`` on which units are scored for recycling: the
        features of ``features_fn``, or the step's own ``features`` when the step's batch is
        large enough (PPO's minibatch).
      fresh_params: ``() -> params``, a new initialization of the network (recycled units'
        weights).
      layer_pairs: the network's ``(layer, next_layer)`` pairs (``models.unit_layers``).
    """

    step: jax.Array
    features: Features
    features_fn: Callable[[PyTree], Features]
    scoring_features: Callable[[PyTree], Features]
    fresh_params: Callable[[], PyTree]
    layer_pairs: LayerPairs


Transform = Callable[[Values], optax.GradientTransformation]
# after_update(values, params, opt_state, state, inputs) -> (params, opt_state, state, recycled)
AfterUpdate = Callable[[Values, PyTree, PyTree, PyTree, StepInputs],
                       tuple[PyTree, PyTree, PyTree, jax.Array]]
# at_task_start(params, opt_state, fresh_params, optimizer) -> (params, opt_state)
AtTaskStart = Callable[[PyTree, PyTree, Callable[[], PyTree], optax.GradientTransformation],
                       tuple[PyTree, PyTree]]


@dataclasses.dataclass(frozen=True)
class Part:
    """One ingredient of a method (see the module docstring).

    Attributes:
      name: the key of its state in the method's state.
      settings: the settings it reads.
      before, after: ``values -> transform`` chained before / after the base optimizer.
      init_state: ``(params, layer_pairs) -> state``.
      after_update, at_task_start: hooks.
      layer_norm: the model gets LayerNorm before every hidden activation.
      recycles: re-initializes hidden units (its hooks read ``StepInputs.layer_pairs``).
      feature_batch: reads features of a batch of recent examples (``features_fn``).
      erank_ascent: the alternating ER ascent, whose batch is the inputs since its last step.
      reinitializes: re-initializes the whole network (and the model's statistics) at tasks.
    """

    name: str
    settings: tuple[str, ...] = ()
    before: Transform | None = None
    after: Transform | None = None
    init_state: Callable[[PyTree, LayerPairs], PyTree] | None = None
    after_update: AfterUpdate | None = None
    at_task_start: AtTaskStart | None = None
    layer_norm: bool = False
    recycles: bool = False
    feature_batch: bool = False
    erank_ascent: bool = False
    reinitializes: bool = False


@dataclasses.dataclass(frozen=True)
class Method:
    """A named plasticity method: its parts and the trainers that run it."""

    name: str
    summary: str
    parts: tuple[Part, ...] = ()
    trainers: tuple[str, ...] = TRAINERS

    @property
    def settings(self) -> tuple[str, ...]:
        """Every setting a part reads, sorted."""
        return tuple(sorted({s for part in self.parts for s in part.settings}))

    @property
    def layer_norm(self) -> bool:
        return any(part.layer_norm for part in self.parts)

    @property
    def recycles(self) -> bool:
        """True when a hook re-initializes units (and needs the network's ``layer_pairs``)."""
        return any(part.recycles for part in self.parts)

    @property
    def feature_batch(self) -> bool:
        return any(part.feature_batch for part in self.parts)

    @property
    def erank_ascent(self) -> bool:
        return any(part.erank_ascent for part in self.parts)

    @property
    def reinitializes(self) -> bool:
        return any(part.reinitializes for part in self.parts)

    def values(self, settings: Values, swept: Values) -> dict[str, Any]:
        """The value of each setting this method reads: swept (possibly traced) over config."""
        return {name: swept.get(name, settings[name]) for name in self.settings}

    def optimizer(self, values: Values, base: optax.GradientTransformation
                  ) -> optax.GradientTransformationExtraArgs:
        """``optax.chain(*before, base, *after)`` of the parts, built from ``values``."""
        before = [part.before(values) for part in self.parts if part.before]
        after = [part.after(values) for part in self.parts if part.after]
        return optax.chain(*before, base, *after)

    def init_state(self, params: PyTree, layer_pairs: LayerPairs) -> dict[str, PyTree]:
        """``{part name: state}`` of the parts that keep one (``{}`` when none does)."""
        return {part.name: part.init_state(params, layer_pairs)
                for part in self.parts if part.init_state}

    def after_update(self, values: Values, params: PyTree, opt_state: PyTree,
                     state: Mapping[str, PyTree], inputs: StepInputs
                     ) -> tuple[PyTree, PyTree, dict[str, PyTree], jax.Array]:
        """Every part's hook after one optimizer step of one network.

        Returns ``(params, opt_state, state, recycled)``: ``recycled`` counts the units the
        hooks re-initialized.
        """
        state, recycled = dict(state), jnp.zeros((), jnp.int32)
        for part in self.parts:
            if part.after_update:
                params, opt_state, part_state, count = part.after_update(
                    values, params, opt_state, state.get(part.name), inputs)
                if part.init_state:
                    state[part.name] = part_state
                recycled = recycled + count
        return params, opt_state, state, recycled

    def at_task_start(self, params: PyTree, opt_state: PyTree,
                      fresh_params: Callable[[], PyTree], optimizer: optax.GradientTransformation
                      ) -> tuple[PyTree, PyTree]:
        """Every part's hook at the start of a task or phase; ``fresh_params`` is called only
        by a part that re-initializes."""
        for part in self.parts:
            if part.at_task_start:
                params, opt_state = part.at_task_start(params, opt_state, fresh_params,
                                                       optimizer)
        return params, opt_state


def as_int(value: Any) -> int | jax.Array:
    """A count or period: a Python int from a config value, int32 from a traced swept one."""
    if isinstance(value, jax.Array):
        return jnp.round(value).astype(jnp.int32)
    return int(value)


def as_float(value: Any) -> float | jax.Array:
    """A rate or strength: a Python float from a config value, the array of a swept one."""
    return value if isinstance(value, jax.Array) else float(value)


def every(period: Any, step: jax.Array, fn: Callable[[Any], Any], skip: Callable[[Any], Any],
          operand: Any) -> Any:
    """``fn(operand)`` at the last step of every ``period`` steps, else ``skip(operand)``."""
    n = as_int(period)
    return jax.lax.cond(step % n == n - 1, fn, skip, operand)
