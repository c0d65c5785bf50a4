"""Class-incremental CIFAR-100 (Dohare et al. 2024; the paper's ResNet-18 benchmark).

Protocol (Dohare et al., ``lop/incremental_cifar/incremental_cifar_experiment.py``; the paper's
code, ``lop-jax/incremental_cifar/train_incremental_cifar.py``, follows it): a run draws a
uniformly random order of the 100 classes; increment ``t`` (of 20) trains on the training
images of the first ``5 (t + 1)`` classes of that order with a 100-way head whose softmax and
argmax are restricted to them (``output_mask``; labels stay the original class indices, so
output unit ``c`` is class ``c``) and is evaluated on the test images of those classes. The
network is never reset. Inputs are ``(x / 255 - mean) / std`` per channel with CIFAR-100's
statistics (Dohare et al.; ``normalize=False`` gives ``x / 255``, as lop-jax), and training
images are augmented as Dohare et al. do (``augment``; lop-jax does not): a horizontal flip
with probability 1/2, a 32x32 crop at a uniform offset of the image reflect-padded by 4, and a
counter-clockwise rotation by a uniform angle in [0, 15] degrees (nearest pixel, 0 outside the
image, after normalization: torchvision's ``rotate`` defaults; the reference's ``RandomRotator``
is assumed to wrap it). ``train_per_class`` = 500 uses every training image (lop-jax); Dohare
et al. hold the first 50 of each class out for validation, ``train_per_class=450`` keeps the
last 450 as they do.

Static shapes, a deliberate difference: the references run 200 epochs per increment over the
growing pool of seen-class images (5 x 500 images in the first increment, 100 x 500 in the
last). Here every increment presents the same ``train_size`` examples, drawn epoch after epoch
from the seen-class pool, each epoch in a fresh uniformly random order (``epoch_order``). The
default ``train_size`` is the references' total, 200 epochs of each increment's pool summed over
the 20 increments, spread evenly: 5,250,000 examples (52,500 steps of 100) per increment, so
early increments see more epochs (2,100 of their 2,500 images) and late ones fewer (105 of
50,000) than the references, at the same total cost. Dohare et al.'s per-increment step-size
schedule and their early stopping on the validation set are the trainer's, not the stream's.

The eval examples are ``eval_size`` test images of the seen classes: a uniformly random order of
that pool, cycled when the pool is smaller, so every seen test image appears ``eval_size /
pool`` times on average and the eval accuracy is unbiased; any prefix (the new-task Hessian's
examples) is a uniform sample of the seen classes' test images, the loss the increment trains.
The paper's code takes the Hessian on the 5 new classes' images only (lop-jax
``train_incremental_cifar.py`` 400-435): ``hessian_classes="new"`` makes ``hessian_data`` a
uniform sample (cycled when smaller) of the new classes' training or test images, never
augmented; ``"seen"`` (the default) takes the prefix of the training presentation or of the eval
examples.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.tasks.idx import ImageDataset
from spectral_plasticity.tasks.stream import TaskStream, epoch_order, valid_first_order

MEAN = (0.5071, 0.4865, 0.4409)
STD = (0.2673, 0.2564, 0.2762)
REFERENCE_EPOCHS = 200  # epochs per increment in both references
PAD = 4
MAX_ANGLE_DEGREES = 15.0


class IncrementalTask(NamedTuple):
    """Increment ``t`` of a run: the classes seen so far and the keys of its draws."""

    seen: jax.Array  # (num_classes,) bool, the first classes_per_task (t + 1) of the order
    new: jax.Array  # (num_classes,) bool, the last classes_per_task of them
    train_key: jax.Array
    eval_index: jax.Array  # (eval_size,) indices into the class-grouped test images


def group_by_class(images: np.ndarray, labels: np.ndarray, num_classes: int,
                   per_class: int | None) -> np.ndarray:
    """``(num_classes, per_class, ...)``: the last ``per_class`` images of each class ``0..``.

    Images keep their order in the data set. ``per_class=None`` takes all of them and requires
    every class to have the same number.
    """
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    if per_class is None:
        if len(set(counts.tolist())) != 1:
            raise ValueError(f"classes have different numbers of images: "
                             f"{sorted(set(counts.tolist()))}")
        per_class = int(counts[0])
    if counts.min() < per_class:
        raise ValueError(f"class {int(counts.argmin())} has {counts.min()} images, fewer than "
                         f"the {per_class} asked for")
    picks = [np.flatnonzero(labels == c)[-per_class:] for c in range(num_classes)]
    return images[np.stack(picks)]


def normalize(images: jax.Array) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel with CIFAR-100's statistics (Dohare et al.)."""
    return (images.astype(jnp.float32) / 255 - jnp.asarray(MEAN)) / jnp.asarray(STD)


