"""Seconds per task of every plasticity method, relative to backprop, measured in one run.

The protocol is the CPU study's Permuted Fashion-MNIST (``experiments/permuted_fashion_mnist.py``
at the ``small`` scale: online batch 1, SGD, 2,000 steps per task, chunks of 5 tasks, every
method's default settings), one seed, with the Hessian measurement off (it costs every method
the same), at the study's MLP 3x100 and at the paper's 3x1000. Each method's chunk is compiled
once, then the methods are timed in turns, ``--repeats`` rounds, and the shortest time of each
counts, so that a change in machine load hits every method alike. Fashion-MNIST is used when
it is on disk, otherwise synthetic 784-pixel images (the speed does not depend on the pixels).

It also takes apart the effective-rank ascent (``er``, ``l2_er``: one step every
``erank_every`` updates on the features of the last ``erank_batch`` inputs), timing the step,
its two halves (the network's forward and backward pass over the batch, and the exact
decompositions of the effective-rank gradient) and the step with the gradient through
``jax.numpy.linalg.svd``'s autodiff instead of the closed form, each as a fraction of the
``erank_every`` backprop steps it rides on.

    python benchmarks/methods.py                      # every method, 3x100 and 3x1000
    python benchmarks/methods.py --quick              # bp, l2, er, l2_er; 500 steps per task
    python benchmarks/methods.py --widths=100 --methods=bp,l2_er --repeats=5
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity import experiment, metrics, runtime
from spectral_plasticity.methods import erank_ascent
from spectral_plasticity.methods.effective_rank import mean_effective_rank, select_layers
from spectral_plasticity.models import MLP
from spectral_plasticity.tasks import PermutedImages
from spectral_plasticity.tasks.idx import idx_dataset_or_random
from spectral_plasticity.train import method_registry, supervised

QUICK_METHODS = ("bp", "l2", "er", "l2_er")


def _config(method: str, width: int, steps: int):
    config = experiment.load_config("permuted_fashion_mnist", "small")
    config.method = method
    config.seeds, config.measure_hessian = 1, False
    config.stream.num_tasks, config.stream.train_size = config.tasks_per_chunk, steps
    config.model.hidden_sizes = (width,) * len(config.model.hidden_sizes)
    return config


def _elapsed(fn) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def task_seconds(methods: list[str], width: int, steps: int, repeats: int
                 ) -> dict[str, float]:
    """Shortest seconds per task of each method's compiled chunk over ``repeats`` rounds."""
    runs = {}
    for method in methods:
        trainer = supervised.make_train(_config(method, width, steps))
        state = jax.jit(trainer.init)(jax.random.key(0), {})
        run_chunk = jax.jit(trainer.run_chunk)
        compile_s = _elapsed(lambda r=run_chunk, s=state: r(s, {}))
        runs[method] = (run_chunk, state, trainer.rows_per_chunk)
        print(f"  compiled {method} (first chunk {compile_s:.1f} s)", flush=True)
    best = dict.fromkeys(methods, np.inf)
    for _ in range(repeats):
        for method, (run_chunk, state, tasks) in runs.items():
            best[method] = min(best[method], _elapsed(lambda r=run_chunk, s=state: r(s, {}))
                               / tasks)
    return best


