"""Models: features equal a direct computation, initializers follow their formulas, the
conv -> dense unit convention of ``unit_layers`` holds, and bad configurations are refused."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.models import (
    MLP,
    ConvNet,
    ResNet18,
    hidden_layer_names,
    unit_layers,
)


def test_mlp_features_match_direct_computation():
    model = MLP(hidden_sizes=(7, 5), num_outputs=3)
    x = jax.random.normal(jax.random.key(1), (4, 2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    out, features = model.apply({"params": params}, x)
    h = np.asarray(x).reshape(4, -1)
    for name in ("hidden_0", "hidden_1"):
        h = np.maximum(h @ np.asarray(params[name]["kernel"]) + np.asarray(params[name]["bias"]), 0)
        np.testing.assert_allclose(features[name], h, rtol=1e-5, atol=1e-6)
    expected = h @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_mlp_layer_norm_precedes_activation():
    model = MLP(hidden_sizes=(6,), num_outputs=2, layer_norm=True)
    x = jax.random.normal(jax.random.key(1), (3, 4))
    params = model.init(jax.random.key(0), x)["params"]
    _, features = model.apply({"params": params}, x)
    pre = np.asarray(x) @ np.asarray(params["hidden_0"]["kernel"])
    pre = (pre - pre.mean(-1, keepdims=True)) / np.sqrt(pre.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(features["hidden_0"], np.maximum(pre, 0), rtol=1e-4, atol=1e-5)


def test_kaiming_uniform_bounds_and_variance():
    fan_in, width = 784, 1000
    params = MLP(hidden_sizes=(width,), num_outputs=10).init(
        jax.random.key(0), jnp.zeros((1, fan_in))
    )["params"]
    kernel = np.asarray(params["hidden_0"]["kernel"])
    bound = np.sqrt(6.0 / fan_in)
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound
    # Var of U(-b, b) is b^2 / 3 = 2 / fan_in; 784k samples give ~0.2% relative error.
    np.testing.assert_allclose(kernel.var(), 2.0 / fan_in, rtol=0.02)
    np.testing.assert_array_equal(params["hidden_0"]["bias"], 0.0)


def test_lecun_uniform_option():
    params = MLP(hidden_sizes=(256,), num_outputs=1, kernel_init="lecun_uniform").init(
        jax.random.key(0), jnp.zeros((1, 27))
    )["params"]
    kernel = np.asarray(params["hidden_0"]["kernel"])
    assert np.abs(kernel).max() <= np.sqrt(3.0 / 27)
    np.testing.assert_allclose(kernel.var(), 1.0 / 27, rtol=0.05)


def test_convnet_shapes_follow_the_reference():
    model = ConvNet(num_outputs=2)
    x = jnp.zeros((2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    out, features = model.apply({"params": params}, x)
    assert out.shape == (2, 2)
    assert features["conv_0"].shape == (2, 14, 14, 32)
    assert features["conv_1"].shape == (2, 6, 6, 64)
    assert features["conv_2"].shape == (2, 2, 2, 128)
    assert params["hidden_0"]["kernel"].shape == (512, 128)
    assert list(features) == hidden_layer_names(model)


def test_convnet_as_the_papers_code_keeps_the_size_and_has_a_2048_wide_flatten():
    """lop-jax imagenet/models.py: flax defaults, SAME padding and LeCun-normal kernels."""
    model = ConvNet(num_outputs=2, padding="SAME", kernel_init="lecun_normal")
    x = jnp.zeros((2, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    _, features = model.apply({"params": params}, x)
    assert features["conv_0"].shape == (2, 16, 16, 32)
    assert features["conv_1"].shape == (2, 8, 8, 64)
    assert features["conv_2"].shape == (2, 4, 4, 128)
    kernel = np.asarray(params["hidden_0"]["kernel"])
    assert kernel.shape == (4 * 4 * 128, 128)
    # LeCun normal: variance 1 / fan_in (a truncated normal rescaled to it); 262,144 draws.
    np.testing.assert_allclose(kernel.var(), 1.0 / 2048, rtol=0.02)
    assert np.abs(kernel).max() <= 2.0 * np.sqrt(1.0 / 2048) / 0.87962566  # truncated at 2 std
    with pytest.raises(ValueError, match="padding must be 'VALID' or 'SAME'"):
        ConvNet(padding="CIRCULAR").init(jax.random.key(0), x)


def test_resnet_fc_head_with_layer_norm_feeds_the_classifier():
    """The paper's head: pool -> FC -> (LayerNorm) -> ReLU -> FC -> (LayerNorm) -> ReLU -> head."""
    model = ResNet18(num_outputs=5, stage_channels=(4, 8, 8, 8), head_hidden_sizes=(6, 7),
                     head_layer_norm=True)
    x = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
    variables = model.init(jax.random.key(0), x)
    (out, features), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    params = variables["params"]
    assert list(features) == hidden_layer_names(model)
    assert hidden_layer_names(model)[-3:] == ["pool", "hidden_0", "hidden_1"]
    h = features["pool"] @ params["hidden_0"]["kernel"] + params["hidden_0"]["bias"]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) / np.sqrt(var + 1e-6) * params["norm_0"]["scale"] + params["norm_0"]["bias"]
    np.testing.assert_allclose(features["hidden_0"], np.maximum(h, 0.0), atol=1e-5)
    expected = features["hidden_1"] @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="head_layer_norm needs fully connected head layers"):
        ResNet18(num_outputs=5, stage_channels=(4, 8, 8, 8), head_layer_norm=True).init(
            jax.random.key(0), x)


