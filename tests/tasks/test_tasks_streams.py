"""Image streams, the IDX loader and ``make_stream``, on small generated files of real formats."""

import gzip
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.tasks import (
    STREAMS,
    DataError,
    PermutedImages,
    RelabeledImages,
    cifar,
    load_idx_dataset,
    make_stream,
)
from spectral_plasticity.tasks.idx import FILES, SYSTEM_DIRS
from spectral_plasticity.tasks.stream import epoch_order, valid_first_order


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_idx(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (50, 4, 4)),
        "train_labels": rng.integers(0, 10, 50),
        "test_images": rng.integers(0, 256, (20, 4, 4)),
        "test_labels": rng.integers(0, 10, 20),
    }
    for key, filename in FILES.items():
        _write_idx(tmp_path / filename, arrays[key])
    return tmp_path, arrays


@pytest.fixture
def tiny_mnist(tiny_idx):
    """The tiny IDX files read back as "mnist" (unverified), and the arrays written."""
    directory, arrays = tiny_idx
    return load_idx_dataset("mnist", directory, download=False, verify=False), arrays


def test_idx_round_trip(tiny_idx):
    directory, arrays = tiny_idx
    data = load_idx_dataset("mnist", directory, download=False, verify=False)
    for key, array in arrays.items():
        np.testing.assert_array_equal(getattr(data, key), array)


def test_wrong_checksum_truncated_and_missing_files_are_clear_errors(tiny_idx, tmp_path,
                                                                     monkeypatch):
    from spectral_plasticity.tasks import idx

    monkeypatch.setitem(SYSTEM_DIRS, "fashion_mnist", tmp_path / "no_system_copy")
    monkeypatch.setattr(idx, "cache_dir", lambda: tmp_path / "no_cache")
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    directory, _ = tiny_idx
    with pytest.raises(DataError, match="has md5 .* not that of any published mnist file"):
        load_idx_dataset("mnist", directory, download=False)
    path = directory / FILES["train_images"]
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_idx_dataset("mnist", directory, download=False, verify=False)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_idx_dataset("fashion_mnist", tmp_path / "empty", download=False)
    with pytest.raises(ValueError, match="unknown IDX data set 'cifar'"):
        load_idx_dataset("cifar")


def test_idx_dataset_or_random_falls_back_to_random_images_of_mnists_shapes(monkeypatch):
    from spectral_plasticity.tasks import idx

    on_disk = object()
    monkeypatch.setattr(idx, "load_idx_dataset",
                        lambda name, download: on_disk if not download else None)
    data, source = idx.idx_dataset_or_random("mnist")
    assert data is on_disk and source == "mnist"

    def missing(name, download):
        raise DataError(f"{name} not found")

    monkeypatch.setattr(idx, "load_idx_dataset", missing)
    random, source = idx.idx_dataset_or_random("fashion_mnist")
    assert source == "synthetic 784-pixel images (fashion_mnist not found)"
    assert random.train_images.shape == (10_000, 28, 28)
    assert random.test_images.shape == (2_000, 28, 28)
    assert random.train_images.dtype == random.train_labels.dtype == np.uint8
    assert set(np.unique(random.test_labels).tolist()) == set(range(10))


