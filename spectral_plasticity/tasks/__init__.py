"""Continual task streams: permuted and relabeled images, slowly-changing regression."""

from __future__ import annotations

from typing import Any

from spectral_plasticity.tasks.idx import DataError, ImageDataset, load_idx_dataset, read_idx
from spectral_plasticity.tasks.permuted import PermutedImages, RelabeledImages
from spectral_plasticity.tasks.regression import SlowlyChangingRegression
from spectral_plasticity.tasks.stream import TaskStream

STREAMS = ("permuted_mnist", "permuted_fashion_mnist", "relabeled_mnist",
           "relabeled_fashion_mnist", "slowly_changing_regression")


def make_stream(name: str, *, data_dir: str | None = None, **kwargs: Any) -> TaskStream:
    """The stream called ``name`` (one of ``STREAMS``), with its keyword arguments.

    Image streams take ``num_tasks``, ``train_size`` (default: all training images),
    ``eval_size`` (2,000) and, for relabeled ones, ``mode`` (``"random"``/``"shuffled"``);
    ``data_dir`` points at the IDX files (see ``tasks.idx``).
    """
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose one of {list(STREAMS)}")
    if name == "slowly_changing_regression":
        return SlowlyChangingRegression(**kwargs)
    kind, dataset = name.split("_", 1)
    data = load_idx_dataset(dataset, data_dir)
    cls = PermutedImages if kind == "permuted" else RelabeledImages
    return cls(data, name=name, **kwargs)


__all__ = ["STREAMS", "DataError", "ImageDataset", "PermutedImages", "RelabeledImages",
           "SlowlyChangingRegression", "TaskStream", "load_idx_dataset", "make_stream",
           "read_idx"]