def test_conv_to_dense_unit_owns_rows_congruent_to_its_channel():
    """Unit c of conv_2 feeds exactly the rows i of hidden_0's kernel with i % C == c."""
    model = ConvNet(num_outputs=2)
    x = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    channels = 128
    unit = 5
    conv_out = model.apply({"params": params}, x)[1]["conv_2"]
    # A change in one channel only reaches the kernel rows that channel owns.
    mask = jnp.zeros_like(conv_out).at[..., unit].set(1.0)
    grad_kernel = jax.grad(lambda k: (mask.reshape((1, -1)) @ k).sum())(
        params["hidden_0"]["kernel"]
    )
    rows = np.nonzero(np.abs(np.asarray(grad_kernel)).sum(axis=1))[0]
    np.testing.assert_array_equal(rows % channels, unit)
    assert len(rows) == 2 * 2


def test_unit_layers_chain_to_the_head():
    assert unit_layers(MLP(hidden_sizes=(3, 4), num_outputs=2)) == [
        ("hidden_0", "hidden_1"),
        ("hidden_1", "head"),
    ]
    pairs = unit_layers(ConvNet())
    assert pairs[2] == ("conv_2", "hidden_0") and pairs[-1] == ("hidden_1", "head")
    with pytest.raises(ValueError, match="MLP, ConvNet and a ResNet18 with fully connected"):
        unit_layers(ResNet18())
    assert unit_layers(ResNet18(head_hidden_sizes=(6, 7))) == [
        ("hidden_0", "hidden_1"),
        ("hidden_1", "head"),
    ]


@pytest.mark.slow
def test_resnet18_has_the_standard_parameter_count_and_features():
    model = ResNet18(num_outputs=100)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(shapes["params"]))
    # CIFAR ResNet-18: 11,173,962 parameters with a 10-way head; 100 classes add 512*90 + 90.
    assert num_params == 11_173_962 + 512 * 90 + 90
    small = ResNet18(num_outputs=5, stage_channels=(4, 8, 8, 8))
    x = jnp.ones((2, 16, 16, 3))
    variables = small.init(jax.random.key(0), x)
    (out, features), state = small.apply(variables, x, train=True, mutable=["batch_stats"])
    assert out.shape == (2, 5) and list(features) == hidden_layer_names(small)
    assert features["block_3_1"].shape == (2, 2, 2, 8)
    np.testing.assert_allclose(features["pool"], features["block_3_1"].mean(axis=(1, 2)),
                               rtol=1e-6)
    assert "batch_stats" in state


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (MLP(hidden_sizes=(4,), num_outputs=2, activation="relux"), "unknown activation"),
        (MLP(hidden_sizes=(4,), num_outputs=2, kernel_init="xavier"), "unknown initializer"),
        (MLP(hidden_sizes=(0,), num_outputs=2), "must be positive"),
        (ConvNet(conv_channels=(4, 4), conv_kernel_sizes=(3,)), "same length"),
    ],
)
def test_bad_configuration_is_refused(module: nn.Module, match: str):
    x = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), x)
