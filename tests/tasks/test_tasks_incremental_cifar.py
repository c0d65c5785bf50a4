"""Class-incremental CIFAR-100 on a small archive with the real ``cifar-100-python`` layout."""

import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.tasks import DataError, IncrementalCIFAR, cifar, load_cifar100, make_stream
from spectral_plasticity.tasks.incremental_cifar import MEAN, STD, augment_image


def _images(batch):
    """The reference decoding: rows of 1024 R, 1024 G, 1024 B values -> (N, 32, 32, 3)."""
    data = batch[b"data"]
    return np.stack([data[:, c * 1024:(c + 1) * 1024].reshape(-1, 32, 32) for c in range(3)], -1)


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No environment data directory and an empty cache: only data_dir is searched."""
    monkeypatch.delenv("SPECTRAL_PLASTICITY_DATA", raising=False)
    monkeypatch.setattr(cifar, "cache_dir", lambda: tmp_path / "cache")
    return tmp_path


def test_archive_and_folder_are_read_back_exactly_and_checked(cifar_archive, cifar_writer,
                                                              isolated, monkeypatch):
    root, train, test = cifar_archive
    data = load_cifar100(root, verify=False, download=False)
    np.testing.assert_array_equal(data.train_images, _images(train))
    np.testing.assert_array_equal(data.train_labels, train[b"fine_labels"])
    np.testing.assert_array_equal(data.test_images, _images(test))
    np.testing.assert_array_equal(data.test_labels, test[b"fine_labels"])
    # This archive is not the published one: a clear error ...
    with pytest.raises(DataError, match="cifar-100-python.tar.gz has md5 .* not the published "
                                        "eb9058c3a382ffc7106e4002c42a8d85"):
        load_cifar100(root, download=False)
    # ... and with its checksum registered it loads through the verifying path.
    blob = (root / "cifar-100-python.tar.gz").read_bytes()
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    np.testing.assert_array_equal(load_cifar100(root, download=False).test_images,
                                  data.test_images)
    # The extracted folder is checked member by member.
    folder = isolated / "folder"
    folder_train, _ = cifar_writer(folder, seed=1, extracted=True)
    np.testing.assert_array_equal(load_cifar100(folder, verify=False).train_images,
                                  _images(folder_train))
    with pytest.raises(DataError, match="cifar-100-python/train has md5 .* not the published"):
        load_cifar100(folder)


def test_truncated_missing_and_undownloadable_data_are_clear_errors(cifar_archive, cifar_writer,
                                                                    isolated, monkeypatch):
    root, *_ = cifar_archive
    cut = isolated / "cut"
    cut.mkdir()
    blob = (root / "cifar-100-python.tar.gz").read_bytes()
    (cut / "cifar-100-python.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="not a complete CIFAR-100 python archive"):
        load_cifar100(cut, verify=False, download=False)
    folder = isolated / "folder"
    cifar_writer(folder, extracted=True)
    raw = (folder / "cifar-100-python" / "test").read_bytes()
    (folder / "cifar-100-python" / "test").write_bytes(raw[:1000])
    with pytest.raises(DataError, match="test file is not a readable CIFAR pickle"):
        load_cifar100(folder, verify=False)
    with pytest.raises(DataError, match=r"CIFAR-100 not found in the given data_dir .*empty "
                                        r"\(config stream.data_dir.*curl -O https://www.cs.to"):
        load_cifar100(isolated / "empty", download=False)
    monkeypatch.setattr(cifar, "URL", "http://127.0.0.1:9/cifar-100-python.tar.gz")
    with pytest.raises(DataError, match="not found and could not be downloaded .*"
                                        "SPECTRAL_PLASTICITY_DATA/cifar100"):
        make_stream("incremental_cifar100")  # the default places: a download is tried
    assert not (isolated / "cache" / "cifar100" / "cifar-100-python.tar.gz").exists()


def test_increments_train_on_the_seen_classes_epoch_by_epoch(cifar_archive, isolated,
                                                            monkeypatch):
    root, train, test = cifar_archive
    blob = (root / "cifar-100-python.tar.gz").read_bytes()
    monkeypatch.setattr(cifar, "ARCHIVE_MD5", hashlib.md5(blob).hexdigest())
    stream = make_stream("incremental_cifar100", data_dir=root, train_per_class=3,
                         train_size=90, eval_size=25, augment=False)
    assert (stream.num_tasks, stream.num_outputs, stream.input_shape) == (20, 100, (32, 32, 3))
    assert not stream.reset_head and stream.loss == "cross_entropy"
    key = jax.random.key(4)
    order = np.asarray(stream.class_order(key))
    assert sorted(order.tolist()) == list(range(100))
    train_images, train_labels = _images(train), np.asarray(train[b"fine_labels"])
    test_images, test_labels = _images(test), np.asarray(test[b"fine_labels"])
    # train_per_class=3 keeps the last 3 of each class's 4 images, in data-set order.
    kept = np.concatenate([np.flatnonzero(train_labels == c)[1:] for c in range(100)])
    rows = {train_images[i].tobytes(): i for i in kept}
    test_rows = {image.tobytes(): i for i, image in enumerate(test_images)}
    batch = jax.jit(stream.train_batch, static_argnums=2)
    previous = np.zeros(100, bool)
    for t in (0, 1, 19):
        task = stream.begin_task(key, jnp.int32(t))
        seen = np.zeros(100, bool)
        seen[order[: 5 * (t + 1)]] = True
        np.testing.assert_array_equal(stream.output_mask(task), seen)
        assert (previous <= seen).all()
        previous = seen
        pool = 15 * (t + 1)  # 5 (t + 1) classes x 3 kept training images
        shown = []
        for step in range(6):
            x, y = batch(task, jnp.int32(step), 15)
            pixels = np.rint((np.asarray(x) * STD + MEAN) * 255).astype(np.uint8)
            sources = [rows[p.tobytes()] for p in pixels]  # only kept images appear
            np.testing.assert_array_equal(y, train_labels[sources])
            shown += sources
        assert seen[train_labels[shown]].all()
        for epoch in range(90 // pool):  # every full epoch shows the pool once
            assert sorted(shown[epoch * pool:(epoch + 1) * pool]) == sorted(
                i for i in kept if seen[train_labels[i]])
        assert len(set(shown[:pool])) == min(pool, 90)
        if t == 0:
            assert shown[:15] != shown[15:30]  # each epoch in a fresh order
        # Eval: the seen classes' test images, a random order cycled to eval_size.
        ex, ey = stream.eval_data(task)
        pixels = np.rint((np.asarray(ex) * STD + MEAN) * 255).astype(np.uint8)
        sources = [test_rows[p.tobytes()] for p in pixels]
        np.testing.assert_array_equal(ey, test_labels[sources])
        assert seen[test_labels[sources]].all()
        assert len(set(sources)) == min(25, 10 * (t + 1))  # 2 test images per seen class
        if t == 0:  # a pool of 10 test images cycled to 25: each shown 2 or 3 times
            assert sorted(np.bincount(sources)[sorted(set(sources))].tolist()) == [2] * 5 + [3] * 5
    again = stream.begin_task(key, jnp.int32(1))
    np.testing.assert_array_equal(batch(again, jnp.int32(2), 15)[0],
                                  batch(stream.begin_task(key, 1), jnp.int32(2), 15)[0])
    assert not np.array_equal(order, stream.class_order(jax.random.key(5)))


def test_defaults_and_bad_arguments(cifar_archive):
    root, *_ = cifar_archive
    data = load_cifar100(root, verify=False, download=False)
    stream = IncrementalCIFAR(data, train_per_class=3)
    # The references' 200 epochs of 5 (t + 1) classes x 3 images, summed over the 20
    # increments and spread evenly: 200 * 15 * (1 + ... + 20) / 20 = 31,500 per increment.
    assert stream.train_size == 31_500 and stream.eval_size == 2000
    assert stream.check_batch_size(15) == 2100
    with pytest.raises(ValueError, match="batch_size 21 exceeds the 15 training images of the "
                                         "first increment"):
        IncrementalCIFAR(data, train_per_class=3, train_size=42).check_batch_size(21)
    small = IncrementalCIFAR(data, num_classes=10, num_tasks=2, train_per_class=2, train_size=20,
                             normalize=False)
    assert (small.num_outputs, small.num_tasks) == (10, 2)
    x, y = jax.jit(lambda key: small.eval_data(small.begin_task(key, 1)))(jax.random.key(0))
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and set(np.asarray(y)) <= set(range(10))
    # Augmented batches are the same examples with their pixels moved (flip, reflect-padded
    # crop, nearest-pixel rotation) or set to 0 (rotated in from outside).
    plain, augmented = (IncrementalCIFAR(data, train_per_class=3, train_size=30, augment=a)
                        for a in (False, True))
    task = plain.begin_task(jax.random.key(1), 0)
    (x, y), (xa, ya) = (jax.jit(s.train_batch, static_argnums=2)(task, 1, 15)
                        for s in (plain, augmented))
    np.testing.assert_array_equal(y, ya)
    assert not np.allclose(x, xa)
    pixels = lambda z: np.rint((np.asarray(z) * STD + MEAN) * 255).astype(int).reshape(15, -1, 3)
    fill = tuple(np.rint(np.array(MEAN) * 255).astype(int).tolist())  # a 0 after normalizing
    for image, moved in zip(pixels(x), pixels(xa), strict=True):
        allowed = {tuple(p) for p in image.tolist()} | {fill}
        assert {tuple(p) for p in moved.tolist()} <= allowed
    with pytest.raises(ValueError, match="classes_per_task=3 must divide the 100 classes"):
        IncrementalCIFAR(data, classes_per_task=3, train_per_class=3)
    with pytest.raises(ValueError, match="class .* has 4 images, fewer than the 5 asked for"):
        IncrementalCIFAR(data, train_per_class=5)
    with pytest.raises(ValueError, match=r"num_tasks must lie in \[1, 20\]"):
        IncrementalCIFAR(data, num_tasks=21, train_per_class=3)


def test_augmentation_against_numpy_flips_crops_and_rotations():
    image = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)), mode="reflect")
    # No flip, crop at the centre, no rotation: the identity.
    np.testing.assert_array_equal(augment_image(image, False, 4, 4, 0.0), image)
    # Flip, then the crop at offset (1, 7) of the reflect-padded flipped image.
    flipped = np.pad(image[:, ::-1], ((4, 4), (4, 4), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(augment_image(image, True, 1, 7, 0.0), flipped[1:33, 7:39])
    np.testing.assert_array_equal(augment_image(image, False, 8, 0, 0.0), padded[8:40, 0:32])
    # A quarter turn counter-clockwise is np.rot90 exactly (nearest pixel, no fill needed).
    np.testing.assert_allclose(augment_image(image, False, 4, 4, math.pi / 2),
                               np.rot90(image, 1, axes=(0, 1)), atol=0)
    # A small turn keeps the centre pixel and fills corners that come from outside with 0.
    small = np.asarray(augment_image(image, False, 4, 4, math.radians(15)))
    np.testing.assert_array_equal(small[16, 16], image[16, 16])
    assert (small[0, 0] == 0).all() and (small[31, 31] == 0).all()
