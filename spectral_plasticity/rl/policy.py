"""Separate actor and critic networks and the action distributions of PPO.

Both networks are ``models.MLP``s, so they return their hidden features for metrics, the
effective-rank regularizer and unit recycling. Parameters are ``{'actor': ..., 'critic': ...}``:
each a flax params dict with layers ``hidden_{i}`` and ``head`` at the top level (what the
recycling functions expect); a continuous actor also holds ``log_std``, the state-independent
log standard deviations of its diagonal Gaussian.

- continuous: ``pi(a|s) = N(a; mu(s), diag(exp(2 log_std)))``,
  ``log pi = sum_i [-(a_i - mu_i)^2 / (2 sigma_i^2) - log sigma_i - log(2 pi) / 2]``,
  entropy ``sum_i [log sigma_i + (1 + log 2 pi) / 2]``;
- discrete: ``pi(a|s) = softmax(logits(s))_a``, entropy ``-sum_a pi_a log pi_a``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity.models import MLP, Features

PyTree = Any
_LOG_2PI = float(jnp.log(2.0 * jnp.pi))


class ActorCritic(NamedTuple):
    """The two networks of a PPO agent and its action space.

    Attributes:
      actor: outputs action means (continuous) or logits (discrete).
      critic: outputs one value.
      discrete: the action space's kind.
      action_size: action dimensions or number of actions.
      observation_size: length of the observation.
      log_std_init: initial log standard deviation (continuous).
      actor_head_scale: factor on the actor's initial output weights (``0.01``: near-zero
        initial action means or uniform logits, as Andrychowicz et al. 2021, "What matters in
        on-policy reinforcement learning?", recommend; ``1``: the plain initializer).
    """

    actor: MLP
    critic: MLP
    discrete: bool
    action_size: int
    observation_size: int
    log_std_init: float = 0.0
    actor_head_scale: float = 1.0


def make_actor_critic(observation_size: int, action_size: int, discrete: bool, *,
                      hidden_sizes: tuple[int, ...] = (256,), activation: str = "relu",
                      kernel_init: str = "lecun_uniform", layer_norm: bool = False,
                      log_std_init: float = 0.0, actor_head_scale: float = 1.0) -> ActorCritic:
    """Actor and critic MLPs of the same shape (the paper: one hidden layer of 256 ReLUs,
    LeCun-uniform initialization)."""
    if observation_size < 1 or action_size < 1:
        raise ValueError(f"observation_size and action_size must be positive, got "
                         f"{observation_size} and {action_size}")
    if not actor_head_scale > 0:
        raise ValueError(f"actor_head_scale must be positive, got {actor_head_scale}")
    mlp = lambda outputs: MLP(hidden_sizes=tuple(hidden_sizes), num_outputs=outputs,
                              activation=activation, layer_norm=layer_norm,
                              kernel_init=kernel_init)
    return ActorCritic(actor=mlp(action_size), critic=mlp(1), discrete=discrete,
                       action_size=action_size, observation_size=observation_size,
                       log_std_init=log_std_init, actor_head_scale=actor_head_scale)


def init_params(nets: ActorCritic, key: jax.Array) -> dict[str, PyTree]:
    """``{'actor': ..., 'critic': ...}`` at initialization."""
    actor_key, critic_key = jax.random.split(key)
    dummy = jnp.zeros((1, nets.observation_size), jnp.float32)
    actor = dict(nets.actor.init(actor_key, dummy)["params"])
    actor["head"] = {**actor["head"],
                     "kernel": nets.actor_head_scale * actor["head"]["kernel"]}
    if not nets.discrete:
        actor["log_std"] = jnp.full((nets.action_size,), nets.log_std_init, jnp.float32)
    return {"actor": actor, "critic": dict(nets.critic.init(critic_key, dummy)["params"])}


def _network_params(params: PyTree) -> PyTree:
    return {k: v for k, v in params.items() if k != "log_std"}


def actor_apply(nets: ActorCritic, actor_params: PyTree, obs: jax.Array
                ) -> tuple[jax.Array, Features]:
    """``(means or logits (B, action_size), hidden features)``."""
    chex.assert_rank(obs, 2)
    return nets.actor.apply({"params": _network_params(actor_params)}, obs)


def critic_apply(nets: ActorCritic, critic_params: PyTree, obs: jax.Array
                 ) -> tuple[jax.Array, Features]:
    """``(values (B,), hidden features)``."""
    chex.assert_rank(obs, 2)
    values, features = nets.critic.apply({"params": critic_params}, obs)
    return values[:, 0], features


def log_prob(nets: ActorCritic, actor_params: PyTree, outputs: jax.Array,
             actions: jax.Array) -> jax.Array:
    """``log pi(a|s)`` per row, shape ``(B,)``, from the actor's ``outputs``."""
    if nets.discrete:
        return jnp.take_along_axis(jax.nn.log_softmax(outputs), actions[:, None], axis=-1)[:, 0]
    log_std = actor_params["log_std"]
    z = (actions - outputs) * jnp.exp(-log_std)
    return jnp.sum(-0.5 * z ** 2 - log_std - 0.5 * _LOG_2PI, axis=-1)


def entropy(nets: ActorCritic, actor_params: PyTree, outputs: jax.Array) -> jax.Array:
    """The policy's entropy per row, shape ``(B,)``."""
    if nets.discrete:
        logp = jax.nn.log_softmax(outputs)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    per_row = jnp.sum(actor_params["log_std"] + 0.5 * (1.0 + _LOG_2PI))
    return jnp.broadcast_to(per_row, outputs.shape[:1])


def sample(nets: ActorCritic, actor_params: PyTree, outputs: jax.Array, key: jax.Array
           ) -> jax.Array:
    """Actions drawn from the policy: ``(B,)`` int32 or ``(B, action_size)`` float32."""
    if nets.discrete:
        return jax.random.categorical(key, outputs).astype(jnp.int32)
    noise = jax.random.normal(key, outputs.shape, outputs.dtype)
    return outputs + jnp.exp(actor_params["log_std"]) * noise
