"""Online Permuted MNIST throughput: the scan trainer against per-step loops, vmap against serial.

Measured in one run, on the paper's setting (batch 1, MLP 784-1000-1000-1000-10, SGD 1e-2):

- steps/s of ``supervised.make_train``'s compiled chunk (one task = one ``lax.scan`` of steps);
- (a) a Python loop calling the same jitted step (batch lookup, loss, gradient, SGD update);
- (b) a PyTorch per-step loop of the same network, as the reference PyTorch code trains it;
- 8 seeds ``jax.vmap``-ed in one compiled chunk against 8 runs one after another.

MNIST is used when it is on disk (``tasks.load_idx_dataset('mnist', download=False)``),
otherwise synthetic 784-pixel images with the same shapes (the output says which): the speed of
a step does not depend on the pixel values.

It also prints the ceilings that memory bandwidth puts on both ratios. At batch 1 a step is a
chain of matrix-vector products: it reads every weight three times (the forward and the
backward matrix-vector products, then the update) and writes it once, 4 x 4 bytes per
parameter, with almost no arithmetic per byte (only a hand-written kernel that fused the
backward product into the update could read it twice; XLA runs them as two operations). The
bandwidth of one such pass is measured on arrays of one seed's and of all seeds' parameter
count (a jitted scale-and-add), which gives the shortest possible step; a per-step loop can be
at most (shortest step + the loop's own overhead per step) / shortest step slower than the scan,
and vmapped seeds, which share no weights, at most (measured serial step) / (shortest step of
one seed when all seeds' weights stream together) faster than serial runs.

    .venv/bin/python benchmarks/supervised.py            # full: 2,000-step tasks
    .venv/bin/python benchmarks/supervised.py --quick    # 500-step tasks, fewer repeats
    .venv/bin/python benchmarks/supervised.py --quick --hidden=100,100,100  # the CPU studies'

It runs under the settings of our entry points (``runtime.configure_runtime``);
``--no-runtime`` measures JAX's defaults instead.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spectral_plasticity import runtime
from spectral_plasticity.tasks import PermutedImages
from spectral_plasticity.tasks.idx import ImageDataset, idx_dataset_or_random
from spectral_plasticity.train import supervised

LEARNING_RATE = 1e-2
BYTES_PER_PARAMETER_STEP = 4 * 4  # float32 weights read three times and written once per step


def _config(steps: int, hidden: tuple[int, ...]):
    c = supervised.default_config()
    c.method = "bp"
    c.stream.num_tasks, c.stream.train_size, c.stream.eval_size = 1, steps, 100
    c.model.hidden_sizes = hidden
    c.optimizer.name, c.optimizer.learning_rate = "sgd", LEARNING_RATE
    c.batch_size, c.tasks_per_chunk, c.measure_hessian = 1, 1, False
    return c


def _best_time(fn, repeats: int) -> float:
    """Shortest of ``repeats`` timings of ``fn()``, each up to its result being ready."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def scan_and_vmap(stream: PermutedImages, hidden: tuple[int, ...], steps: int, repeats: int,
                  seeds: int) -> tuple[float, float, float]:
    """steps/s of one compiled task chunk; of ``seeds`` vmapped runs; of them one by one."""
    trainer = supervised.make_train(_config(steps, hidden))
    init, run_chunk = jax.jit(trainer.init), jax.jit(trainer.run_chunk)
    state = init(jax.random.key(0), {})
    jax.block_until_ready(run_chunk(state, {}))
    one = _best_time(lambda: run_chunk(state, {}), repeats)

    keys = jax.vmap(jax.random.key)(jnp.arange(seeds, dtype=jnp.uint32))
    states = jax.jit(jax.vmap(trainer.init))(keys, {})
    run_many = jax.jit(jax.vmap(trainer.run_chunk))
    jax.block_until_ready(run_many(states, {}))
    vmapped = _best_time(lambda: run_many(states, {}), repeats)
    singles = [init(k, {}) for k in keys]
    serial = _best_time(lambda: [jax.block_until_ready(run_chunk(s, {})) for s in singles],
                        repeats)
    return steps / one, seeds * steps / vmapped, seeds * steps / serial


