"""Online Permuted MNIST throughput: the scan trainer against per-step loops, vmap against serial.

Measured in one run, on the paper's setting (batch 1, MLP 784-1000-1000-1000-10, SGD 1e-2):

- steps/s of ``supervised.make_train``'s compiled chunk (one task = one ``lax.scan`` of steps);
- (a) a Python loop calling the same jitted step (batch lookup, loss, gradient, SGD update);
- (b) a PyTorch per-step loop of the same network, as the reference PyTorch code trains it;
- 8 seeds ``jax.vmap``-ed in one compiled chunk against 8 runs one after another.

MNIST is used when it is on disk (``tasks.load_idx_dataset('mnist', download=False)``),
otherwise synthetic 784-pixel images with the same shapes (the output says which): the speed of
a step does not depend on the pixel values.

    .venv/bin/python benchmarks/supervised.py            # full: 2,000-step tasks
    .venv/bin/python benchmarks/supervised.py --quick    # 500-step tasks, fewer repeats
"""

from __future__ import annotations

import argparse
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spectral_plasticity.tasks import DataError, PermutedImages, load_idx_dataset
from spectral_plasticity.tasks.idx import ImageDataset
from spectral_plasticity.train import supervised

HIDDEN = (1000, 1000, 1000)
LEARNING_RATE = 1e-2


def _data() -> tuple[ImageDataset, str]:
    try:
        return load_idx_dataset("mnist", download=False), "MNIST"
    except DataError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (12_000, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 12_000).astype(np.uint8)
        return (ImageDataset(images[:10_000], labels[:10_000], images[10_000:],
                             labels[10_000:]), "synthetic 784-pixel images (MNIST not found)")


def _config(steps: int):
    c = supervised.default_config()
    c.method = "bp"
    c.stream.num_tasks, c.stream.train_size, c.stream.eval_size = 1, steps, 100
    c.model.hidden_sizes = HIDDEN
    c.optimizer.name, c.optimizer.learning_rate = "sgd", LEARNING_RATE
    c.batch_size, c.tasks_per_chunk, c.measure_hessian = 1, 1, False
    return c


def _best_time(fn, repeats: int) -> float:
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def scan_and_vmap(stream: PermutedImages, steps: int, repeats: int, seeds: int
                  ) -> tuple[float, float, float]:
    """steps/s of one compiled task chunk; of ``seeds`` vmapped runs; of them one by one."""
    trainer = supervised.make_train(_config(steps))
    init, run_chunk = jax.jit(trainer.init), jax.jit(trainer.run_chunk)
    state = init(jax.random.key(0), {})
    jax.block_until_ready(run_chunk(state, {}))
    one = _best_time(lambda: jax.block_until_ready(run_chunk(state, {})), repeats)

    keys = jax.vmap(jax.random.key)(jnp.arange(seeds, dtype=jnp.uint32))
    states = jax.jit(jax.vmap(trainer.init))(keys, {})
    run_many = jax.jit(jax.vmap(trainer.run_chunk))
    jax.block_until_ready(run_many(states, {}))
    vmapped = _best_time(lambda: jax.block_until_ready(run_many(states, {})), repeats)
    singles = [init(k, {}) for k in keys]
    serial = _best_time(lambda: [jax.block_until_ready(run_chunk(s, {})) for s in singles],
                        repeats)
    return steps / one, seeds * steps / vmapped, seeds * steps / serial


def python_loop(stream: PermutedImages, steps: int, repeats: int) -> float:
    """steps/s of a Python loop over the jitted step the trainer scans (same work per step)."""
    config = _config(steps)
    model = supervised._model(config, stream, False)
    tx = optax.sgd(LEARNING_RATE)
    params = model.init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
    opt_state = tx.init(params)
    task = stream.begin_task(jax.random.key(1), jnp.int32(0))

    @jax.jit
    def step(params, opt_state, i):
        x, y = stream.train_batch(task, i, 1)

        def loss_fn(p):
            return jnp.mean(supervised.per_example_loss("cross_entropy",
                                                        model.apply({"params": p}, x)[0], y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def loop():
        p, s = params, opt_state
        for i in range(steps):
            p, s, _ = step(p, s, i)
        jax.block_until_ready(p)

    jax.block_until_ready(step(params, opt_state, 0))
    return steps / _best_time(loop, repeats)


def torch_loop(data: ImageDataset, steps: int, repeats: int) -> float:
    """steps/s of the PyTorch reference loop: per example forward, backward, SGD step.

    The better of 1 and 2 intra-op threads (on a loaded 2-core machine 2 threads can be slower).
    """
    import torch

    rates = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        rates.append(_torch_rate(torch, data, steps, repeats))
    return max(rates)


def _torch_rate(torch, data: ImageDataset, steps: int, repeats: int) -> float:
    torch.manual_seed(0)
    sizes = (784, *HIDDEN)
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
    args = parser.parse_args()
    steps = args.steps or (500 if args.quick else 2000)
    repeats = 1 if args.quick else 3
    data, source = _data()
    stream = PermutedImages(data, name="permuted", num_tasks=1, train_size=steps, eval_size=100)
    supervised._stream = lambda config: stream  # the benchmark's data, whatever the config says
    print(f"online Permuted MNIST, batch 1, MLP 784-{'-'.join(map(str, HIDDEN))}-10, SGD "
          f"{LEARNING_RATE}; data: {source}; {steps} steps per task; best of {repeats}; "
          f"{jax.devices()[0].platform} ({jax.device_count()} device)")
    scan, vmapped, serial = scan_and_vmap(stream, steps, repeats, args.seeds)
    loop = python_loop(stream, steps, repeats)
    torch_rate = torch_loop(data, steps, repeats)
    print(f"scan trainer (1 seed)        {scan:9.0f} steps/s")
    print(f"python loop over jitted step {loop:9.0f} steps/s   scan / loop    = "
          f"{scan / loop:5.2f}x (target >= 5x)")
    print(f"pytorch per-step loop        {torch_rate:9.0f} steps/s   scan / torch   = "
          f"{scan / torch_rate:5.2f}x")
    print(f"{args.seeds} seeds vmapped             {vmapped:9.0f} steps/s   vmap / serial  = "
          f"{vmapped / serial:5.2f}x (target >= 3x)")
    print(f"{args.seeds} seeds one after another   {serial:9.0f} steps/s")


if __name__ == "__main__":
    main()
