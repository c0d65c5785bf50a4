"""CIFAR-100 from its standard python archive: reading, verification, download, where to find it.

``cifar-100-python.tar.gz`` (Krizhevsky 2009) holds ``cifar-100-python/{train,test,meta}``,
pickled dicts: ``data`` is ``(N, 3072)`` uint8, each row 1,024 red, then 1,024 green, then 1,024
blue values of a 32x32 image in row-major order, and ``fine_labels`` the 100-way labels (50,000
training and 10,000 test images, 500 and 100 per class). ``load_cifar100`` looks for the
archive or its extracted ``cifar-100-python/`` folder in ``data_dir`` when one is given (and
nowhere else: a missing one is an error), otherwise, in order, in
``$SPECTRAL_PLASTICITY_DATA/cifar100`` and the download cache, and downloads the archive into
the cache with pooch when it is found nowhere (md5-checked; a failed or partial download leaves
no file).
The archive's md5 and each extracted member's md5 are the published ones (torchvision's
``CIFAR100`` lists the same), so a truncated or altered file is an error naming it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from spectral_plasticity.tasks.idx import ENV_VAR, DataError, ImageDataset, cache_dir

ARCHIVE = "cifar-100-python.tar.gz"
FOLDER = "cifar-100-python"
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
MEMBER_MD5 = {"train": "16019d7e3df5f24257cddd939b257f8d",
              "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
              "meta": "7973b15100ade9c7d40fb424638fde48"}
HOW_TO_GET = (f"it is downloaded from {URL} automatically when online; otherwise fetch it "
              f"(`curl -O {URL}`) and put {ARCHIVE} (or its extracted {FOLDER}/ folder) in "
              f"${ENV_VAR}/cifar100 or in the directory given as data_dir "
              "(config.stream.data_dir)")


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _unpickle(raw: bytes, where: str) -> dict[str, Any]:
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DataError(f"{where} is not a readable CIFAR pickle (truncated or corrupt: "
                        f"{error}); {HOW_TO_GET}") from error
    if not isinstance(batch, dict):
        raise DataError(f"{where} does not hold a CIFAR batch dict; {HOW_TO_GET}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _images_and_labels(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 32, 32, 3)`` uint8 images and ``(N,)`` uint8 fine labels of a pickled batch."""
    batch = _unpickle(raw, where)
    if "data" not in batch or "fine_labels" not in batch:
        raise DataError(f"{where} lacks the 'data' or 'fine_labels' entry of a CIFAR-100 batch")
    data, labels = np.asarray(batch["data"]), np.asarray(batch["fine_labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{where}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} "
                        f"{data.shape}")
    if labels.shape != (len(data),) or labels.min() < 0 or labels.max() > 99:
        raise DataError(f"{where}: 'fine_labels' must be {len(data)} labels in [0, 100)")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels.astype(np.uint8)


def _read_members(directory: Path, verify: bool) -> dict[str, bytes] | None:
    """Raw ``train`` and ``test`` bytes from the extracted folder or the archive, or None."""
    folder, archive = directory / FOLDER, directory / ARCHIVE
    if (folder / "train").is_file() and (folder / "test").is_file():
        raw = {name: (folder / name).read_bytes() for name in ("train", "test")}
        if verify:
            for name, blob in raw.items():
                if (got := _md5(blob)) != MEMBER_MD5[name]:
                    raise DataError(f"{folder / name} has md5 {got}, not the published "
                                    f"{MEMBER_MD5[name]}: it is truncated, altered or another "
                                    f"file; {HOW_TO_GET}")
        return raw
    if not archive.is_file():
        return None
    blob = archive.read_bytes()
    if verify and (got := _md5(blob)) != ARCHIVE_MD5:
        raise DataError(f"{archive} has md5 {got}, not the published {ARCHIVE_MD5}: it is "
                        f"truncated, altered or another file; {HOW_TO_GET}")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            return {name: tar.extractfile(f"{FOLDER}/{name}").read() for name in ("train", "test")}
    except (tarfile.TarError, KeyError, OSError, EOFError, AttributeError) as error:
        raise DataError(f"{archive} is not a complete CIFAR-100 python archive ({error}); "
                        f"{HOW_TO_GET}") from error


def _candidate_dirs(data_dir: str | os.PathLike[str] | None) -> list[Path]:
    """Where CIFAR-100 is looked for: only ``data_dir`` when one is given, else the defaults."""
    if data_dir is not None:
        return [Path(data_dir)]
    dirs = [Path(os.environ[ENV_VAR]) / "cifar100"] if os.environ.get(ENV_VAR) else []
    return [*dirs, cache_dir() / "cifar100"]


def find_cifar100(data_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """The directory ``load_cifar100(data_dir)`` reads, or None if it is nowhere yet."""
    return next((d for d in _candidate_dirs(data_dir)
                 if (d / FOLDER / "train").is_file() or (d / ARCHIVE).is_file()), None)


def _download() -> Path:
    import pooch

    target = cache_dir() / "cifar100"
    pooch.retrieve(URL, known_hash=f"md5:{ARCHIVE_MD5}", fname=ARCHIVE, path=target,
                   progressbar=False)
    return target


def load_cifar100(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True,
                  verify: bool = True) -> ImageDataset:
    """CIFAR-100 with fine labels: ``(50000, 32, 32, 3)`` train, ``(10000, 32, 32, 3)`` test.

    See the module docstring for where it is looked for. ``verify=False`` skips the checksums
    (for your own copies in this layout); the pickles' shapes are still checked.

    Raises:
      DataError: the data set is missing, truncated, or fails its checksum (the message names
        the file and says how to get the data).
    """
    raw = next((r for d in _candidate_dirs(data_dir)
                if (r := _read_members(d, verify)) is not None), None)
    if raw is None and data_dir is not None:
        raise DataError(f"CIFAR-100 not found in the given data_dir {data_dir} (config "
                        f"stream.data_dir; it needs {ARCHIVE} or {FOLDER}/); {HOW_TO_GET}, or "
                        "leave data_dir empty to use the defaults")
    if raw is None and download:
        try:
            raw = _read_members(_download(), verify)
        except DataError:
            raise
        except Exception as error:  # any network failure: say how to get the data instead
            raise DataError(f"CIFAR-100 was not found and could not be downloaded ({error}); "
                            f"{HOW_TO_GET}") from error
    if raw is None:
        searched = ", ".join(str(d) for d in _candidate_dirs(data_dir))
        raise DataError(f"CIFAR-100 not found (looked in {searched}); {HOW_TO_GET}")
    train = _images_and_labels(raw["train"], "the CIFAR-100 train file")
    test = _images_and_labels(raw["test"], "the CIFAR-100 test file")
    return ImageDataset(train[0], train[1], test[0], test[1])
