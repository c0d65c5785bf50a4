"""Seconds per chunk of a paper-scale supervised run, seeds vmapped (for an accelerator).

Runs ``--chunks`` chunks of ``--tasks_per_chunk`` tasks of ``experiments/<exp>.py`` at the
``paper`` scale for each method, ``--seeds`` seeds in one vmapped program, and prints the time
of every chunk after the first (which includes compilation). The first task of each chunk is
measured (SLQ, and KFAC where the config enables it), as in a real run.

    python benchmarks/paper_scale.py --exp=permuted_fashion_mnist --methods=bp,l2_er
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from spectral_plasticity import experiment, runtime


def chunk_seconds(exp: str, method: str, *, seeds: int, chunks: int, tasks_per_chunk: int,
                  overrides: list[str]) -> list[float]:
    config = experiment.load_config(exp, "paper")
    for override in [f"stream.num_tasks={chunks * tasks_per_chunk}",
                     f"tasks_per_chunk={tasks_per_chunk}", *overrides]:
        experiment.apply_override(config, override)
    config.method = method
    trainer = experiment.make_trainer(config)
    keys = jax.vmap(jax.random.key)(jnp.arange(seeds, dtype=jnp.uint32))
    state = jax.jit(jax.vmap(trainer.init))(keys, {})
    run_chunk = jax.jit(jax.vmap(trainer.run_chunk, in_axes=(0, 0, None)))
    times = []
    for _ in range(chunks):
        start = time.perf_counter()
        state, rows = run_chunk(state, {}, trainer.data)
        jax.block_until_ready(rows)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exp", default="permuted_fashion_mnist")
    parser.add_argument("--methods", default="bp,l2_er")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--tasks_per_chunk", type=int, default=2)
    parser.add_argument("--override", action="append", default=[],
                        help="config override name=value (repeatable), e.g. stream.data_dir=DIR")
    args = parser.parse_args()
    runtime.configure_runtime()
    print(f"{args.exp} at paper scale, {args.seeds} seeds vmapped on {jax.devices()[0]}")
    for method in args.methods.split(","):
        times = chunk_seconds(args.exp, method, seeds=args.seeds, chunks=args.chunks,
                              tasks_per_chunk=args.tasks_per_chunk, overrides=args.override)
        print(f"{method}: seconds per chunk of {args.tasks_per_chunk} tasks (after compile): "
              f"{[round(t, 1) for t in times]}")


if __name__ == "__main__":
    main()
