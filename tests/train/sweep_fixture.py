"""A small continual regression trainer for the sweep-runner tests, and a script entry point.

Each task is a fresh random linear target; each row is one task of ``steps`` SGD steps on a
linear model. Its numbers depend on the seed, the learning rate and the task index only.
"""

import sys

import jax
import jax.numpy as jnp

from spectral_plasticity.train import ChunkedTrainer, run_sweep

DIM, STEPS = 8, 25


def make_trainer(num_chunks: int = 4, rows_per_chunk: int = 3) -> ChunkedTrainer:
    def init(key, hparams):
        del hparams
        key, sub = jax.random.split(key)
        return {"w": jax.random.normal(sub, (DIM,)) * 0.1, "key": key,
                "task": jnp.zeros((), jnp.int32)}

    def one_task(state, hparams):
        task_key = jax.random.fold_in(state["key"], state["task"])
        target = jax.random.normal(task_key, (DIM,))

        def sgd(w, step_key):
            x = jax.random.normal(step_key, (16, DIM))
            grad = jax.grad(lambda w: jnp.mean((x @ w - x @ target) ** 2))(w)
            return w - hparams["lr"] * grad, jnp.mean((x @ w - x @ target) ** 2)

        w, losses = jax.lax.scan(sgd, state["w"], jax.random.split(task_key, STEPS))
        new = {"w": w, "key": state["key"], "task": state["task"] + 1}
        return new, {"final_loss": losses[-1], "loss_curve": losses}

    def run_chunk(state, hparams):
        return jax.lax.scan(lambda s, _: one_task(s, hparams), state, None,
                            length=rows_per_chunk)

    return ChunkedTrainer(init=init, run_chunk=run_chunk, num_chunks=num_chunks,
                          rows_per_chunk=rows_per_chunk)


def main(run_dir: str, seeds: str, lrs: str, pause: float = 0.0) -> None:
    """``python sweep_fixture.py RUN_DIR 0,1,2 0.01,0.02 [PAUSE]``: a sweep, slowed down."""
    trainer = make_trainer(num_chunks=6)
    if pause:
        import time

        inner = trainer.run_chunk

        def slow_chunk(state, hparams):
            jax.debug.callback(lambda: time.sleep(pause))
            return inner(state, hparams)

        trainer = trainer._replace(run_chunk=slow_chunk)
    run_sweep(trainer, seeds=[int(s) for s in seeds.split(",")],
              hparams=[{"lr": float(v)} for v in lrs.split(",")], run_dir=run_dir,
              config={"lrs": lrs, "seeds": seeds})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 0.0)
