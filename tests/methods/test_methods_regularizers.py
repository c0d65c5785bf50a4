"""Regularizers against their formulas, finite differences and numpy's SVD; jit + vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spectral_plasticity.methods import (
    erank_ascent,
    erank_penalty,
    l2_init,
    mean_effective_rank,
    parseval,
    parseval_penalty,
    select_layers,
    shrink_perturb,
    spectral_norm_reg,
    spectral_reg,
)
from spectral_plasticity.methods.regularizers import largest_singular_value
from spectral_plasticity.models import MLP, ConvNet, ResNet18, hidden_layer_names

MODEL = MLP(hidden_sizes=(12, 10), num_outputs=3)
X = jax.random.normal(jax.random.key(1), (32, 6))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
FEATURES_FN = lambda p: MODEL.apply({"params": p}, X)[1]


def _grads(seed=2):
    leaves, treedef = jax.tree.flatten(PARAMS)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                        zip(keys, leaves, strict=True)])


def test_coupled_l2_is_g_plus_lambda_theta():
    tx = spectral_reg(l2=0.1, erank=0.0)
    grads = _grads()
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    jax.tree.map(lambda u, g, p: np.testing.assert_allclose(u, g + 0.1 * p, rtol=1e-6),
                 updates, grads, PARAMS)


def test_er_term_is_minus_beta_grad_mean_erank_and_an_ascent_step_raises_erank():
    tx = spectral_reg(l2=0.0, erank=0.5, layers="all")
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS, features_fn=FEATURES_FN)
    eps = 1e-2
    direction = jax.tree.map(lambda u: -u / 0.5, updates)  # = grad mean erank
    plus = jax.tree.map(lambda p, d: p + eps * d, PARAMS, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, PARAMS, direction)
    norm2 = sum(float(jnp.sum(d ** 2)) for d in jax.tree.leaves(direction))
    fd = (mean_effective_rank(FEATURES_FN(plus)) - mean_effective_rank(FEATURES_FN(minus))) / (
        2 * eps)
    np.testing.assert_allclose(float(fd), norm2, rtol=2e-2)
    before = float(mean_effective_rank(FEATURES_FN(PARAMS)))
    after = float(mean_effective_rank(FEATURES_FN(erank_ascent(PARAMS, FEATURES_FN,
                                                                learning_rate=0.05))))
    assert after > before
    np.testing.assert_allclose(erank_penalty(FEATURES_FN(PARAMS)), -before, rtol=1e-6)


def test_sgd_with_l2_er_raises_erank_and_shrinks_weights_vs_plain_sgd():
    def run(tx):
        state = tx.init(PARAMS)
        params = PARAMS
        for _ in range(20):
            updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params,
                                       features_fn=FEATURES_FN)
            params = optax.apply_updates(params, updates)
        return params

    reg = run(optax.chain(spectral_reg(l2=0.05, erank=1.0), optax.sgd(0.05)))
    assert mean_effective_rank(FEATURES_FN(reg)) > mean_effective_rank(FEATURES_FN(PARAMS))
    assert optax.tree.norm(reg["head"]) < optax.tree.norm(PARAMS["head"])


def test_layer_selection():
    features = {f"hidden_{i}": jnp.ones((2, 2)) for i in (0, 1, 2, 10)}
    assert select_layers(features, "last_two") == ["hidden_2", "hidden_10"]
    assert select_layers(features, ["hidden_10", "hidden_0"]) == ["hidden_0", "hidden_10"]
    with pytest.raises(ValueError, match=r"unknown ER layers \['hidden_7'\]"):
        select_layers(features, ["hidden_7"])


@pytest.mark.parametrize("model", [ResNet18(num_outputs=10), ConvNet(num_outputs=2)])
def test_layer_selection_follows_the_model_from_input_to_output(model):
    names = hidden_layer_names(model)  # the models' own order, input to output
    features = {n: jnp.ones((2, 2)) for n in reversed(names)}
    assert select_layers(features, "all") == names
    assert select_layers(features, "last_two") == names[-2:]


def test_l2_init_pulls_toward_initial_params():
    tx = l2_init(0.3)
    state = tx.init(PARAMS)
    moved = jax.tree.map(lambda p: p + 1.0, PARAMS)
    grads = _grads()
    updates, _ = tx.update(grads, state, moved)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g + 0.3, rtol=1e-5), updates, grads)


def test_power_iteration_matches_numpy_svd_and_regularizer_gradient_matches_fd():
    kernel = PARAMS["hidden_0"]["kernel"]
    sigma, _, _ = largest_singular_value(kernel, jnp.ones(kernel.shape[1]), num_iters=200)
    np.testing.assert_allclose(float(sigma), np.linalg.svd(np.asarray(kernel))[1][0], rtol=1e-5)
    conv = jax.random.normal(jax.random.key(3), (3, 3, 2, 4))
    sigma_conv, _, _ = largest_singular_value(conv, jnp.ones(4), num_iters=200)
    np.testing.assert_allclose(float(sigma_conv),
                               np.linalg.svd(np.asarray(conv).reshape(-1, 4))[1][0], rtol=1e-5)

    # Converged power iteration: the added gradient is that of the exact penalty.
    tx = spectral_norm_reg(1.0, k=2, target=1.0, num_iters=200)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)

    def penalty(params):
        total = 0.0
        for layer in params.values():
            s = jnp.linalg.svd(layer["kernel"], compute_uv=False)[0]
            total += (s ** 2 - 1.0) ** 2 + jnp.sum(layer["bias"] ** 2)
        return total

    expected = jax.grad(penalty)(PARAMS)
    jax.tree.map(lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-3, atol=1e-5),
                 updates, expected)
    # Minimizing the penalty drives sigma_max to 1 (not sigma_max^2 to 2).
    params = PARAMS
    opt = optax.chain(spectral_norm_reg(1.0), optax.sgd(0.01))
    opt_state = opt.init(params)
    for _ in range(300):
        updates, opt_state = opt.update(zeros, opt_state, params)
        params = optax.apply_updates(params, updates)
    for layer in params.values():
        np.testing.assert_allclose(np.linalg.svd(np.asarray(layer["kernel"]))[1][0], 1.0,
                                   atol=2e-2)


def test_parseval_gradient_matches_finite_differences():
    tx = parseval(0.7, scale=2.0)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    direction = _grads(5)
    eps = 1e-3
    plus = jax.tree.map(lambda p, d: p + eps * d, PARAMS, direction)
    minus = jax.tree.map(lambda p, d: p - eps * d, PARAMS, direction)
    fd = 0.7 * (parseval_penalty(plus, 2.0) - parseval_penalty(minus, 2.0)) / (2 * eps)
    directional = sum(float(jnp.sum(u * d)) for u, d in zip(jax.tree.leaves(updates),
                                                            jax.tree.leaves(direction),
                                                            strict=True))
    np.testing.assert_allclose(directional, float(fd), rtol=1e-2)
    w = np.asarray(PARAMS["head"]["kernel"]).T
    np.testing.assert_allclose(
        float(parseval_penalty({"head": {"kernel": PARAMS["head"]["kernel"]}}, 2.0)),
        np.sum((w @ w.T - 2.0 * np.eye(3)) ** 2), rtol=1e-4)


def test_shrink_perturb_statistics():
    tx = shrink_perturb(0.1, 0.01)
    big = {"w": jnp.full((200, 200), 2.0)}
    updates, state = tx.update({"w": jnp.zeros((200, 200))}, tx.init(big), big)
    noise = np.asarray(updates["w"]) + 0.1 * 2.0
    np.testing.assert_allclose(noise.mean(), 0.0, atol=2e-4)
    np.testing.assert_allclose(noise.std(), 0.01, rtol=2e-2)
    updates2, _ = tx.update({"w": jnp.zeros((200, 200))}, state, big)
    assert not np.allclose(updates["w"], updates2["w"])
    toward = shrink_perturb(0.5, 0.0, toward="init")
    s = toward.init(big)
    moved = {"w": big["w"] + 4.0}
    u, _ = toward.update({"w": jnp.zeros((200, 200))}, s, moved)
    np.testing.assert_allclose(u["w"], -2.0)


@pytest.mark.parametrize("base", [optax.sgd(1e-2),
                                  pytest.param(optax.adam(1e-3), marks=pytest.mark.slow)])
def test_every_regularizer_under_jit_and_vmap_over_four_seeds(base):
    stacked = jax.vmap(lambda k: MODEL.init(k, X)["params"])(jax.random.split(
        jax.random.key(9), 4))
    txs = {
        "l2_er": optax.chain(spectral_reg(l2=1e-3, erank=1e-2), base),
        "l2_er_decoupled": optax.chain(base, spectral_reg(l2=1e-3, erank=1e-2, decoupled=True)),
        "l2_init": optax.chain(l2_init(1e-2), base),
        "spectral": optax.chain(spectral_norm_reg(1e-2), base),
        "parseval": optax.chain(parseval(1e-3), base),
        "shrink_perturb": optax.chain(base, shrink_perturb(1e-4, 1e-3)),
    }
    for name, tx in txs.items():
        def step(params, key, tx=tx):
            state = tx.init(params)
            grads = jax.grad(lambda p: jnp.mean(MODEL.apply({"params": p}, X)[0] ** 2))(params)
            features_fn = lambda p: MODEL.apply({"params": p}, X)[1]
            updates, _ = tx.update(grads, state, params, features_fn=features_fn, key=key)
            return optax.apply_updates(params, updates)

        keys = jax.random.split(jax.random.key(0), 4)
        batched = jax.jit(jax.vmap(step))(stacked, keys)
        single = step(jax.tree.map(lambda x: x[2], stacked), keys[2])
        jax.tree.map(lambda b, s, name=name: np.testing.assert_allclose(
            b[2], s, rtol=1e-4, atol=1e-6, err_msg=name), batched, single)


def test_bad_arguments():
    with pytest.raises(ValueError, match="l2 must be non-negative"):
        spectral_reg(l2=-1.0)
    with pytest.raises(ValueError, match="needs the extra argument features_fn"):
        tx = spectral_reg(l2=0.0, erank=0.1)
        tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    with pytest.raises(ValueError, match="toward must be"):
        shrink_perturb(0.1, 0.1, toward="mean")
    with pytest.raises(ValueError, match="strength must be non-negative"):
        l2_init(-0.5)