def augment_image(image: jax.Array, flip: jax.Array, dy: jax.Array, dx: jax.Array,
                  angle: jax.Array) -> jax.Array:
    """Flip (if ``flip``), crop at ``(dy, dx)`` of the reflect-padded image, rotate by ``angle``.

    ``image`` is ``(H, W, C)``; ``dy, dx`` lie in ``[0, 2 * PAD]``; ``angle`` (radians) turns the
    picture counter-clockwise about its centre, each output pixel taking the nearest source
    pixel and 0 where that falls outside the image.
    """
    h, w, c = image.shape
    image = jnp.where(flip, image[:, ::-1], image)
    padded = jnp.pad(image, ((PAD, PAD), (PAD, PAD), (0, 0)), mode="reflect")
    image = jax.lax.dynamic_slice(padded, (dy, dx, 0), (h, w, c))
    cy, cx = (h - 1) / 2, (w - 1) / 2
    y, x = jnp.meshgrid(jnp.arange(h) - cy, jnp.arange(w) - cx, indexing="ij")
    sin, cos = jnp.sin(angle), jnp.cos(angle)
    rows = jnp.round(cy + x * sin + y * cos).astype(jnp.int32)
    cols = jnp.round(cx + x * cos - y * sin).astype(jnp.int32)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    rotated = image[jnp.clip(rows, 0, h - 1), jnp.clip(cols, 0, w - 1)]
    return jnp.where(inside[..., None], rotated, 0.0)


def random_augmentation(key: jax.Array, images: jax.Array) -> jax.Array:
    """Dohare et al.'s training augmentation (module docstring) of a batch ``(B, H, W, C)``."""
    n = images.shape[0]
    k_flip, k_dy, k_dx, k_angle = jax.random.split(key, 4)
    flips = jax.random.bernoulli(k_flip, 0.5, (n,))
    dys = jax.random.randint(k_dy, (n,), 0, 2 * PAD + 1)
    dxs = jax.random.randint(k_dx, (n,), 0, 2 * PAD + 1)
    angles = jax.random.uniform(k_angle, (n,), maxval=math.radians(MAX_ANGLE_DEGREES))
    return jax.vmap(augment_image)(images, flips, dys, dxs, angles)


