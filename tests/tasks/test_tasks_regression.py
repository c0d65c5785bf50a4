"""Slowly-changing regression against hand-computed LTUs and Dohare et al.'s target network."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.tasks import SlowlyChangingRegression
from spectral_plasticity.tasks.regression import TargetNetwork, ltu_thresholds, target_output


def numpy_fix_ltu_net(weight, bias, out_weight, out_bias, x, beta):
    """Dohare et al.'s ``FixLTUNet.predict`` in NumPy, their layout: ``weight`` (features, m)."""
    m = weight.shape[1]
    s = (m - weight.sum(axis=1) + bias) / 2  # lop/nets/fix_ltu_net.py: S
    tau = beta * (m + 1) - s
    features = (x @ weight.T + bias > tau).astype(np.float64)  # lop/utils/ltu.py: inp > tau
    return features @ out_weight + out_bias


def test_ltu_thresholds_and_outputs_by_hand():
    # Unit 0: 20 weights +1, bias -1: S = (20 - 20 - 1) / 2 = -0.5, tau = 0.7 * 21 + 0.5 = 15.2.
    # Unit 1: 12 weights +1, 8 weights -1, bias +1: S = (20 - 4 + 1) / 2 = 8.5, tau = 6.2.
    w1 = np.ones((20, 2), np.float32)
    w1[12:, 1] = -1
    b1 = np.array([-1.0, 1.0], np.float32)
    tau = ltu_thresholds(jnp.asarray(w1), jnp.asarray(b1), 0.7)
    np.testing.assert_allclose(tau, [15.2, 6.2], rtol=1e-6)
    net = TargetNetwork(jnp.asarray(w1), jnp.asarray(b1), jnp.array([2.0, -1.0]),
                        jnp.array(1.0), tau)
    x = np.zeros((3, 20), np.float32)
    x[0, :15] = 1  # unit 0: 15 - 1 = 14 < 15.2, off; unit 1: 12 - 3 + 1 = 10 > 6.2, on
    x[1, :17] = 1  # unit 0: 16 > 15.2, on; unit 1: 12 - 5 + 1 = 8 > 6.2, on
    x[2, 6:] = 1  # unit 0: 13, off; unit 1: 6 - 8 + 1 = -1, off
    # y = 2 h0 - h1 + 1. (Counting the bias's -1 as a negative weight instead would give
    # unit 0 tau = 13.7, so x[0] would fire it: y = 2 instead of 0.)
    np.testing.assert_allclose(target_output(net, jnp.asarray(x))[:, 0], [0.0, 2.0, 1.0])


def test_targets_follow_dohare_target_network():
    stream = SlowlyChangingRegression(num_tasks=10, flip_after=200, eval_size=64)

    @jax.jit
    def draw(key):
        task = stream.begin_task(key, jnp.int32(1))
        return task.target, stream.train_batch(task, jnp.int32(3), 200), stream.eval_data(task)

    target, train, held_out = draw(jax.random.key(11))
    net = jax.tree.map(np.asarray, target)
    for array in (net.w1, net.b1, net.w2, net.b2):
        assert set(np.unique(array).tolist()) <= {-1.0, 1.0}
    assert net.w1.shape == (20, 100) and len(np.unique(net.w1)) == 2
    for x, y in (train, held_out):
        expected = numpy_fix_ltu_net(net.w1.T, net.b1, net.w2, net.b2, np.asarray(x), 0.7)
        np.testing.assert_allclose(np.asarray(y)[:, 0], expected)
    assert len(np.unique(train[1])) > 1  # the thresholds are not all on or all off


def test_one_slow_bit_flips_per_task_fast_bits_are_fresh_and_eval_enumerates_them():
    stream = SlowlyChangingRegression(num_tasks=200, flip_after=100, eval_size=64)

    @jax.jit
    def draw(key):
        task = stream.begin_task(key, jnp.int32(7))
        slow = jax.vmap(stream.slow_bits, (None, 0))(key, jnp.arange(200))
        return slow, stream.train_batch(task, jnp.int32(0), 100)[0], stream.eval_data(task)[0]

    slow, x, ex = map(np.asarray, draw(jax.random.key(5)))
    flipped = []
    for a, b in itertools.pairwise(slow):
        changed = np.flatnonzero(a != b)
        assert len(changed) == 1  # exactly one bit flips at each new task
        flipped.append(int(changed[0]))
    counts = np.bincount(flipped, minlength=15)  # the flipped bit is uniform over the 15
    assert counts.min() > 2 and counts.max() < 30
    assert set(np.unique(x).tolist()) <= {0.0, 1.0}
    assert (x[:, :15] == slow[7]).all()  # slow bits constant within a task
    assert abs(x[:, 15:].mean() - 0.5) < 0.1 and len({tuple(r) for r in x[:, 15:]}) > 20
    patterns = [tuple(r) for r in ex[:, 15:]]
    assert (ex[:, :15] == slow[7]).all()
    assert sorted(patterns[:32]) == sorted(itertools.product((0.0, 1.0), repeat=5))
    assert patterns[32:] == patterns[:32]  # 64 = every fast-bit setting twice


def test_redraw_mode_and_bad_arguments():
    stream = SlowlyChangingRegression(num_tasks=60, flip_after=10, flip_one=False)
    slow = np.asarray(jax.jit(jax.vmap(stream.slow_bits, (None, 0)))(jax.random.key(0),
                                                                       jnp.arange(60)))
    distances = (slow[1:] != slow[:-1]).sum(-1)
    assert 6 < distances.mean() < 9  # independent redraws differ in 7.5 bits on average
    assert stream.eval_size == 1024  # 32 passes over the 32 fast-bit settings
    with pytest.raises(ValueError, match="at most 20 fast bits"):
        SlowlyChangingRegression(num_inputs=40, num_slow_bits=15)
    with pytest.raises(ValueError, match="must be positive"):
        SlowlyChangingRegression(flip_after=0)


def test_the_paper_scale_experiment_is_dohares_published_protocol():
    # lop/slowly_changing_regression/cfg/sgd/bp/relu.json and cfg/flip_one/relu.json
    # (github.com/shibhansh/loss-of-plasticity): 1e6 examples, flip_after 10000, 20 inputs of
    # which 15 flip (one at a time), 100 target features, beta 0.7, 5 ReLU features, SGD step
    # size 0.01, one example per step.
    from spectral_plasticity import experiment
    from spectral_plasticity.train.supervised import _stream

    config = experiment.load_config("slowly_changing_regression", "paper")
    stream = _stream(config)
    assert stream.num_tasks * stream.train_size == 1_000_000 and stream.train_size == 10_000
    assert (stream.input_shape, stream.num_slow_bits, stream.num_target_features,
            stream.beta, stream.flip_one) == ((20,), 15, 100, 0.7, True)
    assert tuple(config.model.hidden_sizes) == (5,) and config.model.activation == "relu"
    assert dict(config.optimizer) == {"name": "sgd", "learning_rate": 0.01}
    assert config.batch_size == 1 and config.plots.performance == "train_loss"
