"""Permuted images (Goodfellow et al. 2013; the paper's Permuted MNIST) and label-noise tasks.

``PermutedImages``: every task applies a fresh random permutation to the pixels of every image
and presents ``train_size`` training images once, in a fresh random order (a fresh random
subset when fewer than all); its held-out examples are the first ``eval_size`` test images,
permuted the same way. Pixels are scaled to [0, 1]. Paper scale: 800 tasks of all 60,000 MNIST
training images, online (batch 1), 2,000 held-out images per task.

``RelabeledImages``: the images stay as they are (unpermuted) and every task draws new labels
for a subset of ``train_size`` training images fixed for the whole run (drawn from the run key),
presented ``epochs`` times per task (default once), every epoch in a fresh random order, so a
task's ``train_size`` (the examples it presents) is ``epochs`` x the subset's size:

- ``mode="random"``: every image of the subset gets a fresh uniformly random label at every
  task (random-label memorization; Zhang et al. 2017, Lyle et al. 2022). Held-out images carry
  no information about random labels, so the eval examples are the first ``eval_size`` images
  of the subset with the labels the task trains them on: eval accuracy is memorization.
- ``mode="shuffled"``: a fresh uniformly random permutation of the classes relabels every image
  (label-permuted tasks; Lyle et al. 2023); the eval examples are the first ``eval_size`` test
  images, relabeled the same way.

Inputs are flattened (``(pixels,)``, for MLPs) unless ``flatten=False`` (relabeled images only),
which keeps the stored image shape with a channel axis, e.g. ``(32, 32, 3)`` for CIFAR-100 or
``(28, 28, 1)`` for MNIST, for convolutional nets.

Random-label memorization as Kumar et al. (2023, "Maintaining plasticity via regenerative
regularization") and Lyle et al. (2023) run it: ``mode="random", train_size=512, epochs=40``
at batch 16, so a task is 1,280 steps over its fixed 512 images.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.tasks.idx import ImageDataset
from spectral_plasticity.tasks.stream import TaskStream


class ImageTask(NamedTuple):
    """One task of an image stream: what it shows, in which order, with which labels."""

    pixel_order: jax.Array  # (pixels,) a permutation (identity when unpermuted)
    example_order: jax.Array  # (train_size,) indices into the training images, as presented
    labels: jax.Array  # (train_size,) the label of each presented example
    eval_index: jax.Array  # (eval_size,) indices into the eval source images
    eval_labels: jax.Array  # (eval_size,)


class _ImageStream(TaskStream):
    permute_pixels = True
    label_mode = "true"

    def __init__(self, data: ImageDataset, *, name: str, num_tasks: int,
                 train_size: int | None = None, eval_size: int = 2000, num_classes: int = 10,
                 flatten: bool = True, epochs: int = 1) -> None:
        n_train, n_test = len(data.train_images), len(data.test_images)
        train_size = n_train if train_size is None else train_size
        if not 0 < train_size <= n_train:
            raise ValueError(f"train_size must lie in [1, {n_train}], got {train_size}")
        random = self.label_mode == "random"
        eval_pool = train_size if random else n_test
        if not 0 < eval_size <= eval_pool:
            source = "train_size images of a task" if random else "test images"
            raise ValueError(f"eval_size must lie in [1, {eval_pool}] (the {source}), got "
                             f"{eval_size}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        if epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs}")
        largest = int(max(data.train_labels.max(), data.test_labels.max()))
        if largest >= num_classes:
            raise ValueError(f"label {largest} is out of range for num_classes={num_classes}")
        self.name, self.num_tasks = name, num_tasks
        self.subset_size, self.epochs = train_size, epochs
        self.train_size, self.eval_size = epochs * train_size, eval_size
        self.num_outputs = num_classes
        pixels = int(np.prod(data.train_images.shape[1:]))
        image_shape = tuple(data.train_images.shape[1:])
        channels = () if len(image_shape) == 3 else (1,)
        self.input_shape = (pixels,) if flatten else (*image_shape, *channels)
        self._train_x = jnp.asarray(data.train_images.reshape(n_train, pixels))
        self._train_y = jnp.asarray(data.train_labels, jnp.int32)
        self._test_x = jnp.asarray(data.test_images[:eval_size].reshape(-1, pixels))
        self._test_y = jnp.asarray(data.test_labels[:eval_size], jnp.int32)

    def begin_task(self, key: jax.Array, task: jax.Array) -> ImageTask:
        run_key, tasks_key = jax.random.split(key)
        keys = jax.random.split(jax.random.fold_in(tasks_key, task), 4)
        pixels = self._train_x.shape[1]
        n_train, classes = self._train_x.shape[0], self.num_outputs
        pixel_order = (jax.random.permutation(keys[0], pixels) if self.permute_pixels
                       else jnp.arange(pixels))
        if self.label_mode == "true":  # a fresh subset per task
            order = jax.random.permutation(keys[1], n_train)[: self.train_size]
            return ImageTask(pixel_order, order, self._train_y[order],
                             jnp.arange(self.eval_size), self._test_y)
        # Relabeled: the run's subset (from the run key alone), each epoch in a fresh order.
        size = self.subset_size
        subset = jax.random.permutation(run_key, n_train)[:size]
        epoch_keys = keys[1][None] if self.epochs == 1 else jax.random.split(keys[1], self.epochs)
        slots = jax.vmap(lambda k: jax.random.permutation(k, size))(epoch_keys).reshape(-1)
        if self.label_mode == "random":
            slot_labels = jax.random.randint(keys[2], (size,), 0, classes)
            return ImageTask(pixel_order, subset[slots], slot_labels[slots],
                             subset[: self.eval_size], slot_labels[: self.eval_size])
        label_map = jax.random.permutation(keys[3], classes)
        return ImageTask(pixel_order, subset[slots], label_map[self._train_y[subset[slots]]],
                         jnp.arange(self.eval_size), label_map[self._test_y])

    def _inputs(self, images: jax.Array, task: ImageTask) -> jax.Array:
        if self.permute_pixels:
            images = images[:, task.pixel_order]
        x = images.astype(jnp.float32) / 255.0
        return x.reshape(x.shape[0], *self.input_shape)

    def train_batch(self, task_state: ImageTask, step: jax.Array, batch_size: int):
        positions = step * batch_size + jnp.arange(batch_size)
        index = task_state.example_order[positions]
        return self._inputs(self._train_x[index], task_state), task_state.labels[positions]

    def eval_data(self, task_state: ImageTask):
        source = self._train_x if self.label_mode == "random" else self._test_x
        x = self._inputs(source[task_state.eval_index], task_state)
        return x, task_state.eval_labels


class PermutedImages(_ImageStream):
    """Permuted-pixel tasks over an image data set (see the module docstring)."""

    def __init__(self, data: ImageDataset, *, name: str, num_tasks: int,
                 train_size: int | None = None, eval_size: int = 2000,
                 num_classes: int = 10) -> None:
        super().__init__(data, name=name, num_tasks=num_tasks, train_size=train_size,
                         eval_size=eval_size, num_classes=num_classes)


class RelabeledImages(_ImageStream):
    """Random-label or shuffled-label tasks over an image data set (see the module docstring).

    ``train_size`` is the size of the run's fixed subset and ``epochs`` the passes over it per
    task; ``self.train_size`` is then the examples a task presents, ``epochs * train_size``.
    """

    permute_pixels = False

    def __init__(self, data: ImageDataset, *, mode: str = "shuffled", **kwargs) -> None:
        if mode not in ("random", "shuffled"):
            raise ValueError(f"mode must be 'random' or 'shuffled', got {mode!r}")
        self.label_mode = mode
        super().__init__(data, **kwargs)
