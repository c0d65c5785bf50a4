"""The dead-unit rank bound against the exact Hessian of networks with units forced dead."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature.dead_units import dead_unit_bound, dead_units
from spectral_plasticity.models import MLP, ConvNet, ResNet18


def _exact_hessian(model, params, inputs, labels):
    """Dense float64 Hessian of the mean cross-entropy, flattened like ``ravel_pytree``."""
    with jax.enable_x64(True):
        params64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
        flat, unravel = ravel_pytree(params64)

        def loss(f, x):
            logits = model.apply({"params": unravel(f)}, x)[0]
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

        return np.asarray(jax.jit(jax.hessian(loss))(flat, np.asarray(inputs, np.float64)))


# Compiled (eager flax compiles every operation on first use); the model is static.
bound_of = jax.jit(dead_unit_bound, static_argnums=0, static_argnames="chunk_size")


def _init(model, inputs):
    """Params with ``model.init``'s shapes, drawn with numpy (nothing to compile): kernels
    ``N(0, 2 / fan_in)`` (He), biases ``N(0, 0.1^2)``."""
    rng = np.random.default_rng(2)

    def draw(path, leaf):
        fan_in = np.prod(leaf.shape[:-1]) if path[-1].key == "kernel" else 200.0
        return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)

    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
    return jax.tree_util.tree_map_with_path(draw, shapes)


def _data(seed, shape, classes):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=shape), jnp.float32),
            jnp.asarray(rng.integers(0, classes, shape[0]), jnp.int32))


def _kill(params, layer, units):
    """Bias -100 on ``units`` of ``layer``: their pre-activations are negative on any input."""
    bias = params[layer]["bias"].at[jnp.asarray(units)].set(-100.0)
    return {**params, layer: {**params[layer], "bias": bias}}


def _check_bound(model, params, inputs, labels, forced):
    bound = bound_of(model, params, inputs, chunk_size=7)
    for layer, units in forced.items():
        assert np.all(np.asarray(bound.dead[layer])[units]), layer
    hessian = _exact_hessian(model, params, inputs, labels)
    removed = np.asarray(ravel_pytree(bound.removed)[0], bool)
    assert removed.sum() == int(bound.num_removed) > 0
    # Every removed parameter has an exactly zero Hessian row (and, by symmetry, column).
    assert np.all(hessian[removed] == 0.0)
    rank = np.linalg.matrix_rank(hessian, hermitian=True)
    assert rank <= int(bound.rank_bound) == hessian.shape[0] - removed.sum()
    return bound, rank


def test_mlp_hessian_rank_is_at_most_the_dead_unit_bound():
    model = MLP(hidden_sizes=(6, 5), num_outputs=3, activation="relu")
    inputs, labels = _data(0, (20, 4), 3)
    params = _init(model, inputs)
    params = _kill(_kill(params, "hidden_0", [1, 4]), "hidden_1", [2])
    forced = {"hidden_0": [1, 4], "hidden_1": [2]}
    bound, _ = _check_bound(model, params, inputs, labels, forced)
    # The union of removed parameters, counted layer by layer from the alive units.
    alive0 = 6 - int(np.sum(bound.dead["hidden_0"]))
    alive1 = 5 - int(np.sum(bound.dead["hidden_1"]))
    expected = ((4 * 6 - 4 * alive0) + (6 - alive0) + (6 * 5 - alive0 * alive1) + (5 - alive1)
                + (5 * 3 - alive1 * 3))
    assert int(bound.num_removed) == expected
    assert int(bound.num_dead) == (6 - alive0) + (5 - alive1)
    assert int(bound.num_params) == 4 * 6 + 6 + 6 * 5 + 5 + 5 * 3 + 3


def test_convnet_bound_follows_channels_through_the_flatten():
    model = ConvNet(num_outputs=2, conv_channels=(1, 3), conv_kernel_sizes=(3, 3),
                    hidden_sizes=(3,))
    inputs, labels = _data(0, (6, 14, 14, 1), 2)  # 14 -> 12 -> 6 -> 4 -> 2
    params = _init(model, inputs)
    params = _kill(params, "conv_1", [1])
    bound, _ = _check_bound(model, params, inputs, labels, {"conv_1": [1]})
    # Channel 1 of conv_1 feeds rows 1, 4, 7, 10 of the dense kernel (2 x 2 x 3 flattened).
    rows = np.asarray(bound.removed["hidden_0"]["kernel"]).all(axis=1)
    assert set(np.flatnonzero(rows)) >= {1, 4, 7, 10}


def test_dead_units_of_a_partial_last_chunk_match_a_direct_count():
    """11 examples in chunks of 4 (the last one padded with copies): the dead units are those
    whose feature is 0 on every example, counted directly."""
    model = MLP(hidden_sizes=(8, 8), num_outputs=2, activation="relu")
    inputs, _ = _data(0, (11, 3), 2)
    params = _init(model, inputs)
    # Shift biases so that some units are dead on these 11 examples and others are not.
    params = {**params, "hidden_0": {**params["hidden_0"],
                                     "bias": params["hidden_0"]["bias"] - 1.5}}
    features = jax.jit(model.apply)({"params": params}, inputs)[1]
    units = jax.jit(dead_units, static_argnums=0, static_argnames="chunk_size")
    dead = units(model, params, inputs, chunk_size=4)
    for layer in ("hidden_0", "hidden_1"):
        expected = np.all(np.asarray(features[layer]) == 0, axis=0)
        np.testing.assert_array_equal(dead[layer], expected, err_msg=layer)
    assert 0 < int(np.sum(dead["hidden_0"])) < 8


@pytest.mark.parametrize("model", [MLP(hidden_sizes=(3,), num_outputs=2, activation="tanh"),
                                   MLP(hidden_sizes=(3,), num_outputs=2, layer_norm=True),
                                   ResNet18(num_outputs=2, stage_channels=(2,))])
def test_dead_unit_bound_rejects_unsupported_models(model):
    with pytest.raises(ValueError, match="dead-unit bound"):
        dead_unit_bound(model, {}, jnp.ones((2, 4, 4, 3)))
