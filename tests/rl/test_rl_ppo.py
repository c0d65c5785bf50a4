"""Continual PPO: learns, records its phase metrics, vmaps over seeds exactly, never recompiles
across phases. (The plasticity methods inside PPO: ``test_rl_methods.py``.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity import schema
from spectral_plasticity.rl import envs, ppo


def _tiny(**changes):
    config = ppo.default_config("continual_cartpole", "tiny")
    config.update(changes)
    return config


def _random_policy_return(env, dynamics, key, num_envs=16, num_steps=400):
    """Mean return of finished episodes under uniformly random actions."""
    state, obs = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(key, num_envs),
                                                       dynamics)
    reset_state, reset_obs = state, obs

    def body(carry, k):
        state, ret = carry
        actions = jax.random.randint(k, (num_envs,), 0, env.action_size)
        step = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k, num_envs), state, actions, dynamics)
        done = step.terminated | step.truncated
        ret = ret + step.reward
        state, _ = jax.vmap(envs.auto_reset)(step, reset_state, reset_obs)
        return (state, jnp.where(done, 0.0, ret)), (jnp.where(done, ret, 0.0), done)

    _, (finished, done) = jax.lax.scan(body, (state, jnp.zeros(num_envs)),
                                       jax.random.split(key, num_steps))
    return float(finished.sum() / done.sum())


@pytest.mark.slow
def test_ppo_learns_cartpole_within_a_phase():
    # Two phases of different CartPole dynamics: the return rises far above a random policy's.
    config = ppo.default_config("continual_cartpole", "tiny")
    config.num_phases, config.phases_per_chunk, config.steps_per_phase = 2, 1, 20_480
    config.ppo.update(num_envs=16, num_steps=64, num_minibatches=4, update_epochs=4)
    config.model.hidden_sizes = (64,)
    config.optimizer.learning_rate = 2.5e-3
    config.measure_hessian = False
    trainer = ppo.make_train(config)
    run_chunk = jax.jit(trainer.run_chunk)
    state = jax.jit(trainer.init)(jax.random.key(0), {})
    rows = []
    for _ in range(trainer.num_chunks):
        state, chunk_rows = run_chunk(state, {})
        rows.append(chunk_rows)
    env = envs.make_env("continual_cartpole")
    random_return = _random_policy_return(env, envs.phase_dynamics(state.schedule, 1),
                                          jax.random.key(1))
    assert 10 < random_return < 40
    learned = float(rows[1]["episode_return_last"][0])
    assert learned > 3 * random_return, (learned, random_return)
    sums, counts = rows[0]["update_return_sum"][0], rows[0]["update_episodes"][0]
    early, late = sums[:3].sum() / counts[:3].sum(), sums[-3:].sum() / counts[-3:].sum()
    assert late > 2 * early  # the return rises within a phase


@pytest.fixture(scope="module")
def measured_chunks():
    """Two seeds of the tiny CBP+L2 config vmapped, the Hessian measured, one phase per chunk
    through one jitted ``run_chunk``: ``(trainer, keys, final state, rows, traces)``."""
    trainer = ppo.make_train(_tiny(method="cbp_l2", phases_per_chunk=1))
    traces = []

    def run_chunk(state, hparams):
        traces.append(1)
        return jax.vmap(trainer.run_chunk, in_axes=(0, None))(state, hparams)

    run_chunk = jax.jit(run_chunk)
    keys = jax.random.split(jax.random.key(7), 2)
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(keys, {})
    chunks = []
    for _ in range(trainer.num_chunks):
        state, rows = run_chunk(state, {})
        chunks.append(rows)
    rows = {k: np.concatenate([np.asarray(c[k]) for c in chunks], axis=1) for k in chunks[0]}
    return trainer, keys, state, rows, len(traces)


def test_new_phase_dynamics_do_not_recompile(measured_chunks):
    # Both phases ran through one trace: the phase's CartPole parameters arrive as data.
    trainer, _, state, rows, traces = measured_chunks
    assert trainer.num_chunks == 2 and traces == 1
    np.testing.assert_array_equal(state.phase, [2, 2])
    np.testing.assert_allclose(rows["env/length"], state.schedule.length, rtol=1e-6)
    np.testing.assert_allclose(rows["env/gravity"], state.schedule.gravity, rtol=1e-6)
    assert len(np.unique(rows["env/length"])) == 4  # differs across phases and seeds


def test_rows_hold_the_phase_metrics(measured_chunks):
    trainer, _, _, rows, _ = measured_chunks
    assert rows["episode_return"].shape == (2, 2)
    assert rows["update_episodes"].shape == (2, 2, 4)  # 1024 steps / 256 per update
    np.testing.assert_array_equal(rows["update_episodes"].sum(-1), rows["episodes"])
    np.testing.assert_allclose(rows["episode_return"],
                               rows["update_return_sum"].sum(-1) / rows["episodes"], rtol=1e-5)
    np.testing.assert_array_equal(rows["env_steps"][0], [1024, 2048])
    for name in ("epsilon_rank_init", "epsilon_rank_end"):
        assert np.all((rows[name] >= 0) & (rows[name] <= 1 + 1e-5))
    assert np.all(rows["top_eigenvalue_init"] > 0)
    assert rows["density_init"].shape == (2, 2, 64)
    assert int(rows["recycled_units"].sum()) > 0  # CBP recycled units of the networks
    assert {"weight_norm/actor", "weight_norm/critic", "dormant_fraction/critic/hidden_0",
            "episodes", "reward_per_step", "clip_fraction"} <= set(rows)
    for name in rows:  # every column is in the result schema, with its direction
        schema.metric(name)
    # a NaN return (no finished episode) is no divergence; a NaN loss or weight norm is
    assert set(trainer.divergence_keys) <= set(rows)
    assert "episode_return" not in trainer.divergence_keys
    assert {"value_loss", "weight_norm"} <= set(trainer.divergence_keys)


@pytest.mark.slow
def test_vmap_over_seeds_equals_separate_unmeasured_runs(measured_chunks):
    # Each seed alone, without the Hessian measurement and in one chunk of two phases, trains
    # exactly as inside the vmap: vmap is exact, chunking changes nothing, and the
    # measurement's rollouts leave the training untouched.
    _, keys, state, rows = measured_chunks[:4]
    single = jax.jit(ppo.train_fn(ppo.make_train(_tiny(method="cbp_l2", measure_hessian=False))))
    for i, key in enumerate(keys):
        state_i, rows_i = single(key, {})
        for name in ("episode_return", "value_loss", "weight_norm", "recycled_units",
                     "effective_rank/actor/hidden_0", "env/length"):
            np.testing.assert_allclose(rows[name][i], rows_i[name], rtol=2e-4, atol=1e-5,
                                       err_msg=name)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state_i.params),
                        strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)
        assert "epsilon_rank_init" not in rows_i


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_minibatches"):
        ppo.make_train(_tiny(ppo=dict(_tiny().ppo, num_minibatches=3)))
    with pytest.raises(ValueError, match="steps_per_phase"):
        ppo.make_train(_tiny(steps_per_phase=100))
    with pytest.raises(ValueError, match="phases_per_chunk"):
        ppo.make_train(_tiny(phases_per_chunk=3))
    with pytest.raises(ValueError, match="unknown scale"):
        ppo.default_config("continual_cartpole", "huge")
    with pytest.raises(ValueError, match="unknown environment"):
        ppo.default_config("hopper")
    trainer = ppo.make_train(_tiny())
    with pytest.raises(ValueError, match=r"cannot sweep \['momentum'\] with method 'bp'"):
        trainer.init(jax.random.key(0), {"momentum": jnp.float32(0.9)})