class IncrementalCIFAR(TaskStream):
    """Class-incremental CIFAR-100 (see the module docstring)."""

    def __init__(self, data: ImageDataset, *, num_tasks: int | None = None,
                 classes_per_task: int = 5, num_classes: int | None = None,
                 train_per_class: int = 500, train_size: int | None = None,
                 eval_size: int = 2000, augment: bool = True, normalize: bool = True,
                 hessian_classes: str = "seen") -> None:
        """Args:
          data: CIFAR-100 (``cifar.load_cifar100``) or any ``(N, 32, 32, 3)`` uint8 images.
          num_tasks: increments (default: all, ``num_classes // classes_per_task`` = 20).
          classes_per_task: classes added per increment (5).
          num_classes: use classes ``0..num_classes-1`` only, the head's width (default 100).
          train_per_class: training images per class, the last ones of each class (500: all).
          train_size: examples presented per increment (default: the references' total spread
            evenly, ``100 * classes_per_task * train_per_class * (num_tasks + 1)``).
          eval_size: test images of the seen classes per increment (2,000).
          augment: Dohare et al.'s flips, crops and rotations of training images.
          normalize: standardize with CIFAR-100's channel statistics (else ``x / 255``).
          hessian_classes: the examples of ``hessian_data``: ``"seen"`` or ``"new"`` (module
            docstring).
        """
        if hessian_classes not in ("seen", "new"):
            raise ValueError(f"hessian_classes must be 'seen' or 'new', got {hessian_classes!r}")
        self.hessian_classes = hessian_classes
        labels = np.concatenate([data.train_labels, data.test_labels])
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        if data.train_images.shape[1:] != (32, 32, 3):
            raise ValueError(f"CIFAR images are (32, 32, 3), got {data.train_images.shape[1:]}")
        if not 0 < classes_per_task <= num_classes or num_classes % classes_per_task:
            raise ValueError(f"classes_per_task={classes_per_task} must divide the "
                             f"{num_classes} classes")
        max_tasks = num_classes // classes_per_task
        num_tasks = max_tasks if num_tasks is None else num_tasks
        if not 0 < num_tasks <= max_tasks:
            raise ValueError(f"num_tasks must lie in [1, {max_tasks}] ({num_classes} classes, "
                             f"{classes_per_task} per increment), got {num_tasks}")
        if train_per_class < 1:
            raise ValueError(f"train_per_class must be positive, got {train_per_class}")
        train = group_by_class(data.train_images, data.train_labels, num_classes, train_per_class)
        test = group_by_class(data.test_images, data.test_labels, num_classes, None)
        if train_size is None:
            train_size = REFERENCE_EPOCHS * classes_per_task * train_per_class * (num_tasks + 1)
            train_size //= 2
        if train_size < 1 or eval_size < 1:
            raise ValueError(f"train_size and eval_size must be positive, got {train_size} and "
                             f"{eval_size}")
        self.name, self.num_tasks, self.num_outputs = "incremental_cifar100", num_tasks, num_classes
        self.input_shape = (32, 32, 3)
        self.train_size, self.eval_size = train_size, eval_size
        self.classes_per_task, self.augment, self.normalize = classes_per_task, augment, normalize
        self.train_per_class, self.test_per_class = train_per_class, test.shape[1]
        self._train_x = jnp.asarray(train.reshape(-1, *self.input_shape))
        self._test_x = jnp.asarray(test.reshape(-1, *self.input_shape))

    def class_order(self, key: jax.Array) -> jax.Array:
        """The run's order of the classes: increment ``t`` adds ``order[k t : k (t + 1)]``."""
        return jax.random.permutation(jax.random.split(key, 3)[0], self.num_outputs)

    def begin_task(self, key: jax.Array, task: jax.Array) -> IncrementalTask:
        _, train_key, eval_key = jax.random.split(key, 3)
        rank = jnp.argsort(self.class_order(key))  # rank[c]: position of class c in the order
        seen = rank < self.classes_per_task * (task + 1)
        new = seen & (rank >= self.classes_per_task * task)
        test_valid = seen[jnp.arange(self._test_x.shape[0]) // self.test_per_class]
        order = valid_first_order(jax.random.fold_in(eval_key, task), test_valid)
        pool = jnp.sum(test_valid)
        return IncrementalTask(seen, new, jax.random.fold_in(train_key, task),
                               order[jnp.arange(self.eval_size) % pool])

    def _inputs(self, images: jax.Array) -> jax.Array:
        return normalize(images) if self.normalize else images.astype(jnp.float32) / 255

    def train_batch(self, task_state: IncrementalTask, step: jax.Array, batch_size: int):
        positions = step * batch_size + jnp.arange(batch_size)
        valid = task_state.seen[jnp.arange(self._train_x.shape[0]) // self.train_per_class]
        index = epoch_order(jax.random.fold_in(task_state.train_key, 0), positions, valid)
        x = self._inputs(self._train_x[index])
        if self.augment:
            x = random_augmentation(
                jax.random.fold_in(jax.random.fold_in(task_state.train_key, 1), step), x)
        return x, index // self.train_per_class

    def eval_data(self, task_state: IncrementalTask):
        x = self._inputs(self._test_x[task_state.eval_index])
        return x, task_state.eval_index // self.test_per_class

    def hessian_data(self, task_state: IncrementalTask, split: str, size: int
                     ) -> tuple[jax.Array, jax.Array]:
        """As ``TaskStream.hessian_data``; with ``hessian_classes="new"`` a uniform sample of the
        increment's new classes' (un-augmented) training or test images."""
        if self.hessian_classes == "seen":
            return super().hessian_data(task_state, split, size)
        images, per_class = ((self._train_x, self.train_per_class) if split == "train"
                             else (self._test_x, self.test_per_class))
        valid = task_state.new[jnp.arange(images.shape[0]) // per_class]
        order = valid_first_order(jax.random.fold_in(task_state.train_key, 2), valid)
        index = order[jnp.arange(size) % jnp.sum(valid)]
        return self._inputs(images[index]), index // per_class

    def output_mask(self, task_state: IncrementalTask) -> jax.Array:
        return task_state.seen

    def check_batch_size(self, batch_size: int) -> int:
        """As ``TaskStream.check_batch_size``; also at most the first increment's pool."""
        steps = super().check_batch_size(batch_size)
        first_pool = self.classes_per_task * self.train_per_class
        if batch_size > first_pool:
            raise ValueError(f"batch_size {batch_size} exceeds the {first_pool} training images "
                             f"of the first increment of {self.name}")
        return steps
