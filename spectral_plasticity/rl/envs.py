"""Continual reinforcement-learning environments: dynamics that change every phase.

A ``ContinualEnv`` is a single-environment, pure-function interface (``jax.vmap`` it over
parallel environments) whose dynamics are an explicit argument, so a new phase's dynamics reach
the compiled loop as data and nothing recompiles:

- ``reset(key, dynamics) -> (state, obs)``;
- ``step(key, state, action, dynamics) -> EnvStep``: the true successor, **before** any reset
  (its observation is what a truncated episode bootstraps from); ``auto_reset`` then replaces
  finished episodes by fresh ones;
- ``sample_dynamics(key, num_phases)``: a per-run schedule, one entry per phase (a pytree with
  leading axis ``num_phases``); ``phase_dynamics(schedule, phase)`` picks one;
- ``describe(dynamics)``: the varied quantities of a phase, as metrics.

Episodes end by termination (the environment's own condition: no bootstrap) or by truncation at
``episode_length`` steps (bootstrap from the successor). Actions are what the policy emits: for
continuous control the environment clips them to its action box (``[-1, 1]`` times the action
scale).

Environments (``make_env(name, ...)``):

- ``slippery_ant``: Brax ``ant`` (mjx backend by default) whose sliding friction changes every
  phase, drawn log-uniformly in ``[0.02, 2.0]`` (Dohare et al. 2024, "Loss of plasticity in deep
  continual learning", Nature; used by He et al. 2025). MuJoCo combines the friction of two
  contacting geoms by their maximum, so the friction of *every* geom
  (``sys.geom_friction[:, 0]``) is set, not the floor's alone. 27 observations, 8 actions,
  episodes of 1000 steps (``dt`` = 0.05 s).
- ``continual_cartpole``: gymnax CartPole-v1 (2 discrete actions, 500-step episodes) whose pole
  length, pole mass and gravity are drawn log-uniformly per phase (0.5x to 2x the defaults, the
  dependent ``total_mass`` and ``polemass_length`` updated with them).
- ``continual_pendulum``: gymnax Pendulum-v1 (one continuous torque in ``[-2, 2]``, 200-step
  episodes) whose mass, length and gravity are drawn the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Dynamics = Any
ANT_FRICTION_RANGE = (0.02, 2.0)


class EnvState(NamedTuple):
    """An environment's state and the number of steps taken in the current episode."""

    inner: Any
    time: jax.Array


class EnvStep(NamedTuple):
    """One transition, before any reset.

    Attributes:
      state: the successor state.
      obs: the successor's observation.
      reward: the reward of the transition, float32 scalar.
      terminated: the episode ended in a terminal state (no bootstrap).
      truncated: the episode hit the time limit (bootstrap from ``obs``).
    """

    state: EnvState
    obs: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array


class ContinualEnv(NamedTuple):
    """A continual environment; see the module docstring for the contract of each function.

    Attributes:
      name: the registry name.
      observation_size: length of the (flat) observation.
      action_size: action dimensions (continuous) or number of actions (discrete).
      discrete: whether actions are integers in ``[0, action_size)``.
      episode_length: the time limit.
      reset, step, sample_dynamics, describe: the functions.
    """

    name: str
    observation_size: int
    action_size: int
    discrete: bool
    episode_length: int
    reset: Callable[[jax.Array, Dynamics], tuple[EnvState, jax.Array]]
    step: Callable[[jax.Array, EnvState, jax.Array, Dynamics], EnvStep]
    sample_dynamics: Callable[[jax.Array, int], Dynamics]
    describe: Callable[[Dynamics], dict[str, jax.Array]]


def phase_dynamics(schedule: Dynamics, phase: jax.Array) -> Dynamics:
    """The dynamics of ``phase`` (a traced integer) in a schedule from ``sample_dynamics``."""
    return jax.tree.map(lambda x: x[phase], schedule)


def auto_reset(step: EnvStep, reset_state: EnvState, reset_obs: jax.Array
               ) -> tuple[EnvState, jax.Array]:
    """``(state, obs)`` to act from next: the reset ones where the episode ended, else the step's.

    ``reset_state``/``reset_obs`` come from ``reset`` with a fresh key (a trainer draws them once
    per rollout: the reset cost is then paid once per rollout, not every step).
    """
    done = step.terminated | step.truncated
    state = jax.tree.map(lambda r, s: jnp.where(done, r, s), reset_state, step.state)
    return state, jnp.where(done, reset_obs, step.obs)


