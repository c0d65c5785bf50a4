"""Continual task streams: permuted and relabeled images, slowly-changing regression, continual
ImageNet and class-incremental CIFAR-100, all behind the ``TaskStream`` interface."""

from __future__ import annotations

from typing import Any

from spectral_plasticity.tasks import idx
from spectral_plasticity.tasks.cifar import find_cifar100, load_cifar100
from spectral_plasticity.tasks.continual_imagenet import (
    ContinualImageNet,
    classes_dir,
    load_continual_imagenet,
)
from spectral_plasticity.tasks.idx import (
    DataError,
    ImageDataset,
    find_idx_dataset,
    load_idx_dataset,
    read_idx,
)
from spectral_plasticity.tasks.incremental_cifar import IncrementalCIFAR
from spectral_plasticity.tasks.permuted import PermutedImages, RelabeledImages
from spectral_plasticity.tasks.regression import SlowlyChangingRegression
from spectral_plasticity.tasks.stream import TaskStream

STREAMS = ("permuted_mnist", "permuted_fashion_mnist", "relabeled_mnist",
           "relabeled_fashion_mnist", "relabeled_cifar100", "slowly_changing_regression",
           "continual_imagenet", "incremental_cifar100")


def make_stream(name: str, *, data_dir: str | None = None, **kwargs: Any) -> TaskStream:
    """The stream called ``name`` (one of ``STREAMS``), with its keyword arguments.

    - ``permuted_<mnist|fashion_mnist>``: ``PermutedImages`` (``num_tasks``, ``train_size``
      (default: all training images), ``eval_size``);
    - ``relabeled_<mnist|fashion_mnist|cifar100>``: ``RelabeledImages`` (also ``mode``,
      ``"random"``/``"shuffled"``, and ``flatten``; CIFAR-100 keeps ``(32, 32, 3)`` inputs
      unless ``flatten=True``);
    - ``slowly_changing_regression``: ``SlowlyChangingRegression`` (no data);
    - ``continual_imagenet``: ``ContinualImageNet`` (also ``num_classes``, the classes read);
    - ``incremental_cifar100``: ``IncrementalCIFAR``.

    ``data_dir`` is where the data set is looked for first (see ``tasks.idx``, ``tasks.cifar``,
    ``tasks.continual_imagenet``); a missing data set is a ``DataError`` saying how to get it.
    """
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose one of {list(STREAMS)}")
    if name == "slowly_changing_regression":
        return SlowlyChangingRegression(**kwargs)
    if name == "continual_imagenet":
        images = load_continual_imagenet(data_dir, num_classes=kwargs.pop("num_classes", None))
        return ContinualImageNet(images, **kwargs)
    if name == "incremental_cifar100":
        return IncrementalCIFAR(load_cifar100(data_dir), **kwargs)
    kind, dataset = name.split("_", 1)
    if dataset == "cifar100":
        kwargs = {"num_classes": 100, "flatten": False, **kwargs}
        data = load_cifar100(data_dir)
    else:
        data = load_idx_dataset(dataset, data_dir)
    cls = PermutedImages if kind == "permuted" else RelabeledImages
    return cls(data, name=name, **kwargs)


def data_source(name: str, data_dir: str | None = None) -> str:
    """The directory that ``make_stream(name, data_dir=...)`` reads (call it after the stream is
    made: a downloaded data set is then in the cache), or ``"generated"`` for a stream without
    data. A given ``data_dir`` is the only place a stream reads (or it fails)."""
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose one of {list(STREAMS)}")
    if name == "slowly_changing_regression":
        return "generated"
    if name == "continual_imagenet":
        return str(classes_dir(data_dir))
    if data_dir is not None:
        return str(data_dir)
    dataset = name.split("_", 1)[1]
    if dataset == "cifar100":  # relabeled_cifar100, incremental_cifar100
        return str(find_cifar100() or idx.cache_dir() / "cifar100")
    return str(find_idx_dataset(dataset) or idx.cache_dir() / dataset)


__all__ = ["STREAMS", "ContinualImageNet", "DataError", "ImageDataset", "IncrementalCIFAR",
           "PermutedImages", "RelabeledImages", "SlowlyChangingRegression", "TaskStream",
           "data_source", "load_cifar100", "load_continual_imagenet", "load_idx_dataset",
           "make_stream", "read_idx"]
