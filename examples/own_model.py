"""L2-ER and the curvature diagnostics on your own flax model, linen or nnx, unchanged.

Two models that return only logits, a linen CNN and an nnx MLP, train on a permuted
Fashion-MNIST stream with ``optax.chain(spectral_reg(...), optax.adamw(...))``. At each new
task's initialization the script prints the epsilon-rank of the Hessian spectrum (SLQ on the
task's held-out examples) and the KFAC factor ranks of every layer; after the task, the
held-out accuracy. What the model needed: nothing. What the training loop needed: the
``features_fn`` line (``layer_inputs``) and, for nnx, ``nnx_functional``.

Uses Fashion-MNIST where ``tasks.load_idx_dataset`` finds it (``--data_dir``, or
``apt-get install dataset-fashion-mnist``), otherwise generated images (``--generated`` forces
them)::

    python examples/own_model.py                         # 3 tasks, < 2 minutes on 2 CPU cores
    python examples/own_model.py --tasks 2 --train_size 64 --generated   # seconds
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from spectral_plasticity.curvature import (
    block_ranks,
    dataset_operator,
    epsilon_rank,
    epsilon_rank_bounds,
    kfac_factors,
    kronecker_spectrum,
    layer_inputs,
    nnx_functional,
    spectral_density,
)
from spectral_plasticity.methods import spectral_reg
from spectral_plasticity.tasks import DataError, ImageDataset, PermutedImages, load_idx_dataset

ApplyFn = Callable[[Any, jax.Array], jax.Array]


class CNN(nn.Module):
    """A small linen CNN on flattened 28x28 images, returning logits."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0], 28, 28, 1))
        x = nn.relu(nn.Conv(8, (5, 5), strides=2, name="conv_0")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(16, (3, 3), name="conv_1")(x)).reshape((x.shape[0], -1))
        return nn.Dense(10, name="head")(nn.relu(nn.Dense(64, name="hidden")(x)))


class MLP(nnx.Module):
    """A small nnx MLP, returning logits."""

    def __init__(self, width: int, rngs: nnx.Rngs) -> None:
        self.hidden_0 = nnx.Linear(784, width, rngs=rngs)
        self.hidden_1 = nnx.Linear(width, width, rngs=rngs)
        self.head = nnx.Linear(width, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.hidden_1(nnx.relu(self.hidden_0(x)))))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def load_images(data_dir: str | None, generated: bool, seed: int = 0) -> ImageDataset:
    """Fashion-MNIST if found, else random images with labels drawn from 10 class templates."""
    if not generated:
        try:
            return load_idx_dataset("fashion_mnist", data_dir, download=False)
        except DataError as error:
            print(f"Fashion-MNIST not found ({str(error)[:60]}...): generated images")
    rng = np.random.default_rng(seed)
    templates = rng.uniform(0, 255, (10, 28, 28))

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, n)
        images = np.clip(templates[labels] + rng.normal(0, 60, (n, 28, 28)), 0, 255)
        return images.astype(np.uint8), labels.astype(np.uint8)

    (train_x, train_y), (test_x, test_y) = split(2000), split(500)
    return ImageDataset(train_x, train_y, test_x, test_y)


def make_diagnose(apply_fn: ApplyFn, eps: float) -> Callable[..., str]:
    """The Hessian's epsilon-rank (SLQ) and each layer's KFAC factor ranks, as one line."""

    @jax.jit
    def measure(params: Any, data: tuple[jax.Array, jax.Array], key: jax.Array) -> Any:
        hessian = dataset_operator(apply_fn, cross_entropy, params, data, kind="hessian",
                                   chunk_size=100)
        density = spectral_density(hessian, key=key, num_iters=40, num_probes=2,
                                   grid_size=2000)
        factors = kfac_factors(apply_fn, params, data, cross_entropy, chunk_size=100)
        ranks = {layer: block_ranks(kronecker_spectrum(f), eps) for layer, f in factors.items()}
        dims = {layer: (f.a.shape[0], f.g.shape[0]) for layer, f in factors.items()}
        interval = epsilon_rank_bounds(density, eps).interval()
        return epsilon_rank(density, eps), interval, ranks, dims

    def diagnose(params: Any, data: tuple[jax.Array, jax.Array], key: jax.Array) -> str:
        eps_rank, (low, high), ranks, dims = measure(params, data, key)
        line = f"eps-rank {float(eps_rank):.3f} [{float(low):.3f}, {float(high):.3f}]"
        for layer, r in ranks.items():
            line += (f" | {layer} rank A {int(r.rank_a)}/{int(dims[layer][0])}"
                     f" G {int(r.rank_g)}/{int(dims[layer][1])}")
        return line

    return diagnose


