"""The epsilon-rank measurement: its interval at the CPU-scale settings, its cost, its figure.

    python benchmarks/epsilon_rank.py            # permuted Fashion-MNIST, CPU scale
    python benchmarks/epsilon_rank.py --figure docs/figures/measuring-epsilon-rank.png

Default: the ``small`` scale of ``experiments/permuted_fashion_mnist.py`` (MLP 784-100-100-100-10,
its held-out examples, its ``hessian`` settings). Trains ``--tasks`` tasks without measurement,
then, at the next task's initialization (the fresh network too), times in this one run
(median of repeats, compile excluded): today's one-probe SLQ with the smoothed epsilon-rank,
the new measurement (``num_probes`` vmapped probes + ``epsilon_rank_record``) at the same
Lanczos steps, and one training task; and prints the interval's half-width at several eps.

``--figure``: one run of a small MLP (196-16-16-10 on 2x2-pooled permuted Fashion-MNIST, or
Gaussian inputs if the data set is absent; SGD, batch 10) over ``--figure-tasks`` tasks; at each
new task's initialization the exact fraction ``|lambda| > eps`` (dense ``jax.hessian`` + float64
``eigh`` on 300 held-out images), the estimate with its interval and the smoothed measure.
It took 25 minutes on the shared 2-core machine at a load average of about 20.
"""

from __future__ import annotations

import argparse
import gzip
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature import (
    dataset_operator,
    epsilon_rank_bounds,
    epsilon_rank_record,
    smoothed_epsilon_rank,
    spectral_density,
)
from spectral_plasticity.models import MLP
from spectral_plasticity.train import supervised

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
EPS_LADDER = (0.01, 0.03, 0.1)