def log_uniform(key: jax.Array, shape: tuple[int, ...], low: float, high: float) -> jax.Array:
    """Samples ``exp(U(log low, log high))`` of ``shape`` (float32)."""
    if not 0 < low <= high:
        raise ValueError(f"log-uniform bounds need 0 < low <= high, got ({low}, {high})")
    return jnp.exp(jax.random.uniform(key, shape, jnp.float32, jnp.log(low), jnp.log(high)))


def _observation_size(reset: Callable[[jax.Array, Dynamics], tuple[EnvState, jax.Array]],
                      dynamics: Dynamics) -> int:
    """Observation length from an abstract evaluation of ``reset`` (nothing is computed)."""
    obs = jax.eval_shape(lambda k: reset(k, dynamics)[1], jax.random.key(0))
    return int(obs.shape[-1])


def _time_limit(episode_length: int) -> int:
    if episode_length < 1:
        raise ValueError(f"episode_length must be positive, got {episode_length}")
    return int(episode_length)


# ------------------------------------------------------------------------------------------
# Slippery Ant (Brax)


@contextlib.contextmanager
def _system(env: Any, sys: Any) -> Iterator[None]:
    """Traces ``env``'s functions with ``sys`` in place of its system (as Brax's
    domain-randomization wrapper does); the original is restored afterwards."""
    original = env.sys
    env.sys = sys
    try:
        yield
    finally:
        env.sys = original


def slippery_ant(*, backend: str = "mjx", episode_length: int = 1000,
                 friction_range: tuple[float, float] = ANT_FRICTION_RANGE) -> ContinualEnv:
    """Brax ``ant`` whose sliding friction (every geom) is the phase's dynamics.

    The dynamics of a phase is a float32 scalar ``mu``; inside the traced step the system is
    ``sys.tree_replace({'geom_friction': sys.geom_friction.at[:, 0].set(mu)})``.

    Args:
      backend: a Brax physics backend (``mjx``, ``generalized``, ``positional``, ``spring``).
      episode_length: the time limit in steps.
      friction_range: bounds of the log-uniform schedule.
    """
    from brax import envs as brax_envs

    episode_length = _time_limit(episode_length)
    low, high = friction_range
    log_uniform(jax.random.key(0), (), low, high)  # validates the bounds
    env = brax_envs.get_environment("ant", backend=backend)
    base_sys = env.sys

    def system(mu: jax.Array) -> Any:
        mu = jnp.asarray(mu, jnp.float32)
        return base_sys.tree_replace(
            {"geom_friction": base_sys.geom_friction.at[:, 0].set(mu)})

    def native_reset(key: jax.Array, mu: jax.Array) -> Any:
        with _system(env, system(mu)):
            return env.reset(key)

    # The physics state holds zero-size arrays (the ant has no actuator activations, mocap
    # bodies, ...); they are kept out of the carried state (None in their place), which
    # checkpointers cannot store, and put back before each step.
    template = jax.eval_shape(native_reset, jax.random.key(0), jnp.float32(1.0))

    def drop_empty(inner: Any) -> Any:
        return jax.tree.map(lambda x: None if 0 in jnp.shape(x) else x, inner)

    def restore_empty(inner: Any) -> Any:
        return jax.tree.map(lambda t, x: jnp.zeros(t.shape, t.dtype) if x is None else x,
                            template, inner, is_leaf=lambda x: x is None)

    def reset(key: jax.Array, mu: jax.Array) -> tuple[EnvState, jax.Array]:
        state = native_reset(key, mu)
        return EnvState(drop_empty(state), jnp.zeros((), jnp.int32)), state.obs

    def step(key: jax.Array, state: EnvState, action: jax.Array, mu: jax.Array) -> EnvStep:
        del key  # the dynamics are deterministic
        with _system(env, system(mu)):
            inner = env.step(restore_empty(state.inner), jnp.clip(action, -1.0, 1.0))
        time = state.time + 1
        return EnvStep(EnvState(drop_empty(inner), time), inner.obs,
                       inner.reward.astype(jnp.float32), inner.done > 0.5, time >= episode_length)

    def sample_dynamics(key: jax.Array, num_phases: int) -> jax.Array:
        return log_uniform(key, (num_phases,), low, high)

    def describe(mu: jax.Array) -> dict[str, jax.Array]:
        return {"env/friction": mu}

    return ContinualEnv(
        name="slippery_ant", observation_size=_observation_size(reset, jnp.float32(1.0)),
        action_size=int(env.action_size), discrete=False, episode_length=episode_length,
        reset=reset, step=step, sample_dynamics=sample_dynamics, describe=describe)


# ------------------------------------------------------------------------------------------
# gymnax classic control with per-phase parameters


