"""``python copy_insertion_fixture.py OUT.npz``: one chunk of the supervised trainer (2 seeds
vmapped, the Hessian measured) for BP and for L2-ER (with its ascent) under the process's
``XLA_FLAGS``; saves each one's final weights and rows, and how many weight matrices BP's
compiled chunk copies from the scan's carry in a step (``copies``)."""

import re
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.flatten_util import ravel_pytree

from spectral_plasticity.train import supervised

WIDTH = 64


def config(method: str):
    c = supervised.default_config()
    c.method, c.methods = method, (method,)
    c.stream = ml_collections.ConfigDict({
        "name": "slowly_changing_regression", "num_tasks": 1, "flip_after": 200,
        "flip_one": True, "eval_size": 64, "data_dir": ""})
    c.model.hidden_sizes = (WIDTH, WIDTH)
    c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.05
    c.batch_size, c.tasks_per_chunk = 1, 1
    c.method_settings.update(erank_every=50, erank_batch=50)
    c.hessian.update(examples=64, num_iters=8, grid_size=100)
    c.kfac.enabled = False
    return c


def compiled(method: str):
    """The chunk of ``method`` compiled for 2 vmapped seeds, and their initial states."""
    trainer = supervised.make_train(config(method))
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    states = jax.jit(jax.vmap(trainer.init))(keys, {})
    return jax.jit(jax.vmap(trainer.run_chunk)).lower(states, {}).compile(), states


def weight_copies(chunk) -> int:
    """How many ``(WIDTH, WIDTH)`` weight matrices a compiled chunk copies from a carry."""
    weight = rf"f32\[2,{WIDTH},{WIDTH}\]"
    return len(re.findall(rf"= {weight}\{{[0-9,]+\}} copy\(%get-tuple-element", chunk.as_text()))


def final(method: str, chunk, states) -> dict[str, np.ndarray]:
    """The rows and final flat weights of one chunk, keyed ``method/name``."""
    state, rows = chunk(states, {})
    flat = {f"{method}/{k}": np.asarray(v) for k, v in rows.items()}
    flat[f"{method}/params"] = np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(state.params))
    return flat


def main(out: str) -> None:
    bp, bp_states = compiled("bp")
    np.savez(out, copies=weight_copies(bp), **final("bp", bp, bp_states),
             **final("l2_er", *compiled("l2_er")))


if __name__ == "__main__":
    main(sys.argv[1])
