"""Continual-PPO throughput against the raw environment, measured in one run.

Prints environment steps per second of

- the raw environment: ``num_envs`` environments ``jax.vmap``-ed under ``jit``, a
  ``lax.scan`` of ``num_steps`` steps with uniformly random actions (episodes auto-reset from
  states drawn once per scan, as the trainer does);
- the full PPO loop of ``rl.ppo.make_train`` (rollout with the actor, GAE, ``update_epochs`` x
  ``num_minibatches`` gradient steps of actor and critic, per-phase metrics; no Hessian), with
  the same ``num_envs`` and ``num_steps``;

and their ratio, the PPO overhead (target: at most 2x the environment's cost). Compilation is
excluded (each function runs once before it is timed).

    .venv/bin/python benchmarks/ppo.py                          # Slippery Ant, mjx, 256 envs
    .venv/bin/python benchmarks/ppo.py --env=continual_cartpole --updates=50
"""

from __future__ import annotations

import argparse
import time

import jax
import ml_collections

from spectral_plasticity.rl import envs, ppo


def _best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def raw_env_rate(env: envs.ContinualEnv, num_envs: int, num_steps: int, repeats: int) -> float:
    """Environment steps per second of the vmapped, jitted environment alone."""
    dynamics = envs.phase_dynamics(env.sample_dynamics(jax.random.key(0), 1), 0)
    reset = jax.vmap(env.reset, in_axes=(0, None))
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))

    @jax.jit
    def run(key):
        state, obs = reset(jax.random.split(key, num_envs), dynamics)
        reset_state, reset_obs = state, obs

        def body(state, k):
            action_key, env_key = jax.random.split(k)
            if env.discrete:
                actions = jax.random.randint(action_key, (num_envs,), 0, env.action_size)
            else:
                actions = jax.random.uniform(action_key, (num_envs, env.action_size),
                                             minval=-1.0, maxval=1.0)
            out = step(jax.random.split(env_key, num_envs), state, actions, dynamics)
            state, _ = jax.vmap(envs.auto_reset)(out, reset_state, reset_obs)
            return state, out.reward

        return jax.lax.scan(body, state, jax.random.split(key, num_steps))[1]

    run(jax.random.key(1))
    return num_envs * num_steps / _best_time(lambda: run(jax.random.key(2)), repeats)


def ppo_rate(env_name: str, num_envs: int, num_steps: int, updates: int, repeats: int
             ) -> tuple[float, ml_collections.ConfigDict]:
    """Environment steps per second of the full PPO loop (one phase of ``updates`` updates)."""
    config = ppo.default_config(env_name, "small")
    config.ppo.update(num_envs=num_envs, num_steps=num_steps)
    config.num_phases, config.phases_per_chunk = 1, 1
    config.steps_per_phase = updates * num_envs * num_steps
    config.measure_hessian = False
    trainer = ppo.make_train(config)
    state = jax.jit(trainer.init)(jax.random.key(0), {})
    run_chunk = jax.jit(trainer.run_chunk)
    jax.block_until_ready(run_chunk(state, {}))
    seconds = _best_time(lambda: run_chunk(state, {}), repeats)
    return config.steps_per_phase / seconds, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="slippery_ant", choices=envs.ENVIRONMENTS)
    parser.add_argument("--num-envs", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=32)
    parser.add_argument("--updates", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    env = envs.make_env(args.env)
    raw = raw_env_rate(env, args.num_envs, args.num_steps, args.repeats)
    full, config = ppo_rate(args.env, args.num_envs, args.num_steps, args.updates, args.repeats)
    p = config.ppo
    print(f"{args.env}: {args.num_envs} envs x {args.num_steps} steps per update, "
          f"{p.update_epochs} epochs x {p.num_minibatches} minibatches, hidden "
          f"{tuple(config.model.hidden_sizes)}, {jax.devices()[0].platform}")
    print(f"  raw vmapped env   : {raw:12,.0f} env steps/s")
    print(f"  full PPO loop     : {full:12,.0f} env steps/s")
    print(f"  PPO overhead      : {raw / full:12.2f}x the environment's cost (target <= 2x)")


if __name__ == "__main__":
    main()