def paired_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Median wall time of each ``fn()`` (result blocked on), in seconds, compile excluded; the
    functions alternate within each repeat, so a change of machine load hits them alike."""
    for fn in fns:
        jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, record in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            record.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def cpu_scale(tasks: int, repeats: int) -> None:
    sys.path.insert(0, str(ROOT / "experiments"))
    import permuted_fashion_mnist

    config = permuted_fashion_mnist.get_config("small")
    config.measure_hessian = False
    config.stream.num_tasks = max(config.tasks_per_chunk, tasks)
    hess = config.hessian
    trainer = supervised.make_train(config)
    stream = supervised._stream(config)
    model = supervised._model(config, stream, layer_norm=False)
    data = stream.arrays()
    run_chunk = jax.jit(trainer.run_chunk)
    state = trainer.init(jax.random.key(0), {})

    def operator(state):
        bound = stream.with_arrays(data)
        task = bound.begin_task(jax.random.fold_in(state.key, 0), state.task)
        mask = bound.output_mask(task)
        x, y = bound.eval_data(task)
        loss = lambda out, t: supervised.per_example_loss(stream.loss, out, t, mask)
        apply = lambda p, inputs: model.apply({"params": p}, inputs)
        return dataset_operator(apply, loss, state.params, (x[:hess.examples], y[:hess.examples]),
                                chunk_size=hess.chunk_size)

    def slq(state, num_probes):
        op = operator(state)
        return spectral_density(op, key=jax.random.key(1), num_iters=min(hess.num_iters, op.dim),
                                num_probes=num_probes, grid_size=hess.grid_size)

    today = jax.jit(lambda s: smoothed_epsilon_rank(slq(s, 1), hess.eps)[0])
    new = jax.jit(lambda s: epsilon_rank_record(slq(s, hess.num_probes), hess.eps))

    @jax.jit
    def ladder(state):
        density = slq(state, hess.num_probes)
        eps = jnp.asarray(EPS_LADDER)
        bounds = jax.vmap(lambda e: epsilon_rank_bounds(density, e))(eps)
        interval = jax.vmap(lambda e: epsilon_rank_bounds(density, e).interval())(eps)
        return bounds, interval, jax.vmap(lambda e: smoothed_epsilon_rank(density, e)[0])(eps)

    print(f"permuted Fashion-MNIST, CPU scale: MLP {config.model.hidden_sizes}, "
          f"{hess.examples} held-out examples, {hess.num_iters} Lanczos steps, "
          f"{hess.num_probes} probes, eps {hess.eps}; median of {repeats}", flush=True)
    state, _ = jax.block_until_ready(run_chunk(state, {}, data))  # compile
    state = trainer.init(jax.random.key(0), {})
    chunks = -(-tasks // config.tasks_per_chunk)
    t_task = float("nan")
    for round_ in range(2):
        bounds, (lo, hi), smoothed = ladder(state)
        for i, eps in enumerate(EPS_LADDER):
            print(f"  task {int(state.task):3d}, eps {eps:<5}: estimate "
                  f"{float(bounds.estimate[i]):.3f}, interval [{float(lo[i]):.3f}, "
                  f"{float(hi[i]):.3f}] half-width {float(hi[i] - lo[i]) / 2:.3f} "
                  f"(bounds [{float(bounds.lower[i]):.3f}, {float(bounds.upper[i]):.3f}], se "
                  f"{float(bounds.standard_error[i]):.4f}; smoothed {float(smoothed[i]):.3f})",
                  flush=True)
        density = jax.jit(lambda s: slq(s, hess.num_probes))(state)
        record = jax.jit(lambda d: epsilon_rank_record(d, hess.eps))
        t_today, t_new, t_bounds = paired_times(
            [lambda s=state: today(s), lambda s=state: new(s), lambda d=density, r=record: r(d)],
            repeats)
        print(f"  cost: today's SLQ (1 probe, smoothed rank) {t_today:.2f} s, new "
              f"({hess.num_probes} probes + bounds) {t_new:.2f} s -> new / today = "
              f"{t_new / t_today:.2f} (target <= 2); of which the bounds {t_bounds:.3f} s; "
              f"one training task {t_task:.2f} s -> measurement / task = {t_new / t_task:.2f}",
              flush=True)
        if round_ == 0:
            start = time.perf_counter()
            for _ in range(chunks):
                state, _ = jax.block_until_ready(run_chunk(state, {}, data))
            t_task = (time.perf_counter() - start) / (chunks * config.tasks_per_chunk)


def _fashion(num_train: int, num_eval: int) -> tuple[np.ndarray, ...]:
    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION / name) as f:
            return np.frombuffer(f.read(), np.uint8, offset=offset)

    def pooled(images: np.ndarray) -> np.ndarray:
        return images.reshape(-1, 14, 2, 14, 2).mean((2, 4)).reshape(-1, 196) / 255.0

    x = pooled(read("train-images-idx3-ubyte.gz", 16).reshape(-1, 784)[:num_train])
    y = read("train-labels-idx1-ubyte.gz", 8)[:num_train]
    xe = pooled(read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)[:num_eval])
    ye = read("t10k-labels-idx1-ubyte.gz", 8)[:num_eval]
    return x.astype(np.float32), y.astype(np.int32), xe.astype(np.float32), ye.astype(np.int32)


def figure_run(tasks: int, num_iters: int, num_probes: int, eps_values: tuple[float, ...]
               ) -> dict[str, np.ndarray]:
    """Per task at its initialization: exact fraction, estimate, interval, smoothed, sigma."""
    key = jax.random.key(0)
    if (FASHION / "train-images-idx3-ubyte.gz").exists():
        x, y, xe, ye = _fashion(2000, 300)
    else:
        kx, ky, kxe, kye = jax.random.split(key, 4)
        x, xe = np.asarray(jax.random.normal(kx, (2000, 196))), np.asarray(
            jax.random.normal(kxe, (300, 196)))
        y, ye = (np.asarray(jax.random.randint(k, (n,), 0, 10)) for k, n in ((ky, 2000),
                                                                             (kye, 300)))
    x, y, xe, ye = (jnp.asarray(a) for a in (x, y, xe, ye))
    model = MLP(hidden_sizes=(16, 16), num_outputs=10)
    params = model.init(key, x[:1])["params"]
    flat, unravel = ravel_pytree(params)
    tx = optax.sgd(0.05)

    def loss(p, inputs, labels):
        logits = model.apply({"params": p}, inputs)[0]
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    @jax.jit
    def train_task(p, perm):
        xs, ys = x[:, perm].reshape(-1, 10, 196), y.reshape(-1, 10)

        def step(carry, batch):
            p, s = carry
            updates, s = tx.update(jax.grad(loss)(p, *batch), s)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, tx.init(p)), (xs, ys))[0][0]

    @jax.jit
    def measure(p, perm, k):
        held = lambda q: loss(q, xe[:, perm], ye)
        hessian = jax.hessian(lambda f: held(unravel(f)))(ravel_pytree(p)[0])
        density = spectral_density(held, p, key=k, num_iters=num_iters, num_probes=num_probes,
                                   grid_size=2000)
        records = jax.vmap(lambda e: epsilon_rank_record(density, e))(jnp.asarray(eps_values))
        return hessian, records

    out: dict[str, list] = {}
    for task in range(tasks):
        perm = jax.random.permutation(jax.random.fold_in(key, task), 196)
        hessian, records = measure(params, perm, jax.random.fold_in(key, 1000 + task))
        eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
        exact = [np.mean(np.abs(eigenvalues) > e) for e in eps_values]
        for name, value in (("exact", exact), ("top", [eigenvalues.max()]),
                            *records.items()):
            out.setdefault(name, []).append(np.asarray(value))
        print(f"  task {task}: top {eigenvalues.max():.2f}, sigma "
              f"{float(records['epsilon_rank_smoothing_sigma'][0]):.4f}; " + ", ".join(
                  f"eps {e}: exact {exact[i]:.3f} est {float(records['epsilon_rank'][i]):.3f} "
                  f"[{float(records['epsilon_rank_lo'][i]):.3f}, "
                  f"{float(records['epsilon_rank_hi'][i]):.3f}] smoothed "
                  f"{float(records['epsilon_rank_smoothed'][i]):.3f}"
                  for i, e in enumerate(eps_values)), flush=True)
        params = train_task(params, perm)
    print(f"  ({flat.size:,} parameters, {num_iters} Lanczos steps, {num_probes} probes)")
    return {k: np.stack(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10, help="tasks trained before measuring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--figure", type=Path, default=None, help="write the docs figure here")
    parser.add_argument("--figure-tasks", type=int, default=10)
    parser.add_argument("--num-iters", type=int, default=100)
    parser.add_argument("--num-probes", type=int, default=1, help="probes of the figure's run")
    args = parser.parse_args()
    if args.figure is None:
        cpu_scale(args.tasks, args.repeats)
        return
    from spectral_plasticity.plots import epsilon_rank_figure

    eps_values = (0.01, 0.1)
    results = figure_run(args.figure_tasks, args.num_iters, args.num_probes, eps_values)
    epsilon_rank_figure(results, eps_values, args.figure)
    print(f"wrote {args.figure}")


if __name__ == "__main__":
    main()
