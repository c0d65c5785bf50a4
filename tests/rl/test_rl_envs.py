"""Continual environments: dynamics reach the physics, change without recompiling, reset."""

import gymnax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.rl import envs


@pytest.fixture(scope="module")
def cartpole():
    return envs.make_env("continual_cartpole")


def test_schedule_is_log_uniform_in_range_and_keyed(cartpole):
    schedule = cartpole.sample_dynamics(jax.random.key(0), 2000)
    for name, (low, high) in envs.CARTPOLE_RANGES.items():
        values = np.asarray(getattr(schedule, name))
        assert values.min() >= low * (1 - 1e-6) and values.max() <= high * (1 + 1e-6)
        # log-uniform: log values uniform, so their mean is the midpoint of the log range
        np.testing.assert_allclose(np.log(values).mean(), np.log(low * high) / 2, atol=0.03)
    np.testing.assert_allclose(schedule.total_mass, schedule.masscart + schedule.masspole)
    np.testing.assert_allclose(schedule.polemass_length, schedule.masspole * schedule.length,
                               rtol=1e-6)
    again = cartpole.sample_dynamics(jax.random.key(0), 2000)
    np.testing.assert_array_equal(again.length, schedule.length)
    other = cartpole.sample_dynamics(jax.random.key(1), 2000)
    assert not np.allclose(other.length, schedule.length)


def test_cartpole_step_follows_the_phase_parameters(cartpole):
    # Our step under a phase's parameters equals gymnax's own step with those parameters.
    schedule = cartpole.sample_dynamics(jax.random.key(3), 2)
    env, _ = gymnax.make("CartPole-v1")
    state, _ = cartpole.reset(jax.random.key(4), envs.phase_dynamics(schedule, 0))
    results = []
    for phase in (0, 1):
        params = envs.phase_dynamics(schedule, phase)
        ours = cartpole.step(jax.random.key(5), state, jnp.int32(1), params)
        theirs = env.step_env(jax.random.key(5), state.inner, 1, params)[0]
        np.testing.assert_allclose(ours.obs, theirs, rtol=1e-6)
        results.append(np.asarray(ours.obs))
    assert not np.allclose(results[0], results[1])  # the phases' dynamics differ


def test_changing_gymnax_params_does_not_recompile(cartpole):
    traces = []

    @jax.jit
    def step(state, params):
        traces.append(1)
        return cartpole.step(jax.random.key(0), state, jnp.int32(0), params).obs

    schedule = cartpole.sample_dynamics(jax.random.key(0), 3)
    state, _ = cartpole.reset(jax.random.key(1), envs.phase_dynamics(schedule, 0))
    outs = [step(state, envs.phase_dynamics(schedule, p)) for p in range(3)]
    assert len(traces) == 1
    assert not np.allclose(outs[0], outs[1])


def test_time_limit_truncates_and_auto_reset_restarts():
    env = envs.make_env("continual_cartpole", episode_length=3)
    params = envs.phase_dynamics(env.sample_dynamics(jax.random.key(0), 1), 0)
    state, _ = env.reset(jax.random.key(1), params)
    reset_state, reset_obs = env.reset(jax.random.key(2), params)
    flags = []
    for t in range(3):
        step = env.step(jax.random.key(t), state, jnp.int32(t % 2), params)
        flags.append((bool(step.terminated), bool(step.truncated)))
        state, obs = envs.auto_reset(step, reset_state, reset_obs)
    assert flags == [(False, False), (False, False), (False, True)]
    np.testing.assert_array_equal(obs, reset_obs)
    assert int(state.time) == 0


def test_pendulum_clips_and_scales_actions():
    env = envs.make_env("continual_pendulum")
    assert (env.observation_size, env.action_size, env.discrete) == (3, 1, False)
    params = envs.phase_dynamics(env.sample_dynamics(jax.random.key(0), 1), 0)
    state, _ = env.reset(jax.random.key(1), params)
    big = env.step(jax.random.key(2), state, jnp.array([5.0]), params)
    assert float(big.state.inner.last_u) == pytest.approx(2.0)  # clip to 1, scale to max torque


def test_bad_environment_arguments_raise():
    with pytest.raises(ValueError, match="unknown environment"):
        envs.make_env("hopper")
    with pytest.raises(ValueError, match="unknown cartpole parameters"):
        envs.make_env("continual_cartpole", ranges={"mass": (1.0, 2.0)})
    with pytest.raises(ValueError, match="0 < low <= high"):
        envs.make_env("continual_cartpole", ranges={"length": (0.0, 1.0)})
    with pytest.raises(ValueError, match="episode_length"):
        envs.make_env("continual_cartpole", episode_length=0)


@pytest.fixture(scope="module")
def ant():
    return envs.make_env("slippery_ant")


def test_ant_state_holds_no_empty_arrays(ant):
    # Checkpointers (orbax) refuse zero-size arrays; the ant's physics state has some (no
    # actuator activations, no mocap bodies), which the environment keeps out of its state.
    state, obs = jax.eval_shape(ant.reset, jax.random.key(0), jnp.float32(1.0))
    assert obs.shape == (27,)
    sizes = [leaf.size for leaf in jax.tree.leaves(state)]
    assert min(sizes) > 0 and len(sizes) > 20


def test_ant_friction_reaches_the_physics_without_recompiling(ant):
    """A pushed ant stops within 2 s at friction 2.0 and slides on at 0.02 (one mjx compile,
    about 8 s on 2 idle cores)."""
    assert (ant.observation_size, ant.action_size) == (27, 8)
    traces = []

    @jax.jit
    def slide(mu):
        traces.append(1)
        state, _ = ant.reset(jax.random.key(0), mu)
        data = state.inner.pipeline_state
        # drop the ant onto its feet at rest, then push the torso along x at 3 m/s
        state = state._replace(inner=state.inner.replace(
            pipeline_state=data.replace(qvel=jnp.zeros_like(data.qvel).at[0].set(3.0))))
        x0 = state.inner.pipeline_state.qpos[0]

        def body(s, _):
            step = ant.step(jax.random.key(0), s, jnp.zeros(8), mu)
            return step.state, step.state.inner.pipeline_state.qvel[0]

        state, vx = jax.lax.scan(body, state, None, length=40)
        return state.inner.pipeline_state.qpos[0] - x0, vx

    slippery, vx_low = slide(jnp.float32(0.02))
    grippy, vx_high = slide(jnp.float32(2.0))
    assert len(traces) == 1
    assert float(slippery) > 2 * float(grippy) > 0
    # in the second second the grippy ant stands still, the slippery one slides on
    assert float(jnp.abs(vx_high[20:]).mean()) < 0.1 < float(jnp.abs(vx_low[20:]).mean())