def make_train_task(apply_fn: ApplyFn, tx: optax.GradientTransformationExtraArgs,
                    stream: PermutedImages, batch_size: int) -> Callable[..., Any]:
    """A jitted pass over one task, online in minibatches of ``batch_size``."""
    steps = stream.train_size // batch_size

    @jax.jit
    def train_task(params: Any, opt_state: Any, task_state: Any, arrays: Any) -> tuple[Any, Any]:
        data = stream.with_arrays(arrays)  # the images as an argument, not a constant

        def step(carry: tuple[Any, Any], index: jax.Array) -> tuple[tuple[Any, Any], None]:
            params, opt_state = carry
            x, y = data.train_batch(task_state, index, batch_size)
            grads = jax.grad(lambda p: jnp.mean(cross_entropy(apply_fn(p, x), y)))(params)
            updates, opt_state = tx.update(grads, opt_state, params,
                                           features_fn=lambda p: layer_inputs(apply_fn, p, x))
            return (optax.apply_updates(params, updates), opt_state), None

        return jax.lax.scan(step, (params, opt_state), jnp.arange(steps))[0]

    return train_task


def run(name: str, apply_fn: ApplyFn, params: Any, stream: PermutedImages,
        args: argparse.Namespace) -> Any:
    """Trains on every task of ``stream``, printing the diagnostics at each task's start."""
    tx = optax.chain(spectral_reg(l2=args.l2, erank=args.erank),
                     optax.adamw(args.learning_rate, weight_decay=0.0))
    opt_state = tx.init(params)
    train_task = make_train_task(apply_fn, tx, stream, args.batch_size)
    diagnose = make_diagnose(apply_fn, args.eps)
    accuracy = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y))
    key = jax.random.key(args.seed)
    for task in range(stream.num_tasks):
        task_state = stream.begin_task(key, jnp.asarray(task))
        data = stream.eval_data(task_state)
        probe = jax.random.fold_in(key, task)
        print(f"{name} task {task} init: {diagnose(params, data, probe)}")
        params, opt_state = train_task(params, opt_state, task_state, stream.arrays())
        print(f"{name} task {task} end: held-out accuracy {float(accuracy(params, *data)):.3f}")
    return params


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--train_size", type=int, default=1000)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--erank", type=float, default=1e-2)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--generated", action="store_true", help="skip Fashion-MNIST")
    args = parser.parse_args(argv)
    stream = PermutedImages(load_images(args.data_dir, args.generated), name="permuted_fmnist",
                            num_tasks=args.tasks, train_size=args.train_size,
                            eval_size=args.eval_size)
    stream.check_batch_size(args.batch_size)

    cnn = CNN()
    cnn_params = cnn.init(jax.random.key(args.seed), jnp.zeros((1, 784)))["params"]
    run("linen CNN", lambda p, x: cnn.apply({"params": p}, x), cnn_params, stream, args)

    mlp = MLP(args.width, nnx.Rngs(args.seed))
    apply_fn, params = nnx_functional(mlp)
    params = run("nnx MLP", apply_fn, params, stream, args)
    state = nnx.state(mlp, nnx.Param)  # write the trained parameters back into the module
    nnx.replace_by_pure_dict(state, params)
    nnx.update(mlp, state)


if __name__ == "__main__":
    main()
