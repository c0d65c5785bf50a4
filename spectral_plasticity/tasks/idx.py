"""Image data sets in MNIST's IDX format: reading, verification, download, and where to find them.

MNIST and Fashion-MNIST come as four gzip-compressed IDX files. ``load_idx_dataset(name)``
looks for them in ``data_dir`` when one is given (and nowhere else: a missing one is an error),
otherwise, in order, in ``$SPECTRAL_PLASTICITY_DATA/<name>``, the Debian package's directory
(``/usr/share/datasets/fashion-mnist`` from ``apt-get install dataset-fashion-mnist``) and the
download cache; MNIST is downloaded into the cache with pooch
when it is found nowhere (md5-checked; a failed or partial download leaves no file). Every file
is checked against the known checksums of its published versions and its IDX header against
its size, so a truncated or altered file is an error naming the file, never silent bad data.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

ENV_VAR = "SPECTRAL_PLASTICITY_DATA"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# md5 of each published .gz: the original release, and Debian's re-compressed package.
KNOWN_MD5 = {
    "mnist": {
        "train_images": {"f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train_labels": {"d53e105ee54ea40749a09fcbcd1e9432"},
        "test_images": {"9fb629c4189551a2d022fa330f9573f3"},
        "test_labels": {"ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion_mnist": {
        "train_images": {"8d4fb7e6c68d591d4c3dfef9ec88bf0d", "cf8536b0aa1a6ac5fa3f23001093305c"},
        "train_labels": {"25c81989df183df01b3e8a0aad5dffbe", "10bea18fdb374794d4bb42e356e600c9"},
        "test_images": {"bef4ecab320f06d8554ea6380940ec79", "f78720b4224f21cce2f2ccf2d7a94c9a"},
        "test_labels": {"bb300cfdad3c16e7a12a480ee83cd310", "0d30e22e447f3c33dab9ed536400ac01"},
    },
}
SYSTEM_DIRS = {"fashion_mnist": Path("/usr/share/datasets/fashion-mnist")}
DOWNLOAD_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/"}
HOW_TO_GET = {
    "mnist": "it is downloaded automatically when online; or put the four IDX .gz files in "
             f"${ENV_VAR}/mnist",
    "fashion_mnist": "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu) installs it in "
                     f"/usr/share/datasets/fashion-mnist; or put the four IDX .gz files in "
                     f"${ENV_VAR}/fashion_mnist",
}


class ImageDataset(NamedTuple):
    """Images ``(N, H, W)`` uint8 and labels ``(N,)`` uint8 of the train and test splits."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


class DataError(ValueError):
    """A data set is missing, truncated or not what it claims to be."""


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_idx(path: Path) -> np.ndarray:
    """Reads an (optionally gzipped) IDX file of unsigned bytes; checks its header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path} is unreadable or truncated ({error})") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DataError(f"{path} holds {len(data)} bytes but its header {shape} needs "
                        f"{expected}: the file is truncated or corrupt")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _candidate_dirs(name: str, data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where ``name`` is looked for: only ``data_dir`` when one is given, else the defaults."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(Path(os.environ[ENV_VAR]) / name)
    if name in SYSTEM_DIRS:
        dirs.append(SYSTEM_DIRS[name])
    dirs.append(cache_dir() / name)
    return dirs


def find_idx_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The directory ``load_idx_dataset(name, data_dir)`` reads, or None if it is nowhere yet."""
    return next((d for d in _candidate_dirs(name, data_dir)
                 if all((d / f).exists() for f in FILES.values())), None)


def cache_dir() -> Path:
    import pooch

    return Path(pooch.os_cache("spectral_plasticity"))


def _download(name: str) -> Path:
    import pooch

    target = cache_dir() / name
    for key, filename in FILES.items():
        (known,) = KNOWN_MD5[name][key]
        pooch.retrieve(DOWNLOAD_URLS[name] + filename, known_hash=f"md5:{known}",
                       fname=filename, path=target, progressbar=False)
    return target


def _verify(name: str, directory: Path) -> None:
    for key, filename in FILES.items():
        got = md5(directory / filename)
        if got not in KNOWN_MD5[name][key]:
            raise DataError(f"{directory / filename} has md5 {got}, not that of any published "
                            f"{name} file {sorted(KNOWN_MD5[name][key])}: it is corrupt or "
                            f"another data set; {HOW_TO_GET[name]}")


def load_idx_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                     download: bool = True, verify: bool = True) -> ImageDataset:
    """Loads ``"mnist"`` or ``"fashion_mnist"`` (see the module docstring for where from).

    ``verify=False`` skips the checksums (for your own re-encoded copies); the IDX headers are
    still checked against the file sizes.
    """
    if name not in KNOWN_MD5:
        raise ValueError(f"unknown IDX data set {name!r}; choose one of {sorted(KNOWN_MD5)}")
    found = find_idx_dataset(name, data_dir)
    if found is None and data_dir is not None:
        raise DataError(f"{name} not found in the given data_dir {data_dir} (config "
                        f"stream.data_dir; it needs {', '.join(FILES.values())}); "
                        f"{HOW_TO_GET[name]}, or leave data_dir empty to use the defaults")
    if found is None and download and name in DOWNLOAD_URLS:
        try:
            found = _download(name)
        except Exception as error:  # any network failure: say how to get the data instead
            raise DataError(f"{name} was not found and could not be downloaded ({error}); "
                            f"{HOW_TO_GET[name]}") from error
    if found is None:
        searched = ", ".join(str(d) for d in _candidate_dirs(name, data_dir))
        raise DataError(f"{name} not found (looked in {searched}); {HOW_TO_GET[name]}")
    if verify:
        _verify(name, found)
    arrays = {key: read_idx(found / filename) for key, filename in FILES.items()}
    return ImageDataset(**arrays)


def idx_dataset_or_random(name: str) -> tuple[ImageDataset, str]:
    """``name`` when it is on disk (never downloaded), otherwise uniformly random images with
    MNIST's shapes (10,000 training and 2,000 test images of 28 x 28 pixels, 10 classes); and
    which of the two it is, in words. For measurements that do not depend on the pixels
    (speed)."""
    try:
        return load_idx_dataset(name, download=False), name
    except DataError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (12_000, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, 12_000).astype(np.uint8)
        return (ImageDataset(images[:10_000], labels[:10_000], images[10_000:],
                             labels[10_000:]), f"synthetic 784-pixel images ({name} not found)")
