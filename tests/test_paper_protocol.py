"""Options of the paper's protocol, against references. (The supervised trainer's
``head_reset`` and ``hessian.data``: ``tests/train/test_train_supervised.py``.)

- PPO's clipped value loss (the formula of lop-jax ``rlopt/ppo_nonstationary.py`` 103-110) and
  the ER window bound to the rollout;
- class-incremental CIFAR's Hessian on the new classes' training images.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.rl import policy, ppo
from spectral_plasticity.tasks.idx import ImageDataset


def test_clipped_value_loss_is_the_papers_formula():
    config = ppo.default_config("continual_cartpole", "tiny")
    nets = policy.make_actor_critic(4, 2, True, hidden_sizes=(8,), activation="relu",
                                    kernel_init="lecun_uniform", layer_norm=False)
    params = policy.init_params(nets, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 6)
    n = 32
    obs = jax.random.normal(keys[0], (n, 4))
    batch = ppo.Batch(obs, jax.random.bernoulli(keys[1], 0.5, (n,)).astype(jnp.int32),
                      jax.random.normal(keys[2], (n,)) - 1.0, jax.random.normal(keys[3], (n,)),
                      jax.random.normal(keys[4], (n,)), jax.random.normal(keys[5], (n,)))
    kwargs = dict(clip_eps=0.2, vf_coef=1.0, ent_coef=0.0, normalize_advantages=False)
    clipped = ppo.ppo_loss(nets, params, batch, clip_value=True, **kwargs)[1][0]["value_loss"]
    plain = ppo.ppo_loss(nets, params, batch, **kwargs)[1][0]["value_loss"]
    v = np.asarray(policy.critic_apply(nets, params["critic"], obs)[0], np.float64)
    old, ret = np.asarray(batch.values, np.float64), np.asarray(batch.returns, np.float64)
    v_clip = old + np.clip(v - old, -0.2, 0.2)
    expected = 0.5 * np.mean(np.maximum((v - ret) ** 2, (v_clip - ret) ** 2))
    np.testing.assert_allclose(float(clipped), expected, rtol=1e-5)
    np.testing.assert_allclose(float(plain), 0.5 * np.mean((v - ret) ** 2), rtol=1e-5)
    assert config.ppo.clip_value is False  # Dohare et al.'s default stays unclipped


def test_ppo_er_window_is_bound_to_the_rollout():
    config = ppo.default_config("continual_cartpole", "tiny")
    config.method = "l2_er"
    rollout = config.ppo.num_envs * config.ppo.num_steps
    config.method_settings.erank_batch = rollout + 1
    match = rf"erank_batch {rollout + 1} must lie in \[1, {rollout}\]"
    with pytest.raises(ValueError, match=match):
        ppo.make_train(config)


def test_cifar_hessian_on_the_new_classes_training_images():
    """hessian_classes="new": un-augmented training images of the increment's 5 new classes."""
    from spectral_plasticity.tasks import IncrementalCIFAR
    from spectral_plasticity.tasks.incremental_cifar import normalize

    rng = np.random.default_rng(0)
    train_y, test_y = np.repeat(np.arange(10), 6), np.repeat(np.arange(10), 3)
    data = ImageDataset(rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8),
                        train_y.astype(np.uint8),
                        rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8),
                        test_y.astype(np.uint8))
    stream = IncrementalCIFAR(data, num_tasks=2, num_classes=10, train_per_class=6,
                              train_size=20, eval_size=10, hessian_classes="new")
    key = jax.random.key(3)
    order = np.asarray(stream.class_order(key))
    state = stream.begin_task(key, jnp.asarray(1))
    x, y = stream.hessian_data(state, "train", 40)  # 30 new images, cycled to 40
    assert set(np.asarray(y).tolist()) == set(order[5:10].tolist())
    assert len({tuple(np.asarray(v).ravel()[:8]) for v in x}) == 30
    for image, label in zip(np.asarray(x)[:5], np.asarray(y)[:5], strict=True):
        candidates = normalize(jnp.asarray(data.train_images[train_y == label]))
        assert np.min(np.abs(np.asarray(candidates) - image).max(axis=(1, 2, 3))) < 1e-6
    _, y_eval = stream.hessian_data(state, "eval", 15)
    assert set(np.asarray(y_eval).tolist()) == set(order[5:10].tolist())
    seen = IncrementalCIFAR(data, num_tasks=2, num_classes=10, train_per_class=6,
                            train_size=20, eval_size=10)
    seen_state = seen.begin_task(key, jnp.asarray(1))
    np.testing.assert_array_equal(seen.hessian_data(seen_state, "train", 10)[1],
                                  seen.train_batch(seen_state, 0, 10)[1])
    with pytest.raises(ValueError, match="hessian_classes must be 'seen' or 'new'"):
        IncrementalCIFAR(data, num_classes=10, train_per_class=6, hessian_classes="old")
