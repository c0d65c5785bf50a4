"""Layer capture on unchanged models: features equal to our models' own, and nnx models giving
the same numbers as the same network written in linen, for every curvature piece."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from spectral_plasticity.curvature import (
    dataset_operator,
    kfac_factors,
    kfac_operator,
    layer_inputs,
    layer_operator,
    nnx_functional,
    spectral_density,
    top_eigenvalues,
)
from spectral_plasticity.methods import erank_gradient, spectral_reg
from spectral_plasticity.metrics import effective_rank
from spectral_plasticity.models import MLP, ConvNet

X = jax.random.normal(jax.random.key(1), (24, 6))
Y = jnp.arange(24) % 3
LINEN_MLP = MLP(hidden_sizes=(12, 10), num_outputs=3)
PARAMS = LINEN_MLP.init(jax.random.key(0), X)["params"]


def linen_apply(p, x):
    return LINEN_MLP.apply({"params": p}, x)


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


class NnxMLP(nnx.Module):
    """``MLP(hidden_sizes=(12, 10), num_outputs=3)`` in nnx, returning logits only."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden_0 = nnx.Linear(6, 12, rngs=rngs)
        self.hidden_1 = nnx.Linear(12, 10, rngs=rngs)
        self.head = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.hidden_1(nnx.relu(self.hidden_0(x)))))


class LinenConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="conv")(x))
        return nn.Dense(2, name="head")(h.reshape((x.shape[0], -1)))


class NnxConv(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 3, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.conv(x)).reshape((x.shape[0], -1)))


def _nnx_mlp():
    """The nnx MLP's apply_fn; run with the linen MLP's ``PARAMS`` (same structure)."""
    apply_fn, params = nnx_functional(NnxMLP(nnx.Rngs(0)))
    assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, PARAMS)
    return apply_fn


def _assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


# --------------------------------------------------------------------------------------------
# Captured features


def test_layer_inputs_are_the_features_our_mlp_returns_and_their_erank_gradient():
    features = linen_apply(PARAMS, X)[1]
    captured = layer_inputs(linen_apply, PARAMS, X)
    assert list(captured) == ["hidden_1", "head"]  # not the first layer's input (the data)
    _assert_same(captured, {"hidden_1": features["hidden_0"], "head": features["hidden_1"]})
    _assert_same(layer_inputs(linen_apply, PARAMS, X, layers="hidden_0"), {"hidden_0": X})
    ours = erank_gradient(lambda p: linen_apply(p, X)[1], PARAMS)
    theirs = erank_gradient(lambda p: layer_inputs(linen_apply, p, X), PARAMS)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 ours, theirs)


