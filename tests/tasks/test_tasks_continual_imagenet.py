"""Continual ImageNet on small files in Dohare et al.'s per-class format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.tasks import (
    ContinualImageNet,
    DataError,
    idx,
    load_continual_imagenet,
    make_stream,
)

CLASSES = 5  # odd, so a class pair wraps around the end of the run's class order


def test_files_are_read_back_exactly_channels_last(imagenet_dir, tmp_path, monkeypatch):
    root, arrays = imagenet_dir
    images = load_continual_imagenet(root)
    assert images.shape == (CLASSES, 700, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, arrays.transpose(0, 1, 3, 4, 2))
    # The environment variable's location, holding classes/ itself.
    monkeypatch.setenv(idx.ENV_VAR, str(tmp_path))
    (tmp_path / "continual_imagenet").symlink_to(root / "classes")
    np.testing.assert_array_equal(load_continual_imagenet(num_classes=2), images[:2])


def test_missing_truncated_and_misshapen_files_are_clear_errors(imagenet_dir, tmp_path,
                                                                monkeypatch):
    root, _ = imagenet_dir
    monkeypatch.delenv(idx.ENV_VAR, raising=False)
    how = r"drive.google.com/file/d/1i0ok3LT5_mYmFWaN7wlkpHsitUngGJ8z.*gdown"
    with pytest.raises(DataError, match=f"no data_dir given and .* not set; download .*{how}"):
        make_stream("continual_imagenet")
    with pytest.raises(DataError, match=f"no class files .* in .*; download .*{how}"):
        load_continual_imagenet(tmp_path)
    with pytest.raises(DataError, match="6 classes asked for but .*5.npy is missing"):
        load_continual_imagenet(root, num_classes=6)
    bad = tmp_path / "bad" / "classes"
    bad.mkdir(parents=True)
    np.save(bad / "0.npy", np.zeros((700, 3, 32, 32), np.uint8))
    np.save(bad / "1.npy", np.zeros((600, 3, 32, 32), np.uint8))
    with pytest.raises(DataError, match=r"1.npy holds a uint8 array of shape \(600, 3, 32, 32\)"):
        load_continual_imagenet(bad)
    np.save(bad / "1.npy", np.zeros((700, 3, 32, 32), np.uint8))
    raw = (bad / "1.npy").read_bytes()
    (bad / "1.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="1.npy is unreadable or truncated"):
        load_continual_imagenet(bad)


def test_tasks_are_class_pairs_trained_epoch_by_epoch_with_a_head_reset(imagenet_dir):
    root, arrays = imagenet_dir
    stream = make_stream("continual_imagenet", data_dir=root, num_tasks=6, epochs_per_task=2)
    assert (stream.train_size, stream.eval_size, stream.num_outputs) == (2400, 200, 2)
    assert stream.reset_head and stream.input_shape == (32, 32, 3)
    assert stream.check_batch_size(100) == 24
    with pytest.raises(ValueError, match="batch_size 2400 exceeds the 1200 training images"):
        stream.check_batch_size(2400)
    key = jax.random.key(2)
    order = np.asarray(stream.class_order(key))
    assert sorted(order.tolist()) == list(range(CLASSES))
    # Task t is the pair order[2t], order[2t + 1] of the order repeated (Dohare et al.).
    repeated = np.concatenate([order] * 3)
    tasks = jax.jit(jax.vmap(stream.begin_task, (None, 0)))(key, jnp.arange(5))
    for t in range(5):
        np.testing.assert_array_equal(tasks.classes[t], repeated[2 * t: 2 * t + 2])
    per_class = arrays.transpose(0, 1, 3, 4, 2)  # (C, 700, 32, 32, 3)
    rows = {per_class[c, i].tobytes(): (c, i) for c in range(CLASSES) for i in range(700)}
    batch = jax.jit(stream.train_batch, static_argnums=2)
    task = jax.tree.map(lambda a: a[2], tasks)  # the pair that wraps around: order[4], order[0]
    a, b = np.asarray(task.classes).tolist()
    shown = []
    for step in range(4):  # 4 batches of 600: two epochs of the pair's 1,200 images
        x, y = batch(task, jnp.int32(step), 600)
        sources = [rows[p.tobytes()] for p in np.rint(np.asarray(x) * 255).astype(np.uint8)]
        assert [(a, b)[label] for label in np.asarray(y).tolist()] == [c for c, _ in sources]
        assert all(i < 600 for _, i in sources)  # training images only
        shown += sources
    epoch = sorted((c, i) for c in (a, b) for i in range(600))
    assert sorted(shown[:1200]) == epoch and sorted(shown[1200:]) == epoch
    assert shown[:1200] != shown[1200:]  # each epoch in a fresh order
    # Eval: the pair's 100 test images each, interleaved so every prefix is balanced.
    ex, ey = stream.eval_data(task)
    np.testing.assert_array_equal(ey, np.tile([0, 1], 100))
    expected = np.stack([per_class[(a, b)[i % 2], 600 + i // 2] for i in range(200)])
    np.testing.assert_allclose(np.asarray(ex) * 255, expected, atol=1e-3)
    np.testing.assert_array_equal(stream.output_mask(task), [True, True])
    other = np.asarray(stream.class_order(jax.random.key(3)))
    assert not np.array_equal(other, order)  # another run, another class order


def test_pixel_scale_and_bad_arguments(imagenet_dir):
    root, _ = imagenet_dir
    images = load_continual_imagenet(root, num_classes=3)
    raw = ContinualImageNet(images, num_tasks=1, pixel_scale=1.0)  # the references' inputs
    assert raw.train_size == 20 * 1200  # the paper's code: 20 epochs per task
    x, _ = raw.eval_data(raw.begin_task(jax.random.key(0), 0))
    assert float(x.max()) > 200 and np.isin(np.asarray(x), np.arange(256)).all()
    floats = ContinualImageNet(images.astype(np.float32) / 255, num_tasks=1)
    assert floats.pixel_scale == 1.0
    with pytest.raises(ValueError, match=r"classes_per_task=4 must lie in \[1, 3\]"):
        ContinualImageNet(images, classes_per_task=4)
    with pytest.raises(ValueError, match="must be positive"):
        ContinualImageNet(images, epochs_per_task=0)
    with pytest.raises(ValueError, match=r"images must be \(classes, 700, 32, 32, 3\)"):
        ContinualImageNet(images[:, :600])
