"""PPO's pieces as pure functions: generalized advantage estimation and the clipped objective.

References: Schulman, Moritz, Levine, Jordan & Abbeel (2016), "High-dimensional continuous
control using generalized advantage estimation"; Schulman, Wolski, Dhariwal, Radford & Klimov
(2017), "Proximal policy optimization algorithms".
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp


def gae(rewards: jax.Array, values: jax.Array, next_values: jax.Array, terminated: jax.Array,
        done: jax.Array, gamma: float, lam: float) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimates and value targets over a time-major rollout.

    With ``V(s'_t)`` the value of step ``t``'s true successor (before any reset)::

        delta_t = r_t + gamma (1 - terminated_t) V(s'_t) - V(s_t)
        A_t     = delta_t + gamma lam (1 - done_t) A_{t+1},     A_T = 0
        R_t     = A_t + V(s_t)

    ``done_t = terminated_t or truncated_t``: a truncated episode bootstraps from its successor
    but its advantage does not leak into the next episode; past the rollout's last step the
    recursion is cut (the last ``delta`` already bootstraps from ``V(s'_{T-1})``).

    Args:
      rewards, values, next_values: ``(T, ...)`` float arrays (``...`` e.g. environments).
      terminated, done: ``(T, ...)`` booleans.
      gamma: discount in [0, 1].
      lam: GAE's lambda in [0, 1].

    Returns:
      ``(advantages, returns)``, each shaped like ``rewards``.
    """
    chex.assert_equal_shape([rewards, values, next_values, terminated, done])
    if isinstance(gamma, float | int) and not 0 <= gamma <= 1:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    if isinstance(lam, float | int) and not 0 <= lam <= 1:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    not_terminal = 1.0 - terminated.astype(rewards.dtype)
    not_done = 1.0 - done.astype(rewards.dtype)
    deltas = rewards + gamma * not_terminal * next_values - values

    def backward(carry, inputs):
        delta, keep = inputs
        advantage = delta + gamma * lam * keep * carry
        return advantage, advantage

    _, advantages = jax.lax.scan(backward, jnp.zeros_like(rewards[0]), (deltas, not_done),
                                 reverse=True)
    return advantages, advantages + values


def clipped_surrogate(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                      clip_eps: float) -> tuple[jax.Array, jax.Array]:
    """PPO's clipped policy loss (to minimize) and the fraction of clipped ratios.

    ``L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)`` with
    ``rho_t = exp(log pi(a_t|s_t) - log pi_old(a_t|s_t))``.

    Args:
      log_prob: ``(B,)`` log-probabilities under the current policy.
      old_log_prob: ``(B,)`` under the policy that collected the data.
      advantages: ``(B,)`` advantage estimates (normalized or not).
      clip_eps: ``eps >= 0``.

    Returns:
      ``(loss, clip_fraction)`` with ``clip_fraction = mean(|rho - 1| > eps)``.
    """
    chex.assert_equal_shape([log_prob, old_log_prob, advantages])
    ratio = jnp.exp(log_prob - old_log_prob)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -jnp.mean(jnp.minimum(unclipped, clipped))
    return loss, jnp.mean(jnp.abs(ratio - 1.0) > clip_eps)


def value_loss(values: jax.Array, returns: jax.Array) -> jax.Array:
    """``0.5 mean_t (V(s_t) - R_t)^2``."""
    chex.assert_equal_shape([values, returns])
    return 0.5 * jnp.mean((values - returns) ** 2)


def normalize(advantages: jax.Array, eps: float = 1e-8) -> jax.Array:
    """``(A - mean A) / (std A + eps)``, the per-minibatch advantage normalization."""
    return (advantages - jnp.mean(advantages)) / (jnp.std(advantages) + eps)
