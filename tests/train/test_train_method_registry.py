"""The method registry: names, settings, and the optimizer chain each method builds.

Every chain is checked against its update formula on a small MLP (plain SGD as the base, so the
update is ``-lr * (g + regularizer gradient)`` before it and ``-lr * g + step`` after it).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spectral_plasticity.methods import parseval_penalty
from spectral_plasticity.models import MLP
from spectral_plasticity.train import method_registry

MODEL = MLP(hidden_sizes=(6,), num_outputs=2)
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 3)))["params"]
GRADS = jax.tree.map(lambda p: jnp.full_like(p, 0.5), PARAMS)
LR = 0.1


MOVED = jax.tree.map(lambda p: p + 0.1, PARAMS)


def _optimizer(name, settings):
    method = method_registry.get(name)
    return method.optimizer(method.values(method_registry.resolve_settings(settings), {}),
                            optax.sgd(LR))


def _update(name, settings, params=PARAMS, init_params=PARAMS):
    tx = _optimizer(name, settings)
    updates, _ = tx.update(GRADS, tx.init(init_params), params, key=jax.random.key(1))
    return method_registry.get(name), updates


def _assert_tree_close(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_unknown_method_and_setting_name_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown methods \['l3'\]; choose from \['bp'"):
        method_registry.check_methods(["bp", "l3"])
    with pytest.raises(ValueError, match=r"unknown method settings \['l2_strength'\]"):
        method_registry.resolve_settings({"l2_strength": 1.0})
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        method_registry.base_optimizer("rmsprop", 1e-3)


def test_bp_is_the_base_optimizer():
    _, updates = _update("bp", {})
    _assert_tree_close(updates, jax.tree.map(lambda g: -LR * g, GRADS))


@pytest.mark.parametrize("name", ["l2", "l2_er", "cbp_l2", "layernorm_l2"])
def test_coupled_l2_is_minus_lr_times_g_plus_lambda_theta(name):
    _, updates = _update(name, {"l2": 0.3})
    _assert_tree_close(updates, jax.tree.map(lambda g, p: -LR * (g + 0.3 * p), GRADS, PARAMS))


def test_l2_init_pulls_toward_the_parameters_it_was_initialized_with():
    moved = jax.tree.map(lambda p: p + 1.0, PARAMS)
    _, updates = _update("l2_init", {"l2_init": 0.2}, params=moved)
    _assert_tree_close(updates, jax.tree.map(lambda g: -LR * (g + 0.2), GRADS))


def test_parseval_adds_the_gradient_of_its_penalty():
    _, updates = _update("parseval", {"parseval": 0.05})
    reg = jax.grad(parseval_penalty)(PARAMS)
    _assert_tree_close(updates, jax.tree.map(lambda g, r: -LR * (g + 0.05 * r), GRADS, reg))


def test_shrink_perturb_acts_after_the_optimizer():
    _, quiet = _update("shrink_perturb", {"shrink": 0.01, "noise_std": 0.0})
    _assert_tree_close(quiet, jax.tree.map(lambda g, p: -LR * g - 0.01 * p, GRADS, PARAMS))
    _, noisy = _update("shrink_perturb", {"shrink": 0.01, "noise_std": 0.1})
    noise = jax.tree.map(lambda a, b: (a - b) / 0.1, noisy, quiet)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(noise)])
    assert 0.5 < flat.std() < 1.5 and abs(flat.mean()) < 0.5  # standard normal noise


def test_spectral_norm_pulls_the_top_singular_value_toward_one():
    method, updates = _update("spectral_norm", {"spectral_norm": 0.1})
    u, sigmas, vt = np.linalg.svd(np.asarray(PARAMS["hidden_0"]["kernel"]))
    step = np.asarray(updates["hidden_0"]["kernel"] + LR * GRADS["hidden_0"]["kernel"])
    # d sigma_max along the regularizer's step is u^T step v: toward 1 from either side.
    assert (u[:, 0] @ step @ vt[0]) * (sigmas[0] - 1.0) < 0
    assert [p.name for p in method.parts if p.before and not p.after] == ["spectral_norm"]


@pytest.mark.parametrize(("name", "flags"), [
    ("cbp", {"recycles": True}), ("cbp_l2", {"recycles": True}),
    ("redo", {"recycles": True, "feature_batch": True}),
    ("er", {"feature_batch": True}), ("l2_er", {"feature_batch": True}),
    ("l2_er_joint", {"feature_batch": True}),
    ("layernorm_l2", {"layer_norm": True}), ("reset", {"reinitializes": True}),
])
def test_hooks_and_model_changes_are_declared(name, flags):
    method = method_registry.get(name)
    defaults = {"recycles": False, "feature_batch": False, "layer_norm": False,
                "reinitializes": False}
    assert {k: getattr(method, k) for k in defaults} == {**defaults, **flags}


def test_every_setting_is_read_by_a_method_and_sweeps_are_what_it_reads():
    read = {s for m in method_registry.METHODS for s in method_registry.get(m).settings}
    assert read == set(method_registry.DEFAULTS)
    assert method_registry.sweepable(method_registry.get("bp")) == ("learning_rate",)
    assert method_registry.sweepable(method_registry.get("cbp_l2")) == (
        "learning_rate", "cbp_decay", "l2", "maturity_threshold", "replacement_rate")
    assert "erank_batch" not in method_registry.sweepable(method_registry.get("l2_er"))


def test_every_chain_jits_and_vmaps_over_traced_strengths():
    strengths = jnp.asarray([0.0, 0.5])
    for name in method_registry.METHODS:
        def one(strength, name=name):
            settings = {k: strength for k in ("l2", "erank", "l2_init", "spectral_norm",
                                               "parseval", "shrink")}
            tx = _optimizer(name, {**settings, "noise_std": 0.0})
            features_fn = lambda p: MODEL.apply({"params": p}, jnp.eye(4, 3))[1]
            return tx.update(GRADS, tx.init(PARAMS), MOVED, features_fn=features_fn,
                             key=jax.random.key(2))[0]

        updates = jax.jit(jax.vmap(one))(strengths)
        leaves = jax.tree.leaves(updates)
        assert all(np.all(np.isfinite(u)) for u in leaves), name
        differs = any(not np.allclose(u[0], u[1]) for u in leaves)
        regularized = name not in ("bp", "er", "cbp", "redo", "reset")
        assert differs == regularized, name


def test_config_settings_put_a_methods_own_values_over_the_shared_ones():
    import ml_collections
    config = ml_collections.ConfigDict({
        "method": "l2_er", "method_settings": {"l2": 1e-4, "erank_learning_rate": 1e-3},
        "method_settings_by_method": {"l2_er": {"l2": 1e-3}, "l2": {"l2": 1e-5}}})
    assert method_registry.config_settings(config) == {"l2": 1e-3, "erank_learning_rate": 1e-3}
    config.method = "bp"
    assert method_registry.config_settings(config) == {"l2": 1e-4, "erank_learning_rate": 1e-3}
    config.method = "l2"
    method, settings = method_registry.for_config(config, "supervised")
    assert method.name == "l2" and settings["l2"] == 1e-5


def test_settings_by_method_refuse_stray_methods_and_unknown_settings():
    with pytest.raises(ValueError, match=r"names methods \['cbp'\] that this experiment"):
        method_registry.check_settings_by_method({"cbp": {"replacement_rate": 1e-6}},
                                                 ["bp", "l2"])
    with pytest.raises(ValueError, match=r"method_settings_by_method.l2: unknown settings"):
        method_registry.check_settings_by_method({"l2": {"weight_decay": 1e-6}}, ["bp", "l2"])
    method_registry.check_settings_by_method({"l2": {"l2": 1e-6}}, ["bp", "l2"])
