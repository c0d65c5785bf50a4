"""Permuted images (Goodfellow et al. 2013; the paper's Permuted MNIST) and label-noise tasks.

``PermutedImages``: every task applies a fresh random permutation to the pixels of every image
and presents ``train_size`` training images once, in a fresh random order; its held-out
examples are the first ``eval_size`` test images, permuted the same way. Pixels are scaled to
[0, 1]. Paper scale: 800 tasks of all 60,000 MNIST training images, online (batch 1), 2,000
held-out images per task.

``RelabeledImages``: every task keeps the images (unpermuted) and draws new labels: ``mode=
"random"`` gives every image a fresh uniformly random label (random-label memorization,
Lyle et al. 2022); ``mode="shuffled"`` permutes the classes (a fresh class-to-label map).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.tasks.idx import ImageDataset
from spectral_plasticity.tasks.stream import TaskStream


class ImageTask(NamedTuple):
    pixel_order: jax.Array  # (pixels,) a permutation (identity when unpermuted)
    example_order: jax.Array  # (train_size,) indices into the training images
    label_map: jax.Array  # (num_classes,) class -> label (identity unless shuffled)
    random_labels: jax.Array  # (train_size,) labels for "random" mode (else unused)
    eval_random_labels: jax.Array


class _ImageStream(TaskStream):
    permute_pixels = True
    label_mode = "true"

    def __init__(self, data: ImageDataset, *, name: str, num_tasks: int, train_size: int | None,
                 eval_size: int = 2000, num_classes: int = 10) -> None:
        n_train, n_test = len(data.train_images), len(data.test_images)
        train_size = n_train if train_size is None else train_size
        if not 0 < train_size <= n_train:
            raise ValueError(f"train_size must lie in [1, {n_train}], got {train_size}")
        if not 0 < eval_size <= n_test:
            raise ValueError(f"eval_size must lie in [1, {n_test}], got {eval_size}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        self.name, self.num_tasks = name, num_tasks
        self.train_size, self.eval_size = train_size, eval_size
        self.num_outputs = num_classes
        pixels = int(np.prod(data.train_images.shape[1:]))
        self.input_shape = (pixels,)
        self._train_x = jnp.asarray(data.train_images.reshape(n_train, pixels))
        self._train_y = jnp.asarray(data.train_labels, jnp.int32)
        self._eval_x = jnp.asarray(data.test_images[:eval_size].reshape(eval_size, pixels))
        self._eval_y = jnp.asarray(data.test_labels[:eval_size], jnp.int32)

    def begin_task(self, key: jax.Array, task: jax.Array) -> ImageTask:
        keys = jax.random.split(jax.random.fold_in(key, task), 5)
        pixels = self.input_shape[0]
        n_train = self._train_x.shape[0]
        return ImageTask(
            pixel_order=(jax.random.permutation(keys[0], pixels) if self.permute_pixels
                         else jnp.arange(pixels)),
            example_order=jax.random.permutation(keys[1], n_train)[: self.train_size],
            label_map=(jax.random.permutation(keys[2], self.num_outputs)
                       if self.label_mode == "shuffled" else jnp.arange(self.num_outputs)),
            random_labels=jax.random.randint(keys[3], (self.train_size,), 0, self.num_outputs),
            eval_random_labels=jax.random.randint(keys[4], (self.eval_size,), 0,
                                                  self.num_outputs),
        )

    def _inputs(self, images: jax.Array, task: ImageTask) -> jax.Array:
        return images[:, task.pixel_order].astype(jnp.float32) / 255.0

    def _labels(self, labels: jax.Array, random_labels: jax.Array, task: ImageTask) -> jax.Array:
        if self.label_mode == "random":
            return random_labels
        return task.label_map[labels]

    def train_batch(self, task_state: ImageTask, step: jax.Array, batch_size: int):
        positions = step * batch_size + jnp.arange(batch_size)
        index = task_state.example_order[positions]
        x = self._inputs(self._train_x[index], task_state)
        y = self._labels(self._train_y[index], task_state.random_labels[positions], task_state)
        return x, y

    def eval_data(self, task_state: ImageTask):
        x = self._inputs(self._eval_x, task_state)
        return x, self._labels(self._eval_y, task_state.eval_random_labels, task_state)


class PermutedImages(_ImageStream):
    """Permuted-pixel tasks over an image data set (see the module docstring)."""


class RelabeledImages(_ImageStream):
    """Random-label or shuffled-label tasks over an image data set."""

    permute_pixels = False

    def __init__(self, data: ImageDataset, *, mode: str = "shuffled", **kwargs) -> None:
        if mode not in ("random", "shuffled"):
            raise ValueError(f"mode must be 'random' or 'shuffled', got {mode!r}")
        self.label_mode = mode
        super().__init__(data, **kwargs)
