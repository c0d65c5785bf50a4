"""Small files in the real on-disk formats of the streams' data sets, written to tmp dirs.

- CIFAR-100: ``cifar-100-python.tar.gz`` holding ``cifar-100-python/{train,test,meta}``, pickled
  dicts with bytes keys (``b"data"`` ``(N, 3072)`` uint8 as R, G, B planes, ``b"fine_labels"``,
  ...), as Krizhevsky's archive (protocol 2 pickles, readable with ``encoding="bytes"``).
- Continual ImageNet: Dohare et al.'s ``classes/<c>.npy``, ``(700, 3, 32, 32)`` per class.
"""

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest


def _cifar_batch(rng: np.random.Generator, per_class: int, classes: int) -> dict:
    labels = np.tile(np.arange(classes), per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return {b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": b"training batch 1 of 1", b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(), b"data": data}


def write_cifar100(directory: Path, train_per_class: int = 4, test_per_class: int = 2,
                   seed: int = 0, extracted: bool = False) -> tuple[dict, dict]:
    """Writes a 100-class CIFAR-100 archive (or its extracted folder); returns the batches."""
    rng = np.random.default_rng(seed)
    train, test = _cifar_batch(rng, train_per_class, 100), _cifar_batch(rng, test_per_class, 100)
    meta = {b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    members = {name: pickle.dumps(batch, protocol=2)
               for name, batch in (("train", train), ("test", test), ("meta", meta))}
    directory.mkdir(parents=True, exist_ok=True)
    if extracted:
        (directory / "cifar-100-python").mkdir()
        for name, raw in members.items():
            (directory / "cifar-100-python" / name).write_bytes(raw)
    else:
        with tarfile.open(directory / "cifar-100-python.tar.gz", "w:gz") as tar:
            for name, raw in members.items():
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    return train, test


def write_imagenet_classes(directory: Path, num_classes: int, seed: int = 0) -> np.ndarray:
    """Writes ``classes/<c>.npy`` files of ``(700, 3, 32, 32)`` uint8; returns them stacked."""
    rng = np.random.default_rng(seed)
    (directory / "classes").mkdir(parents=True, exist_ok=True)
    arrays = rng.integers(0, 256, (num_classes, 700, 3, 32, 32), dtype=np.uint8)
    for c, array in enumerate(arrays):
        np.save(directory / "classes" / f"{c}.npy", array)
    return arrays


@pytest.fixture(scope="session")
def cifar_writer() -> Callable[..., tuple[dict, dict]]:
    """``write_cifar100(directory, train_per_class, test_per_class, seed, extracted)``."""
    return write_cifar100


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory) -> tuple[Path, dict, dict]:
    """A directory with a tiny ``cifar-100-python.tar.gz`` (4 train, 2 test images per class)."""
    root = tmp_path_factory.mktemp("cifar")
    return root, *write_cifar100(root)


@pytest.fixture(scope="session")
def imagenet_dir(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A directory with 5 classes of Dohare et al.'s continual-ImageNet files."""
    root = tmp_path_factory.mktemp("imagenet")
    return root, write_imagenet_classes(root, 5)