def test_conv_inputs_are_flattened_over_locations():
    model = ConvNet(num_outputs=2)
    x = jax.random.normal(jax.random.key(2), (3, 32, 32, 3))
    params = model.init(jax.random.key(0), x)["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    features = apply_fn(params, x)[1]
    captured = layer_inputs(apply_fn, params, x, layers=["conv_1", "conv_2"])
    for layer, previous in (("conv_1", "conv_0"), ("conv_2", "conv_1")):
        channels = features[previous].shape[-1]
        np.testing.assert_array_equal(captured[layer],
                                      features[previous].reshape((-1, channels)))
        np.testing.assert_allclose(effective_rank(captured[layer]),
                                   effective_rank(features[previous]), rtol=1e-6)


def test_layer_inputs_errors_name_what_was_searched_and_found():
    with pytest.raises(ValueError, match=r"no Dense or Conv layer: searched for nn\.Dense, "
                                         r"nn\.Conv \(linen\) and nnx\.Linear"):
        layer_inputs(lambda p, x: x @ p["w"], {"w": jnp.ones((6, 2))}, X)
    with pytest.raises(ValueError, match=r"unknown layers \['hidden_7'\]; the model's Dense and "
                                         r"Conv layers are \['head', 'hidden_0', 'hidden_1'\]"):
        layer_inputs(linen_apply, PARAMS, X, layers=["hidden_0", "hidden_7"])
    with pytest.raises(ValueError, match="layer 'head' needs features of 2 samples or more"):
        tx = spectral_reg(l2=0.0, erank=0.1)
        tx.update(PARAMS, tx.init(PARAMS), PARAMS,
                  features_fn=lambda p: layer_inputs(linen_apply, p, X[:1]))
    with pytest.raises(ValueError, match="2 samples or more"):
        effective_rank(jnp.ones((1, 5)))


# --------------------------------------------------------------------------------------------
# nnx against linen: the same network, the same numbers


def test_nnx_operators_and_spectra_equal_linen():
    nnx_apply = _nnx_mlp()
    _assert_same(nnx_apply(PARAMS, X), linen_apply(PARAMS, X)[0])
    ops = [dataset_operator(f, cross_entropy, PARAMS, (X, Y), kind="ggn", chunk_size=8)
           for f in (linen_apply, nnx_apply)]
    v = jax.random.normal(jax.random.key(3), (ops[0].dim,))
    _assert_same(ops[1].matvec(v), ops[0].matvec(v))
    top = [top_eigenvalues(op, k=3, key=jax.random.key(4), num_iters=20)[0] for op in ops]
    _assert_same(top[1], top[0])
    densities = [spectral_density(op, key=jax.random.key(5), num_iters=15, num_probes=2,
                                  grid_size=200) for op in ops]
    _assert_same(densities[1].density, densities[0].density)
    blocks = [layer_operator(f, PARAMS, (X, Y), cross_entropy, "hidden_1")
              for f in (linen_apply, nnx_apply)]
    _assert_same(blocks[1].matvec(v[: blocks[0].dim]), blocks[0].matvec(v[: blocks[0].dim]))


def test_nnx_spectral_reg_with_captured_features_equals_linen():
    nnx_apply = _nnx_mlp()
    tx = spectral_reg(l2=0.01, erank=0.1)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates = [tx.update(grads, tx.init(PARAMS), PARAMS,
                         features_fn=lambda p, f=f: layer_inputs(f, p, X))[0]
               for f in (linen_apply, nnx_apply)]
    _assert_same(updates[1], updates[0])
    # and the captured ER term is the one computed from the linen model's own features
    own = tx.update(grads, tx.init(PARAMS), PARAMS,
                    features_fn=lambda p: linen_apply(p, X)[1])[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 updates[1], own)


@pytest.mark.parametrize("mode", ["ggn", "empirical"])
def test_nnx_kfac_factors_equal_linen_dense_and_conv(mode):
    x = jax.random.normal(jax.random.key(6), (5, 8, 8, 2))
    y = jnp.arange(5) % 2
    linen_model = LinenConv()
    params = linen_model.init(jax.random.key(0), x)["params"]
    nnx_apply, nnx_params = nnx_functional(NnxConv(nnx.Rngs(0)))
    assert jax.tree.map(jnp.shape, nnx_params) == jax.tree.map(jnp.shape, params)
    linen = kfac_factors(lambda p, x: linen_model.apply({"params": p}, x), params, (x, y),
                         cross_entropy, mode=mode)
    other = kfac_factors(nnx_apply, params, (x, y), cross_entropy, mode=mode)
    assert sorted(other) == ["conv", "head"]
    _assert_same(other, linen)


# --------------------------------------------------------------------------------------------
# nnx specifics


class ListNet(nnx.Module):
    """Layers in an ``nnx.List`` (integer keys) and a BatchNorm."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])
        self.norm = nnx.BatchNorm(5, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](nnx.relu(self.norm(self.layers[0](x))))


def test_nnx_training_mode_batchnorm_is_refused_and_eval_mode_works():
    model = ListNet(nnx.Rngs(0))
    apply_fn, params = nnx_functional(model)
    with pytest.raises(ValueError, match=r"changed its non-parameter variables \['norm/mean', "
                                         r"'norm/var'\].*Call model\.eval\(\)"):
        apply_fn(params, X)
    model.eval()
    apply_fn, params = nnx_functional(model)
    np.testing.assert_array_equal(apply_fn(params, X), model(X))
    assert list(layer_inputs(apply_fn, params, X)) == ["layers/1"]
    factors = kfac_factors(apply_fn, params, (X, Y), cross_entropy)
    assert sorted(factors) == ["layers/0", "layers/1"]
    # the KFAC block of a Dense layer on one example is its exact GGN block
    one = (X[:1], Y[:1])
    block = layer_operator(apply_fn, params, one, cross_entropy, "layers/1")
    single = kfac_factors(apply_fn, params, one, cross_entropy, layers="layers/1")["layers/1"]
    kfac = kfac_operator(single, block, "layers/1")
    eye = jnp.eye(block.dim)
    np.testing.assert_allclose(jax.vmap(kfac.matvec)(eye), jax.vmap(block.matvec)(eye),
                               rtol=1e-5, atol=1e-7)


def test_nnx_layers_outside_nnx_functional_are_refused():
    model = NnxMLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="outside an apply_fn of nnx_functional"):
        layer_inputs(lambda p, x: model(x), {}, X)
    with pytest.raises(TypeError, match="takes an nnx.Module"):
        nnx_functional(LINEN_MLP)
