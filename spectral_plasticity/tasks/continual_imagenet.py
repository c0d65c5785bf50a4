"""Continual ImageNet (Dohare et al. 2024): a sequence of binary tasks over 32x32 ImageNet classes.

Data format (Dohare et al.'s ``lop/imagenet``; read by their ``single_expr.py`` ``load_imagenet``
and by the paper's code, lop-jax ``imagenet/train_imagenet.py``): one NumPy file per class,
``classes/<c>.npy`` for ``c = 0..999``, each ``(700, 3, 32, 32)`` (channels first), the class's
600 training images followed by its 100 test images. ``load_continual_imagenet`` reads them into
one ``(classes, 700, 32, 32, 3)`` array (channels last, flax's layout): 2.1 GB for all 1,000
classes stored as uint8 (four times that for float files), held on the device.

Protocol: a run draws a uniformly random order of the classes (the references read row
``run_idx`` of a pickled ``class_order``, which is not in their repository); task ``t`` is the
pair ``order[2t mod C], order[2t + 1 mod C]`` with labels 0 and 1 (the references concatenate
the order with itself, so 2,000 tasks use every class 4 times). It trains on the pair's 2 x 600
training images for ``epochs_per_task`` epochs (the paper's code: 20; Dohare et al.: 250), each
in a fresh random order, batch 100 in both, and is evaluated on the pair's 2 x 100 test images,
interleaved (first image of class 0, of class 1, second of class 0, ...) so that any prefix, the
new-task Hessian's examples, is balanced. ``reset_head``: Dohare et al. zero the output layer at
every task (the paper's code keeps it). Inputs are the stored values times ``pixel_scale``: the
references feed the stored values unscaled (``pixel_scale=1.0``); by default uint8 files are
scaled to [0, 1] and float files are used as stored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.tasks.idx import ENV_VAR, DataError
from spectral_plasticity.tasks.stream import TaskStream, epoch_order

TRAIN_PER_CLASS = 600
TEST_PER_CLASS = 100
FILE_SHAPE = (TRAIN_PER_CLASS + TEST_PER_CLASS, 3, 32, 32)
DRIVE_ID = "1i0ok3LT5_mYmFWaN7wlkpHsitUngGJ8z"
HOW_TO_GET = (f"download Dohare et al.'s per-class files from "
              f"https://drive.google.com/file/d/{DRIVE_ID} (linked from github.com/shibhansh/"
              f"loss-of-plasticity/blob/main/lop/imagenet/README.md; e.g. `pip install gdown && "
              f"gdown {DRIVE_ID}`), extract it so that classes/0.npy ... classes/999.npy lie in "
              f"${ENV_VAR}/continual_imagenet, or pass the directory holding classes/ as "
              "data_dir (config.stream.data_dir)")


def classes_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """The directory of the per-class files that ``load_continual_imagenet`` reads."""
    if data_dir is None:
        if not os.environ.get(ENV_VAR):
            raise DataError(f"continual ImageNet: no data_dir given and ${ENV_VAR} is not set; "
                            f"{HOW_TO_GET}")
        data_dir = Path(os.environ[ENV_VAR]) / "continual_imagenet"
    root = Path(data_dir)
    return root / "classes" if (root / "classes").is_dir() else root


def load_continual_imagenet(data_dir: str | os.PathLike[str] | None = None, *,
                            num_classes: int | None = None) -> np.ndarray:
    """Reads Dohare et al.'s per-class files into a ``(classes, 700, 32, 32, 3)`` array.

    Args:
      data_dir: a directory holding ``classes/<c>.npy`` (or the ``classes`` directory itself);
        default ``$SPECTRAL_PLASTICITY_DATA/continual_imagenet``.
      num_classes: read classes ``0..num_classes-1`` only (default: every consecutive file
        from ``0.npy``, 1,000 in the published data).

    Raises:
      DataError: a missing directory or file, or a file that is truncated or not a
        ``(700, 3, 32, 32)`` array (the message names the file and how to get the data).
    """
    directory = classes_dir(data_dir)
    found = {int(m.group(1)) for p in (directory.iterdir() if directory.is_dir() else ())
             if (m := re.fullmatch(r"(\d+)\.npy", p.name))}
    if 0 not in found:
        raise DataError(f"continual ImageNet: no class files (0.npy, 1.npy, ...) in {directory}; "
                        f"{HOW_TO_GET}")
    available = next(c for c in range(len(found) + 1) if c not in found)
    num_classes = available if num_classes is None else num_classes
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if num_classes > available:
        raise DataError(f"continual ImageNet: {num_classes} classes asked for but "
                        f"{directory / f'{available}.npy'} is missing; {HOW_TO_GET}")
    images = None
    for c in range(num_classes):
        path = directory / f"{c}.npy"
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as error:
            raise DataError(f"{path} is unreadable or truncated ({error}); {HOW_TO_GET}"
                            ) from error
        if array.shape != FILE_SHAPE or not np.issubdtype(array.dtype, np.number):
            raise DataError(f"{path} holds a {array.dtype} array of shape {array.shape}, not "
                            f"the {FILE_SHAPE} images of one class; {HOW_TO_GET}")
        if images is None:
            dtype = np.uint8 if array.dtype == np.uint8 else np.float32
            images = np.empty((num_classes, FILE_SHAPE[0], 32, 32, 3), dtype)
        images[c] = array.transpose(0, 2, 3, 1)
    return images


class PairTask(NamedTuple):
    """One task: its classes (label ``i`` is ``classes[i]``) and the key of its epoch orders."""

    classes: jax.Array  # (classes_per_task,)
    order_key: jax.Array


class ContinualImageNet(TaskStream):
    """Binary (``classes_per_task``-way) tasks over per-class images (module docstring)."""

    reset_head = True

    def __init__(self, images: np.ndarray, *, num_tasks: int = 2000, classes_per_task: int = 2,
                 epochs_per_task: int = 20, pixel_scale: float | None = None) -> None:
        """Args:
          images: ``(classes, 700, 32, 32, 3)`` from ``load_continual_imagenet``.
          num_tasks: tasks in a run (2,000).
          classes_per_task: classes per task, the head's width (2: binary tasks).
          epochs_per_task: passes over a task's training images (paper's code 20, Dohare 250).
          pixel_scale: input = stored value x ``pixel_scale`` (default: 1/255 for uint8
            images, 1 for float images).
        """
        if images.ndim != 5 or images.shape[1:] != (FILE_SHAPE[0], 32, 32, 3):
            raise ValueError(f"images must be (classes, 700, 32, 32, 3), got {images.shape}")
        if not 0 < classes_per_task <= len(images):
            raise ValueError(f"classes_per_task={classes_per_task} must lie in [1, "
                             f"{len(images)}] (the classes of the data)")
        if num_tasks < 1 or epochs_per_task < 1:
            raise ValueError(f"num_tasks and epochs_per_task must be positive, got {num_tasks} "
                             f"and {epochs_per_task}")
        self.name, self.num_tasks = "continual_imagenet", num_tasks
        self.input_shape, self.num_outputs = (32, 32, 3), classes_per_task
        self.epochs_per_task = epochs_per_task
        self.train_size = epochs_per_task * classes_per_task * TRAIN_PER_CLASS
        self.eval_size = classes_per_task * TEST_PER_CLASS
        if pixel_scale is None:
            pixel_scale = 1 / 255 if images.dtype == np.uint8 else 1.0
        self.pixel_scale = float(pixel_scale)
        self._images = jnp.asarray(images)

    def class_order(self, key: jax.Array) -> jax.Array:
        """The run's order of the classes; task ``t`` uses entries ``k t .. k t + k - 1``."""
        return jax.random.permutation(jax.random.split(key)[0], self._images.shape[0])

    def begin_task(self, key: jax.Array, task: jax.Array) -> PairTask:
        k, num_classes = self.num_outputs, self._images.shape[0]
        classes = self.class_order(key)[(task * k + jnp.arange(k)) % num_classes]
        return PairTask(classes, jax.random.fold_in(jax.random.split(key)[1], task))

    def _inputs(self, images: jax.Array) -> jax.Array:
        return images.astype(jnp.float32) * self.pixel_scale

    def train_batch(self, task_state: PairTask, step: jax.Array, batch_size: int):
        positions = step * batch_size + jnp.arange(batch_size)
        pool = jnp.ones((self.num_outputs * TRAIN_PER_CLASS,), bool)
        index = epoch_order(task_state.order_key, positions, pool)
        labels = index // TRAIN_PER_CLASS
        x = self._images[task_state.classes[labels], index % TRAIN_PER_CLASS]
        return self._inputs(x), labels

    def eval_data(self, task_state: PairTask):
        labels = jnp.arange(self.eval_size) % self.num_outputs
        image = TRAIN_PER_CLASS + jnp.arange(self.eval_size) // self.num_outputs
        return self._inputs(self._images[task_state.classes[labels], image]), labels

    def check_batch_size(self, batch_size: int) -> int:
        """As ``TaskStream.check_batch_size``; also at most one epoch of the task."""
        steps = super().check_batch_size(batch_size)
        epoch = self.num_outputs * TRAIN_PER_CLASS
        if batch_size > epoch:
            raise ValueError(f"batch_size {batch_size} exceeds the {epoch} training images of "
                             f"a task of {self.name}")
        return steps