def python_loop(stream: PermutedImages, hidden: tuple[int, ...], steps: int, repeats: int
                ) -> float:
    """steps/s of a Python loop over the jitted step the trainer scans (same work per step)."""
    config = _config(steps, hidden)
    model = supervised._model(config, stream, False)
    tx = optax.sgd(LEARNING_RATE)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    opt_state = tx.init(params)
    task = stream.begin_task(jax.random.key(1), jnp.int32(0))

    # Donated, so that the loop updates the weights in place as the scan does (a fresh
    # output buffer per step would charge the loop for allocation, not for dispatch).
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, i):
        x, y = stream.train_batch(task, i, 1)

        def loss_fn(p):
            return jnp.mean(supervised.per_example_loss("cross_entropy",
                                                        model.apply({"params": p}, x)[0], y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def loop():
        p, s = jax.tree.map(jnp.copy, (params, opt_state))
        for i in range(steps):
            p, s, _ = step(p, s, i)
        jax.block_until_ready(p)

    loop()
    return steps / _best_time(loop, repeats)


def memory_bandwidth(num_floats: int, repeats: int) -> float:
    """Bytes/s of jitted passes ``w <- 0.999 w + 1e-3`` (one read, one write) over a float32
    array of ``num_floats``, the access pattern of an SGD update."""
    passes = 20
    # The trip count is an argument, so that XLA can neither unroll nor fuse the passes.
    run = jax.jit(lambda w, n: jax.lax.fori_loop(0, n, lambda _, w: 0.999 * w + 1e-3, w))
    w, n = jnp.zeros(num_floats, jnp.float32), jnp.int32(passes)
    jax.block_until_ready(run(w, n))
    return 2 * 4 * num_floats * passes / _best_time(lambda: run(w, n), repeats)


def torch_loop(data: ImageDataset, hidden: tuple[int, ...], steps: int, repeats: int
               ) -> float:
    """steps/s of the PyTorch reference loop: per example forward, backward, SGD step.

    The better of 1 and 2 intra-op threads (on a loaded 2-core machine 2 threads can be slower).
    """
    import torch

    rates = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates.append(_torch_rate(torch, data, hidden, steps, repeats))
    return max(rates)


def _torch_rate(torch, data: ImageDataset, hidden: tuple[int, ...], steps: int, repeats: int
                ) -> float:
    torch.manual_seed(0)
    sizes = (784, *hidden)
    layers: list[torch.nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(n_in, n_out), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers, torch.nn.Linear(sizes[-1], 10))
    opt = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)
    perm = torch.randperm(784)
    x_all = torch.from_numpy(data.train_images[:steps].reshape(steps, 784)).float()[:, perm]
    x_all = x_all / 255.0
    y_all = torch.from_numpy(data.train_labels[:steps].astype(np.int64))
    loss_fn = torch.nn.CrossEntropyLoss()

    def loop():
        for i in range(steps):
            opt.zero_grad()
            loss = loss_fn(net(x_all[i:i + 1]), y_all[i:i + 1])
            loss.backward()
            opt.step()

    loop()
    return steps / _best_time(loop, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500-step tasks, 1 repeat")
    parser.add_argument("--steps", type=int, default=None, help="steps (examples) per task")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--hidden", default="1000,1000,1000",
                        help="hidden widths of the MLP (the paper's: 1000,1000,1000)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the PyTorch loop (which needs the bench extra)")
    parser.add_argument("--no-runtime", action="store_true",
                        help="JAX's default settings instead of runtime.configure_runtime()'s")
    args = parser.parse_args()
    if not args.no_runtime:
        runtime.configure_runtime()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    steps = args.steps or (500 if args.quick else 2000)
    repeats = 1 if args.quick else 3
    data, source = idx_dataset_or_random("mnist")
    stream = PermutedImages(data, name="permuted", num_tasks=1, train_size=steps, eval_size=100)
    supervised._stream = lambda config: stream  # the benchmark's data, whatever the config says
    sizes = (784, *hidden, 10)
    num_params = sum(a * b + b for a, b in itertools.pairwise(sizes))
    print(f"online Permuted MNIST, batch 1, MLP {'-'.join(map(str, sizes))} ({num_params:,} "
          f"parameters), SGD {LEARNING_RATE}; data: {source}; {steps} steps per task; best of "
          f"{repeats}; {jax.devices()[0].platform} ({jax.device_count()} device); XLA_FLAGS "
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    scan, vmapped, serial = scan_and_vmap(stream, hidden, steps, repeats, args.seeds)
    loop = python_loop(stream, hidden, steps, repeats)
    torch_rate = np.nan if args.no_torch else torch_loop(data, hidden, steps, repeats)
    one_bw = memory_bandwidth(num_params, max(repeats, 3))
    all_bw = memory_bandwidth(args.seeds * num_params, max(repeats, 3))
    shortest = BYTES_PER_PARAMETER_STEP * num_params / one_bw
    shortest_vmapped = BYTES_PER_PARAMETER_STEP * num_params / all_bw
    loop_ceiling = (shortest + 1 / loop - 1 / scan) / shortest
    vmap_ceiling = (1 / serial) / shortest_vmapped
    print(f"scan trainer (1 seed)        {scan:9.0f} steps/s")
    print(f"python loop over jitted step {loop:9.0f} steps/s   scan / loop    = "
          f"{scan / loop:5.2f}x (target >= 5x; memory-bound ceiling {loop_ceiling:.2f}x)")
    print(f"pytorch per-step loop        {torch_rate:9.0f} steps/s   scan / torch   = "
          f"{scan / torch_rate:5.2f}x")
    print(f"{args.seeds} seeds vmapped             {vmapped:9.0f} steps/s   vmap / serial  = "
          f"{vmapped / serial:5.2f}x (target >= 3x; memory-bound ceiling {vmap_ceiling:.2f}x)")
    print(f"{args.seeds} seeds one after another   {serial:9.0f} steps/s")
    print(f"memory bandwidth of an update pass: {one_bw / 1e9:.1f} GB/s over one seed's "
          f"{4 * num_params / 1e6:.1f} MB of weights, {all_bw / 1e9:.1f} GB/s over {args.seeds} "
          f"seeds' {4 * args.seeds * num_params / 1e6:.0f} MB; a step moves at least "
          f"{BYTES_PER_PARAMETER_STEP} bytes per parameter: >= {shortest * 1e6:.0f} us alone, "
          f">= {shortest_vmapped * 1e6:.0f} us per seed vmapped (measured: "
          f"{1e6 / scan:.0f} us, {1e6 / vmapped:.0f} us)")


if __name__ == "__main__":
    main()
