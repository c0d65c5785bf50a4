"""``spectral_reg`` composed with the optax ecosystem, each against a reference computed by hand:
chain with clipping and AdamW, inject_hyperparams, masked (and its own mask, schedules),
MultiSteps, and orbax save/restore of its state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from spectral_plasticity.curvature import layer_inputs
from spectral_plasticity.methods import erank_gradient, spectral_reg
from spectral_plasticity.models import MLP

MODEL = MLP(hidden_sizes=(8, 7), num_outputs=3)
X = jax.random.normal(jax.random.key(1), (16, 5))
Y = jnp.arange(16) % 3
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
L2, BETA = 0.05, 0.3


def apply_fn(p, x):
    return MODEL.apply({"params": p}, x)[0]  # logits only, as a user's model


def features_fn(p, x=X):
    return layer_inputs(apply_fn, p, x)


def loss(p, x=X, y=Y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y))


def regularized(grads, params, l2=L2, beta=BETA, x=X):
    """``g + l2 theta - beta grad mean erank``: spectral_reg's formula, by hand."""
    er = erank_gradient(lambda p: features_fn(p, x), params)
    return jax.tree.map(lambda g, p, e: g + l2 * p - beta * e, grads, params, er)


def _close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def test_chain_with_clipping_and_adamw_regularizes_before_both():
    tx = optax.chain(spectral_reg(l2=L2, erank=BETA), optax.clip_by_global_norm(0.5),
                     optax.adamw(1e-2, weight_decay=1e-4))
    ref = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2, weight_decay=1e-4))
    params, state, ref_params, ref_state = PARAMS, tx.init(PARAMS), PARAMS, ref.init(PARAMS)
    for _ in range(3):
        updates, state = tx.update(jax.grad(loss)(params), state, params,
                                   features_fn=features_fn)
        params = optax.apply_updates(params, updates)
        grads = regularized(jax.grad(loss)(ref_params), ref_params)
        ref_updates, ref_state = ref.update(grads, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, ref_updates)
    _close(params, ref_params, rtol=1e-5, atol=1e-6)
    assert optax.tree.norm(jax.tree.map(jnp.subtract, params, PARAMS)) > 1e-2  # it moved


def test_inject_hyperparams_changes_strengths_without_recompiling():
    tx = optax.inject_hyperparams(spectral_reg)(l2=L2, erank=BETA)
    grads = jax.grad(loss)(PARAMS)

    @jax.jit
    def update(state):
        return tx.update(grads, state, PARAMS, features_fn=features_fn)[0]

    state = tx.init(PARAMS)
    _close(update(state), regularized(grads, PARAMS), rtol=1e-5)
    state.hyperparams["l2"] = jnp.full_like(state.hyperparams["l2"], 0.2)
    state.hyperparams["erank"] = jnp.zeros_like(state.hyperparams["erank"])
    _close(update(state), regularized(grads, PARAMS, l2=0.2, beta=0.0), rtol=1e-5)
    assert update._cache_size() == 1


def _kernels_only(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def test_masked_l2_and_its_mask_argument_skip_biases():
    grads = jax.grad(loss)(PARAMS)
    expected = jax.tree_util.tree_map_with_path(
        lambda path, g, p: g + L2 * p if path[-1].key == "kernel" else g, grads, PARAMS)
    for tx in (optax.masked(spectral_reg(l2=L2, erank=0.0), _kernels_only),
               spectral_reg(l2=L2, erank=0.0, mask=_kernels_only)):
        updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
        _close(updates, expected)
    # with the ER term, the mask argument masks only L2; the ER term sees all the params
    tx = spectral_reg(l2=L2, erank=BETA, mask=_kernels_only)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS, features_fn=features_fn)
    er = erank_gradient(features_fn, PARAMS)
    _close(updates, jax.tree.map(lambda e, g: e - BETA * g, expected, er), rtol=1e-5)
    tx = optax.masked(spectral_reg(l2=L2, erank=BETA), _kernels_only)
    with pytest.raises(ValueError, match="optax.masked hid some: use spectral_reg"):
        tx.update(grads, tx.init(PARAMS), PARAMS, features_fn=features_fn)


def test_l2_schedule_counts_steps_and_decoupled_form_subtracts():
    schedule = optax.linear_schedule(0.1, 0.0, transition_steps=4)
    tx = spectral_reg(l2=schedule, erank=0.0)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    state = tx.init(PARAMS)
    for step in range(3):
        updates, state = tx.update(zeros, state, PARAMS)
        _close(updates, jax.tree.map(lambda p, s=step: schedule(s) * p, PARAMS))
    decoupled = spectral_reg(l2=schedule, erank=0.0, decoupled=True)
    updates, _ = decoupled.update(zeros, decoupled.init(PARAMS), PARAMS)
    _close(updates, jax.tree.map(lambda p: -0.1 * p, PARAMS))


def test_multisteps_accumulates_then_regularizes_once():
    k, lr = 4, 0.1
    xs, ys = X.reshape((k, -1, X.shape[1])), Y.reshape((k, -1))
    tx = optax.MultiSteps(optax.chain(spectral_reg(l2=L2, erank=BETA), optax.sgd(lr)), k)
    state = tx.init(PARAMS)
    for i in range(k):
        grads = jax.grad(loss)(PARAMS, xs[i], ys[i])
        updates, state = tx.update(grads, state, PARAMS, features_fn=features_fn)
        if i < k - 1:
            assert optax.tree.norm(updates) == 0  # accumulating
    mean_grad = jax.tree.map(lambda *g: sum(g) / k,
                             *[jax.grad(loss)(PARAMS, xs[i], ys[i]) for i in range(k)])
    _close(updates, jax.tree.map(lambda g: -lr * g, regularized(mean_grad, PARAMS)), rtol=1e-5)


def test_orbax_restores_the_state_and_training_continues_identically(tmp_path):
    tx = optax.chain(spectral_reg(l2=optax.cosine_decay_schedule(L2, 10), erank=BETA),
                     optax.adamw(1e-2))

    def steps(params, state, n):
        for _ in range(n):
            updates, state = tx.update(jax.grad(loss)(params), state, params,
                                       features_fn=features_fn)
            params = optax.apply_updates(params, updates)
        return params, state

    params, state = steps(PARAMS, tx.init(PARAMS), 2)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "ckpt", {"params": params, "opt_state": state})
        checkpointer.wait_until_finished()
        template = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                {"params": params, "opt_state": state})
        restored = checkpointer.restore(tmp_path / "ckpt", template)
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(state)
    assert int(restored["opt_state"][0].l2.count) == 2  # the schedule's step survived
    resumed = steps(restored["params"], restored["opt_state"], 2)
    straight = steps(params, state, 2)
    jax.tree.map(np.testing.assert_array_equal, resumed, straight)
