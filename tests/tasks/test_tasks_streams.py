"""Task streams and the IDX loader, on small generated files of the real format."""

import gzip
import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.tasks import (
    DataError,
    PermutedImages,
    RelabeledImages,
    SlowlyChangingRegression,
    load_idx_dataset,
    make_stream,
)
from spectral_plasticity.tasks.idx import FILES, SYSTEM_DIRS
from spectral_plasticity.tasks.regression import target_output


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


@pytest.mark.skipif(not (SYSTEM_DIRS["fashion_mnist"] / FILES["train_images"]).exists(),
                    reason="real Fashion-MNIST skipped: `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist_from_the_debian_package():
    data = load_idx_dataset("fashion_mnist", download=False)
    assert data.train_images.shape == (60000, 28, 28) and data.test_images.shape == (10000, 28, 28)
    assert np.bincount(data.train_labels).tolist() == [6000] * 10


def test_permuted_tasks_are_reproducible_permutations(tiny_idx):
    directory, arrays = tiny_idx
    data = load_idx_dataset("mnist", directory, download=False, verify=False)
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


def test_relabeled_tasks(tiny_idx):
    directory, arrays = tiny_idx
    data = load_idx_dataset("mnist", directory, download=False, verify=False)
    shuffled = RelabeledImages(data, mode="shuffled", name="s", num_tasks=3, train_size=50,
                               eval_size=20)
    task = shuffled.begin_task(jax.random.key(1), 2)
    x, y = shuffled.train_batch(task, 0, 50)
    index = np.asarray(task.example_order)
    np.testing.assert_array_equal(y, np.asarray(task.label_map)[arrays["train_labels"][index]])
    np.testing.assert_allclose(x, arrays["train_images"].reshape(50, 16)[index] / 255.0)
    random = RelabeledImages(data, mode="random", name="r", num_tasks=3, train_size=50,
                             eval_size=20)
    task = random.begin_task(jax.random.key(1), 0)
    _, y = random.train_batch(task, 0, 50)
    np.testing.assert_array_equal(y, task.random_labels)
    with pytest.raises(ValueError, match="mode must be"):
        RelabeledImages(data, mode="noisy", name="n", num_tasks=1, train_size=5)


def test_slowly_changing_regression_against_numpy():
    stream = SlowlyChangingRegression(num_tasks=30, flip_after=100, eval_size=64)
    key = jax.random.key(3)
    tasks = [stream.begin_task(key, t) for t in range(30)]
    target = tasks[0].target
    w1 = np.asarray(target.w1)
    assert set(np.unique(w1)) == {-1.0, 1.0}
    negatives = (w1 < 0).sum(0) + (np.asarray(target.b1) < 0)
    np.testing.assert_allclose(target.tau, 0.7 * 21 - negatives, rtol=1e-5)
    # One slow bit changes per task; the fast bits vary per example; targets follow the net.
    for a, b in itertools.pairwise(tasks):
        assert int(np.sum(np.asarray(a.slow_bits) != np.asarray(b.slow_bits))) == 1
        np.testing.assert_array_equal(a.target.w1, b.target.w1)
    x, y = stream.train_batch(tasks[4], jnp.asarray(2), 32)
    np.testing.assert_array_equal(x[:, :15], np.broadcast_to(tasks[4].slow_bits, (32, 15)))
    assert 1 < len({tuple(r) for r in np.asarray(x[:, 15:])})
    hidden = (np.asarray(x) @ w1 + np.asarray(target.b1) > np.asarray(target.tau))
    expected = hidden.astype(float) @ np.asarray(target.w2) + float(target.b2)
    np.testing.assert_allclose(y[:, 0], expected)
    np.testing.assert_allclose(target_output(target, x), y)
    ex, _ = stream.eval_data(tasks[4])
    assert ex.shape == (64, 20)


def test_make_stream_errors():
    with pytest.raises(ValueError, match="unknown stream 'permuted_cifar'"):
        make_stream("permuted_cifar")
    assert make_stream("slowly_changing_regression", num_tasks=2).num_tasks == 2