@pytest.mark.skipif(not (SYSTEM_DIRS["fashion_mnist"] / FILES["train_images"]).exists(),
                    reason="real Fashion-MNIST skipped: `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist_from_the_debian_package():
    data = load_idx_dataset("fashion_mnist", download=False)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


def test_permuted_tasks_are_reproducible_permutations(tiny_mnist):
    data, arrays = tiny_mnist
    stream = PermutedImages(data, name="permuted_tiny", num_tasks=5, train_size=50, eval_size=20)
    key = jax.random.key(0)
    t0, t1 = stream.begin_task(key, 0), stream.begin_task(key, jnp.asarray(1))
    for task in (t0, t1):
        assert sorted(np.asarray(task.pixel_order).tolist()) == list(range(16))
        assert sorted(np.asarray(task.example_order).tolist()) == list(range(50))
    assert not np.array_equal(t0.pixel_order, t1.pixel_order)
    np.testing.assert_array_equal(stream.begin_task(key, 1).pixel_order, t1.pixel_order)
    x, y = jax.jit(stream.train_batch, static_argnums=2)(t1, jnp.asarray(3), 5)
    index = np.asarray(t1.example_order)[15:20]
    flat = arrays["train_images"].reshape(50, 16)
    np.testing.assert_allclose(x, flat[index][:, np.asarray(t1.pixel_order)] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(y, arrays["train_labels"][index])
    ex, ey = stream.eval_data(t1)
    np.testing.assert_allclose(ex, arrays["test_images"].reshape(20, 16)[:, t1.pixel_order]
                               / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ey, arrays["test_labels"])
    assert stream.check_batch_size(10) == 5
    with pytest.raises(ValueError, match="batch_size 60 must lie in"):
        stream.check_batch_size(60)
    with pytest.raises(ValueError, match="must divide"):
        stream.check_batch_size(7)


def test_random_labels_are_redrawn_per_task_on_a_fixed_subset_and_eval_is_memorization(
        tiny_mnist):
    data, arrays = tiny_mnist
    stream = RelabeledImages(data, mode="random", name="r", num_tasks=3, train_size=30,
                             eval_size=10)
    flat = arrays["train_images"].reshape(50, 16).astype(np.uint8)
    rows = {r.tobytes(): i for i, r in enumerate(flat)}
    read_back = lambda x: [rows[r.tobytes()]
                           for r in np.rint(np.asarray(x) * 255).astype(np.uint8)]
    key = jax.random.key(1)
    subsets, labelings = [], []
    for t in range(3):
        task = stream.begin_task(key, jnp.asarray(t))
        x, y = stream.train_batch(task, jnp.asarray(0), 30)
        sources = read_back(x)
        assert len(set(sources)) == 30  # every subset image once per task, unpermuted
        labels = dict(zip(sources, np.asarray(y).tolist(), strict=True))
        # Eval: images of the task's subset with the labels the task trains them on.
        ex, ey = stream.eval_data(task)
        eval_sources = read_back(ex)
        assert len(set(eval_sources)) == 10
        assert [labels[i] for i in eval_sources] == np.asarray(ey).tolist()
        subsets.append(frozenset(sources))
        labelings.append([labels[i] for i in sorted(labels)])
    assert len(set(subsets)) == 1  # the run's subset is fixed ...
    assert len({tuple(lab) for lab in labelings}) == 3  # ... its labels are redrawn per task
    assert np.mean(np.array(labelings[0]) == np.array(labelings[1])) < 0.5
    with pytest.raises(ValueError, match=r"eval_size must lie in \[1, 30\] \(the train_size"):
        RelabeledImages(data, mode="random", name="r", num_tasks=1, train_size=30, eval_size=31)
    with pytest.raises(ValueError, match="mode must be"):
        RelabeledImages(data, mode="noisy", name="n", num_tasks=1, train_size=5)


def test_epochs_present_the_fixed_subset_epoch_after_epoch_with_one_labeling_per_task(
        tiny_mnist):
    data, arrays = tiny_mnist
    once = RelabeledImages(data, mode="random", name="r", num_tasks=2, train_size=12,
                           eval_size=12)
    stream = RelabeledImages(data, mode="random", name="r", num_tasks=2, train_size=12,
                             eval_size=12, epochs=3)
    assert stream.train_size == 36 and stream.check_batch_size(4) == 9
    key = jax.random.key(3)
    for t in range(2):
        task = stream.begin_task(key, jnp.asarray(t))
        reference = once.begin_task(key, jnp.asarray(t))
        order = np.asarray(task.example_order).reshape(3, 12)
        labels = np.asarray(task.labels).reshape(3, 12)
        subset = set(np.asarray(reference.example_order).tolist())
        label_of = dict(zip(np.asarray(reference.example_order).tolist(),
                            np.asarray(reference.labels).tolist(), strict=True))
        for epoch in range(3):  # every epoch: the run's subset once, labels of this task
            assert set(order[epoch].tolist()) == subset
            assert [label_of[i] for i in order[epoch]] == labels[epoch].tolist()
        assert len({tuple(o) for o in order.tolist()}) == 3  # a fresh order per epoch
        x, y = stream.train_batch(task, jnp.asarray(8), 4)  # the last batch of the task
        np.testing.assert_allclose(x, arrays["train_images"].reshape(50, 16)[order[2, 8:]]
                                   / 255.0)
        assert np.asarray(y).tolist() == labels[2, 8:].tolist()
        # Eval: memorization of the same labels; epochs=1 is the stream of before.
        np.testing.assert_array_equal(task.eval_labels, reference.eval_labels)
        np.testing.assert_array_equal(stream.eval_data(task)[0], once.eval_data(reference)[0])
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        RelabeledImages(data, mode="random", name="r", num_tasks=1, train_size=5, eval_size=5,
                        epochs=0)


def test_shuffled_labels_permute_the_classes_per_task(tiny_mnist):
    data, arrays = tiny_mnist
    stream = RelabeledImages(data, mode="shuffled", name="s", num_tasks=3, eval_size=20,
                             flatten=False)
    assert stream.input_shape == (4, 4, 1) and stream.train_size == 50
    maps = []
    for t in range(3):
        task = stream.begin_task(jax.random.key(1), t)
        x, y = stream.train_batch(task, 0, 50)
        index = np.asarray(task.example_order)
        assert sorted(index.tolist()) == list(range(50))
        np.testing.assert_allclose(x[..., 0], arrays["train_images"][index] / 255.0)
        ex, ey = stream.eval_data(task)
        np.testing.assert_allclose(ex[..., 0], arrays["test_images"] / 255.0)
        mapping = {}
        pairs = [*zip(arrays["train_labels"][index].tolist(), np.asarray(y).tolist(),
                      strict=True),
                 *zip(arrays["test_labels"].tolist(), np.asarray(ey).tolist(), strict=True)]
        for true, new in pairs:
            assert mapping.setdefault(true, new) == new  # one label per class ...
        assert len(set(mapping.values())) == len(mapping)  # ... and a bijection
        maps.append(tuple(sorted(mapping.items())))
    assert len(set(maps)) == 3


def test_relabeled_cifar100_keeps_image_inputs(cifar_archive, monkeypatch):
    root, _, _ = cifar_archive
    blob = (root / "cifar-100-python.tar.gz").read_bytes()
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    stream = make_stream("relabeled_cifar100", data_dir=root, mode="random", num_tasks=2,
                         train_size=40, eval_size=8)
    assert stream.input_shape == (32, 32, 3) and stream.num_outputs == 100
    x, y = stream.train_batch(stream.begin_task(jax.random.key(0), 1), 0, 40)
    assert x.shape == (40, 32, 32, 3) and int(y.max()) < 100
    images = {image.tobytes() for image in cifar.load_cifar100(root).train_images}
    assert all(p.tobytes() in images for p in np.rint(np.asarray(x) * 255).astype(np.uint8))


def test_make_stream_names_and_errors():
    assert set(STREAMS) >= {"permuted_mnist", "permuted_fashion_mnist", "relabeled_mnist",
                            "relabeled_cifar100", "slowly_changing_regression",
                            "continual_imagenet", "incremental_cifar100"}
    with pytest.raises(ValueError, match=r"unknown stream 'permuted_cifar'; choose one of \["):
        make_stream("permuted_cifar")
    assert make_stream("slowly_changing_regression", num_tasks=2).num_tasks == 2
    with pytest.raises(TypeError, match="unexpected keyword argument 'train_size'"):
        make_stream("slowly_changing_regression", train_size=5)


def test_epoch_order_visits_the_valid_items_once_per_epoch_across_batch_boundaries():
    valid = jnp.asarray([True, False, True, True, False, True, True, False, True, True, False,
                         False])  # a pool of 7 of 12 items
    order = jax.jit(lambda p: epoch_order(jax.random.key(3), p, valid))
    # Batches of 5 do not divide the pool: batch 1 (positions 5..9) straddles epochs 0 and 1.
    shown = np.concatenate([np.asarray(order(5 * b + jnp.arange(5))) for b in range(6)])
    pool = np.flatnonzero(np.asarray(valid)).tolist()
    epochs = [sorted(shown[7 * e: 7 * (e + 1)].tolist()) for e in range(4)]
    assert epochs == [pool] * 4
    assert len({tuple(shown[7 * e: 7 * (e + 1)]) for e in range(4)}) > 1  # fresh orders
    first = np.asarray(valid_first_order(jax.random.key(0), valid))
    assert sorted(first[:7].tolist()) == pool and sorted(first.tolist()) == list(range(12))


def test_a_given_data_dir_is_the_only_place_searched_and_is_recorded(tmp_path, monkeypatch):
    from spectral_plasticity.tasks import data_source, idx

    monkeypatch.setattr(idx, "cache_dir", lambda: tmp_path / "cache")
    with pytest.raises(DataError, match=r"mnist not found in the given data_dir .*nowhere"):
        make_stream("permuted_mnist", data_dir=tmp_path / "nowhere", num_tasks=2)
    with pytest.raises(DataError, match=r"CIFAR-100 not found in the given data_dir"):
        make_stream("relabeled_cifar100", data_dir=tmp_path / "nowhere", num_tasks=2)
    assert data_source("slowly_changing_regression") == "generated"
    assert data_source("permuted_mnist", str(tmp_path / "given")) == str(tmp_path / "given")
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    assert data_source("permuted_mnist") == str(tmp_path / "cache" / "mnist")  # to download
    mnist_dir = (tmp_path / "cache" / "mnist")
    mnist_dir.mkdir(parents=True)
    for filename in FILES.values():
        (mnist_dir / filename).write_bytes(b"")
    monkeypatch.setenv(idx.ENV_VAR, str(tmp_path / "env"))
    assert data_source("permuted_mnist") == str(tmp_path / "cache" / "mnist")  # found there