# Varied parameters per environment: name -> (low, high) of the log-uniform draw.
CARTPOLE_RANGES: dict[str, tuple[float, float]] = {
    "length": (0.25, 1.0), "masspole": (0.05, 0.2), "gravity": (4.9, 19.6)}
PENDULUM_RANGES: dict[str, tuple[float, float]] = {
    "m": (0.5, 2.0), "l": (0.5, 2.0), "g": (5.0, 20.0)}


def _cartpole_derived(params: Any) -> Any:
    """CartPole stores ``total_mass`` and ``polemass_length``; keep them consistent."""
    return params.replace(total_mass=params.masscart + params.masspole,
                          polemass_length=params.masspole * params.length)


def continual_gymnax(name: str, *, episode_length: int | None = None,
                     ranges: Mapping[str, tuple[float, float]] | None = None) -> ContinualEnv:
    """A gymnax classic-control environment whose parameters change every phase.

    The dynamics of a phase are the environment's ``EnvParams`` (every field a float32 or int32
    scalar), the ``ranges`` fields drawn log-uniformly per phase.

    Args:
      name: ``"cartpole"`` or ``"pendulum"``.
      episode_length: the time limit (default: gymnax's ``max_steps_in_episode``).
      ranges: ``{field: (low, high)}`` overriding the defaults (``CARTPOLE_RANGES`` /
        ``PENDULUM_RANGES``); every field must be one of ``EnvParams``.
    """
    import gymnax

    specs = {"cartpole": ("CartPole-v1", CARTPOLE_RANGES, _cartpole_derived, 1.0),
             "pendulum": ("Pendulum-v1", PENDULUM_RANGES, lambda p: p, 2.0)}
    if name not in specs:
        raise ValueError(f"unknown gymnax environment {name!r}; choose one of {sorted(specs)}")
    gymnax_id, default_ranges, derived, action_scale = specs[name]
    env, default_params = gymnax.make(gymnax_id)
    ranges = dict(default_ranges if ranges is None else ranges)
    unknown = [f for f in ranges if not hasattr(default_params, f)]
    if unknown or not ranges:
        raise ValueError(f"unknown {name} parameters {unknown or '(none given)'}; EnvParams has "
                         f"{sorted(vars(default_params))}")
    for low, high in ranges.values():
        log_uniform(jax.random.key(0), (), low, high)  # validates the bounds
    episode_length = _time_limit(int(default_params.max_steps_in_episode)
                                 if episode_length is None else episode_length)
    discrete = name == "cartpole"
    template = jax.tree.map(lambda x: jnp.asarray(x, jnp.result_type(x)), default_params)

    def reset(key: jax.Array, params: Any) -> tuple[EnvState, jax.Array]:
        obs, state = env.reset_env(key, params)
        return EnvState(state, jnp.zeros((), jnp.int32)), obs

    def step(key: jax.Array, state: EnvState, action: jax.Array, params: Any) -> EnvStep:
        if not discrete:
            action = jnp.clip(action, -1.0, 1.0) * action_scale
        obs, inner, reward, terminated, _ = env.step_env(key, state.inner, action, params)
        time = state.time + 1
        return EnvStep(EnvState(inner, time), obs, jnp.asarray(reward, jnp.float32).reshape(()),
                       jnp.asarray(terminated, bool), time >= episode_length)

    def sample_dynamics(key: jax.Array, num_phases: int) -> Any:
        keys = jax.random.split(key, len(ranges))
        drawn = {f: log_uniform(k, (num_phases,), *ranges[f])
                 for k, f in zip(keys, sorted(ranges), strict=True)}
        stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_phases,)), template)
        return derived(stacked.replace(**drawn))

    def describe(params: Any) -> dict[str, jax.Array]:
        return {f"env/{f}": getattr(params, f) for f in sorted(ranges)}

    action_size = env.num_actions if discrete else 1
    return ContinualEnv(
        name=f"continual_{name}", observation_size=_observation_size(reset, template),
        action_size=int(action_size), discrete=discrete, episode_length=episode_length,
        reset=reset, step=step, sample_dynamics=sample_dynamics, describe=describe)


ENVIRONMENTS = ("slippery_ant", "continual_cartpole", "continual_pendulum")


def make_env(name: str, **kwargs: Any) -> ContinualEnv:
    """The continual environment ``name`` (one of ``ENVIRONMENTS``) built with ``kwargs``."""
    if name == "slippery_ant":
        return slippery_ant(**kwargs)
    if name in ("continual_cartpole", "continual_pendulum"):
        return continual_gymnax(name.removeprefix("continual_"), **kwargs)
    raise ValueError(f"unknown environment {name!r}; choose one of {list(ENVIRONMENTS)}")
