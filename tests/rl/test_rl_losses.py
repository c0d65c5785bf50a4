"""GAE, the clipped surrogate and the action distributions against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from spectral_plasticity.rl import losses, policy


def test_gae_matches_hand_computed_example():
    # One environment, four steps: a truncation after step 1 (bootstrap from its successor,
    # no leak into the next episode), a termination at step 3 (no bootstrap).
    gamma, lam = 0.9, 0.5
    r = jnp.array([1.0, 2.0, 0.5, 3.0])
    v = jnp.array([0.5, 1.0, 2.0, 1.5])
    nv = jnp.array([1.0, 4.0, 1.5, 7.0])
    terminated = jnp.array([False, False, False, True])
    done = jnp.array([False, True, False, True])
    adv, ret = losses.gae(r, v, nv, terminated, done, gamma, lam)
    d0 = 1.0 + 0.9 * 1.0 - 0.5   # 1.4
    d1 = 2.0 + 0.9 * 4.0 - 1.0   # 4.6  (truncated: bootstraps)
    d2 = 0.5 + 0.9 * 1.5 - 2.0   # -0.15
    d3 = 3.0 - 1.5               # 1.5  (terminated: no bootstrap)
    a3 = d3
    a2 = d2 + 0.45 * a3          # 0.525
    a1 = d1                      # cut at the episode end
    a0 = d0 + 0.45 * a1          # 3.47
    np.testing.assert_allclose(adv, [a0, a1, a2, a3], rtol=1e-6)
    np.testing.assert_allclose(ret, np.array([a0, a1, a2, a3]) + np.asarray(v), rtol=1e-6)


def test_gae_lambda_one_is_discounted_return_minus_value():
    # lambda = 1, no episode end inside: A_t = sum_k gamma^k r_{t+k} + gamma^(T-t) V(s_T) - V_t.
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    last = rng.normal(size=(3,))
    nv = np.concatenate([v[1:], last[None]])
    false = np.zeros((6, 3), bool)
    adv, _ = losses.gae(jnp.asarray(r), jnp.asarray(v), jnp.asarray(nv), false, false, 0.97, 1.0)
    expected = np.zeros_like(r)
    for t in range(6):
        g = sum(0.97 ** k * r[t + k] for k in range(6 - t)) + 0.97 ** (6 - t) * last
        expected[t] = g - v[t]
    np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-5)


def test_gae_rejects_bad_arguments():
    x = jnp.zeros((3,))
    b = jnp.zeros((3,), bool)
    with pytest.raises(ValueError, match="gamma"):
        losses.gae(x, x, x, b, b, 1.5, 0.9)
    with pytest.raises(ValueError, match="lam"):
        losses.gae(x, x, x, b, b, 0.9, -0.1)
    with pytest.raises(AssertionError):
        losses.gae(x, jnp.zeros((4,)), x, b, b, 0.9, 0.9)


def test_clipped_surrogate_matches_direct_formula():
    rng = np.random.default_rng(1)
    logp, old = rng.normal(size=50) * 0.3, rng.normal(size=50) * 0.3
    adv, eps = rng.normal(size=50), 0.2
    loss, frac = losses.clipped_surrogate(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(adv),
                                          eps)
    terms = []
    for lp, lo, a in zip(logp, old, adv, strict=True):
        rho = np.exp(lp - lo)
        clipped = min(max(rho, 1 - eps), 1 + eps)
        terms.append(min(rho * a, clipped * a))
    np.testing.assert_allclose(loss, -np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(frac, np.mean(np.abs(np.exp(logp - old) - 1) > eps), rtol=1e-6)


def test_clipped_surrogate_gradient_vanishes_beyond_the_clip():
    # Positive advantage and ratio above 1 + eps: the objective is flat in log pi.
    grad = jax.grad(lambda lp: losses.clipped_surrogate(lp, jnp.zeros(1), jnp.ones(1), 0.2)[0])
    assert float(grad(jnp.array([0.5]))[0]) == 0.0
    np.testing.assert_allclose(grad(jnp.array([0.1]))[0], -np.exp(0.1), rtol=1e-6)


def test_value_loss_and_normalize():
    np.testing.assert_allclose(losses.value_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])),
                               0.5 * (1 + 4) / 2)
    z = losses.normalize(jnp.array([1.0, 2.0, 3.0, 6.0]))
    np.testing.assert_allclose([jnp.mean(z), jnp.std(z)], [0.0, 1.0], atol=1e-6)


def test_gaussian_policy_log_prob_and_entropy_match_scipy():
    nets = policy.make_actor_critic(3, 2, False, hidden_sizes=(8,))
    params = policy.init_params(nets, jax.random.key(0))
    params["actor"]["log_std"] = jnp.array([-0.5, 0.3])
    obs = jax.random.normal(jax.random.key(1), (5, 3))
    mean, features = policy.actor_apply(nets, params["actor"], obs)
    assert set(features) == {"hidden_0"} and features["hidden_0"].shape == (5, 8)
    actions = policy.sample(nets, params["actor"], mean, jax.random.key(2))
    std = np.exp([-0.5, 0.3])
    expected = stats.norm.logpdf(np.asarray(actions), np.asarray(mean), std).sum(-1)
    np.testing.assert_allclose(policy.log_prob(nets, params["actor"], mean, actions), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(policy.entropy(nets, params["actor"], mean),
                               np.full(5, stats.norm(0, std).entropy().sum()), rtol=1e-6)


def test_categorical_policy_matches_numpy():
    nets = policy.make_actor_critic(4, 3, True, hidden_sizes=(8,))
    params = policy.init_params(nets, jax.random.key(0))
    assert "log_std" not in params["actor"]
    logits, _ = policy.actor_apply(nets, params["actor"], jax.random.normal(jax.random.key(1),
                                                                            (6, 4)))
    actions = policy.sample(nets, params["actor"], logits, jax.random.key(2))
    assert actions.dtype == jnp.int32 and actions.shape == (6,)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(policy.log_prob(nets, params["actor"], logits, actions),
                               np.log(probs[np.arange(6), np.asarray(actions)]), rtol=1e-5)
    np.testing.assert_allclose(policy.entropy(nets, params["actor"], logits),
                               -(probs * np.log(probs)).sum(-1), rtol=1e-5)
    values, _ = policy.critic_apply(nets, params["critic"], jnp.zeros((6, 4)))
    assert values.shape == (6,)


def test_actor_critic_rejects_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        policy.make_actor_critic(0, 2, False)