def ascent_parts(width: int, repeats: int) -> dict[str, float]:
    """Seconds of one ER ascent step and of its two halves, on the features of ``erank_batch``
    inputs: the network's forward and backward pass (the step with a fixed linear objective
    of the features in place of the effective rank), and the effective-rank gradient of fixed
    features (the exact decompositions); and the step through ``jnp.linalg.svd``'s autodiff."""
    settings = method_registry.DEFAULTS
    config = _config("er", width, 2000)
    model = MLP(hidden_sizes=tuple(config.model.hidden_sizes), num_outputs=10)
    inputs = jax.random.uniform(jax.random.key(1), (settings["erank_batch"], 784))
    params = model.init(jax.random.key(0), inputs)["params"]
    features_fn = lambda p: model.apply({"params": p}, inputs)[1]
    features = features_fn(params)
    layers = select_layers(features, settings["erank_layers"])

    def ascent_on(objective, p):
        grads = jax.grad(lambda q: objective(features_fn(q)))(p)
        return jax.tree.map(lambda a, g: a + 1e-3 * g, p, grads)

    svd_erank = lambda f: jnp.mean(jnp.stack([metrics.effective_rank(f[n]) for n in layers]))
    linear = lambda c: lambda f: sum(jnp.vdot(f[n], c[n]) for n in layers)
    programs = {  # params are arguments, never compile-time constants
        "ascent": (jax.jit(lambda p: erank_ascent(p, features_fn, learning_rate=1e-3,
                                                  layers=layers)), (params,)),
        "network": (jax.jit(lambda p, c: ascent_on(linear(c), p)), (params, features)),
        "decompositions": (jax.jit(jax.grad(lambda f: mean_effective_rank(f, layers))),
                           (features,)),
        "ascent_svd_autodiff": (jax.jit(lambda p: ascent_on(svd_erank, p)), (params,)),
    }
    out = {}
    for name, (fn, args) in programs.items():
        jax.block_until_ready(fn(*args))
        out[name] = min(_elapsed(lambda f=fn, a=args: f(*a)) for _ in range(max(5, 5 * repeats)))
    return out


def report(width: int, steps: int, seconds: dict[str, float], parts: dict[str, float] | None
           ) -> None:
    bp = seconds["bp"]
    print(f"MLP 3x{width}, {steps} steps per task: seconds per task, and / bp")
    for method, value in seconds.items():
        print(f"  {method:14s} {value:8.3f} s   {value / bp:5.2f}x")
    if parts is None:
        return
    every = method_registry.DEFAULTS["erank_every"]
    per_updates = bp / steps * every
    share = lambda name: f"{parts[name] * 1e3:.2f} ms = {parts[name] / per_updates:.2f}"
    print(f"  ER ascent, per {every} bp steps ({per_updates * 1e3:.2f} ms): step "
          f"{share('ascent')}, of which the network's forward and backward pass "
          f"{share('network')} and the exact decompositions {share('decompositions')}; "
          f"the step through jnp.linalg.svd's autodiff {share('ascent_svd_autodiff')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"methods {','.join(QUICK_METHODS)}, 500 steps per task, 2 rounds")
    parser.add_argument("--methods", default=None, help="comma-separated (default: all)")
    parser.add_argument("--widths", default="100,1000", help="hidden widths of the 3-layer MLP")
    parser.add_argument("--steps", type=int, default=None, help="steps per task (default 2000)")
    parser.add_argument("--repeats", type=int, default=None, help="timing rounds (default 3)")
    args = parser.parse_args()
    runtime.configure_runtime()
    methods = (args.methods.split(",") if args.methods else
               list(QUICK_METHODS if args.quick else method_registry.METHODS))
    method_registry.check_methods(methods)
    methods = ["bp", *[m for m in methods if m != "bp"]]
    steps = args.steps or (500 if args.quick else 2000)
    repeats = args.repeats or (2 if args.quick else 3)
    data, source = idx_dataset_or_random("fashion_mnist")
    stream = lambda config: PermutedImages(data, name="permuted_fashion_mnist",
                                           num_tasks=config.stream.num_tasks,
                                           train_size=steps, eval_size=config.stream.eval_size)
    supervised._stream = stream  # the benchmark's data, whatever the config says
    print(f"Permuted Fashion-MNIST protocol of the CPU study ({source}), batch 1, one seed, "
          f"Hessian off; best of {repeats} rounds; {jax.devices()[0].platform}")
    for width in (int(w) for w in args.widths.split(",")):
        seconds = task_seconds(methods, width, steps, repeats)
        ascent = any(method_registry.get(m).erank_ascent for m in methods)
        report(width, steps, seconds, ascent_parts(width, repeats) if ascent else None)


if __name__ == "__main__":
    main()
