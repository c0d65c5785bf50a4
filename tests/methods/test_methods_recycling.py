"""CBP, ReDo and resets on hand-built cases where the units to recycle are known."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spectral_plasticity.methods import cbp_init, cbp_step, redo_step, reset_all, reset_head
from spectral_plasticity.methods.recycling import recycle
from spectral_plasticity.models import MLP, ConvNet, unit_layers

MODEL = MLP(hidden_sizes=(8, 6), num_outputs=3)
X = jax.random.normal(jax.random.key(1), (16, 5))
PARAMS = MODEL.init(jax.random.key(0), X)["params"]
FRESH = MODEL.init(jax.random.key(99), X)["params"]
PAIRS = unit_layers(MODEL)
OPT = optax.adam(1e-3)


def _filled_adam_state(params):
    state = OPT.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, state = OPT.update(grads, state, params)
    return state


def _features_with_activity(activity):
    """hidden_0 features whose unit i has mean |h| = activity[i] on every sample."""
    return {"hidden_0": jnp.tile(jnp.asarray(activity, jnp.float32), (4, 1)),
            "hidden_1": jnp.ones((4, 6))}


def test_cbp_replaces_exactly_the_lowest_utility_mature_units():
    params = jax.tree.map(lambda x: x, PARAMS)
    # Equal outgoing weight mass per unit, so utility ranks like activity.
    params["hidden_1"]["kernel"] = jnp.full((8, 6), 0.5)
    activity = [5.0, 0.1, 4.0, 0.2, 3.0, 2.0, 0.3, 6.0]  # lowest: units 1, 3, 6
    features = _features_with_activity(activity)
    state = cbp_init(params, PAIRS[:1])
    opt_state = _filled_adam_state(params)
    # 10 steps, maturity 5: all 8 units mature at step 6; rate 3/8 -> 3 due on that step.
    replaced_total = 0
    for _ in range(6):
        new_params, opt_state, state, replaced = cbp_step(
            params, opt_state, state, features, FRESH, layer_pairs=PAIRS[:1],
            replacement_rate=3 / 8, decay_rate=0.9, maturity_threshold=5)
        replaced_total += int(replaced)
    assert replaced_total == 3
    replaced_units = [1, 3, 6]
    kept = [i for i in range(8) if i not in replaced_units]
    k0, fresh_k0 = np.asarray(new_params["hidden_0"]["kernel"]), np.asarray(
        FRESH["hidden_0"]["kernel"])
    np.testing.assert_array_equal(k0[:, replaced_units], fresh_k0[:, replaced_units])
    np.testing.assert_array_equal(k0[:, kept], np.asarray(params["hidden_0"]["kernel"])[:, kept])
    k1 = np.asarray(new_params["hidden_1"]["kernel"])
    np.testing.assert_array_equal(k1[replaced_units], 0.0)
    np.testing.assert_array_equal(k1[kept], 0.5)
    # Bias transfer: the mean activation (bias-corrected, = activity here) times the weights.
    transfer = 0.5 * sum(activity[i] for i in replaced_units)
    np.testing.assert_allclose(new_params["hidden_1"]["bias"],
                               np.asarray(params["hidden_1"]["bias"]) + transfer, rtol=1e-5)
    # Adam moments of every touched weight are zero, the others untouched.
    mu = opt_state[0].mu
    np.testing.assert_array_equal(np.asarray(mu["hidden_0"]["kernel"])[:, replaced_units], 0.0)
    np.testing.assert_array_equal(np.asarray(mu["hidden_1"]["kernel"])[replaced_units], 0.0)
    assert np.all(np.asarray(mu["hidden_0"]["kernel"])[:, kept] != 0)
    ages = np.asarray(state.layers["hidden_0"].age)
    np.testing.assert_array_equal(ages[replaced_units], 0)
    np.testing.assert_array_equal(ages[kept], 6)


def test_cbp_fractional_accumulation_and_immature_units_are_safe():
    features = _features_with_activity(np.linspace(0.1, 1.0, 8))
    state = cbp_init(PARAMS, PAIRS[:1])
    opt_state = OPT.init(PARAMS)
    params, counts = PARAMS, []
    for _ in range(20):
        params, opt_state, state, replaced = cbp_step(
            params, opt_state, state, features, FRESH, layer_pairs=PAIRS[:1],
            replacement_rate=0.05, decay_rate=0.99, maturity_threshold=10)
        counts.append(int(replaced))
    assert sum(counts[:10]) == 0  # nobody is mature yet
    # 8 mature units * 0.05 = 0.4 per step from step 11: a replacement every 2-3 steps.
    assert 3 <= sum(counts) <= 4


def test_redo_recycles_exactly_the_dormant_units_of_a_conv_net():
    model = ConvNet(conv_channels=(4, 3), conv_kernel_sizes=(3, 3), hidden_sizes=(5,))
    x = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
    params = model.init(jax.random.key(0), x)["params"]
    fresh = model.init(jax.random.key(1), x)["params"]
    pairs = unit_layers(model)
    features = dict(model.apply({"params": params}, x)[1])
    # Silence channel 2 of conv_1 (which feeds the dense layer through the flatten).
    features["conv_1"] = features["conv_1"].at[..., 2].set(0.0)
    features["hidden_0"] = jnp.ones_like(features["hidden_0"])
    features["conv_0"] = jnp.ones_like(features["conv_0"])
    opt = optax.sgd(0.1, momentum=0.9)
    opt_state = opt.init(params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    new, opt_state, count = redo_step(params, opt_state, features, fresh,
                                      layer_pairs=pairs, tau=0.025)
    assert int(count) == 1
    kernel = new["conv_1"]["kernel"]
    np.testing.assert_array_equal(kernel[..., 2], fresh["conv_1"]["kernel"][..., 2])
    np.testing.assert_array_equal(kernel[..., :2], params["conv_1"]["kernel"][..., :2])
    rows = np.arange(new["hidden_0"]["kernel"].shape[0])
    np.testing.assert_array_equal(np.asarray(new["hidden_0"]["kernel"])[rows % 3 == 2], 0.0)
    np.testing.assert_array_equal(np.asarray(new["hidden_0"]["kernel"])[rows % 3 != 2],
                                  np.asarray(params["hidden_0"]["kernel"])[rows % 3 != 2])
    trace = opt_state[0].trace
    np.testing.assert_array_equal(np.asarray(trace["conv_1"]["kernel"])[..., 2], 0.0)
    assert np.all(np.asarray(trace["conv_0"]["kernel"]) != 0)


def test_resets():
    opt_state = _filled_adam_state(PARAMS)
    params, state = reset_head(PARAMS, opt_state, FRESH)
    np.testing.assert_array_equal(params["head"]["kernel"], FRESH["head"]["kernel"])
    np.testing.assert_array_equal(params["hidden_0"]["kernel"], PARAMS["hidden_0"]["kernel"])
    np.testing.assert_array_equal(state[0].mu["head"]["kernel"], 0.0)
    assert np.all(np.asarray(state[0].mu["hidden_0"]["kernel"]) != 0)
    params, state = reset_all(FRESH, OPT)
    assert int(state[0].count) == 0
    with pytest.raises(ValueError, match="unknown head layer"):
        reset_head(PARAMS, opt_state, FRESH, head="output")


def test_cbp_under_jit_and_vmap_over_four_seeds():
    keys = jax.random.split(jax.random.key(3), 4)
    stacked = jax.vmap(lambda k: MODEL.init(k, X)["params"])(keys)
    fresh = jax.vmap(lambda k: MODEL.init(jax.random.fold_in(k, 1), X)["params"])(keys)

    def run(params, fresh):
        state, opt_state = cbp_init(params, PAIRS), OPT.init(params)
        for _ in range(4):
            features = MODEL.apply({"params": params}, X)[1]
            params, opt_state, state, _ = cbp_step(
                params, opt_state, state, features, fresh, layer_pairs=PAIRS,
                replacement_rate=0.5, maturity_threshold=1)
        return params

    batched = jax.jit(jax.vmap(run))(stacked, fresh)
    single = run(jax.tree.map(lambda x: x[1], stacked), jax.tree.map(lambda x: x[1], fresh))
    jax.tree.map(lambda b, s: np.testing.assert_allclose(b[1], s, rtol=1e-5), batched, single)


def test_bad_rates():
    state, opt_state = cbp_init(PARAMS, PAIRS), OPT.init(PARAMS)
    with pytest.raises(ValueError, match="replacement_rate must lie in"):
        cbp_step(PARAMS, opt_state, state, {}, FRESH, layer_pairs=PAIRS,
                 replacement_rate=1.5)
    with pytest.raises(ValueError, match="tau must be non-negative"):
        redo_step(PARAMS, opt_state, {}, FRESH, layer_pairs=PAIRS, tau=-0.1)


def test_recycling_zeroes_moments_only_and_keeps_every_other_state():
    """With L2-Init anchors and the spectral-norm regularizer's state in the chain, recycling
    zeroes exactly the Adam moments of the touched weights; anchors and power-iteration
    vectors stay as they were."""
    from spectral_plasticity.methods import l2_init, spectral_norm_reg

    opt = optax.chain(l2_init(1e-2), spectral_norm_reg(1e-3), optax.adam(1e-3))
    opt_state = opt.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    _, opt_state = opt.update(grads, opt_state, PARAMS)
    replace = jnp.zeros(PARAMS["hidden_0"]["kernel"].shape[-1], bool).at[jnp.array([1, 4])].set(
        True)
    new_params, new_state = recycle(PARAMS, FRESH, opt_state, "hidden_0", "hidden_1", replace)
    anchors_before, sn_before, adam_before = opt_state
    anchors_after, sn_after, adam_after = new_state
    assert _leaves_equal(anchors_before, anchors_after) and _leaves_equal(sn_before, sn_after)
    mu = adam_after[0].mu
    np.testing.assert_array_equal(mu["hidden_0"]["kernel"][:, [1, 4]], 0.0)
    np.testing.assert_array_equal(mu["hidden_1"]["kernel"][[1, 4], :], 0.0)
    np.testing.assert_array_equal(mu["hidden_0"]["kernel"][:, 0],
                                  adam_before[0].mu["hidden_0"]["kernel"][:, 0])
    np.testing.assert_array_equal(new_params["hidden_0"]["kernel"][:, 1],
                                  FRESH["hidden_0"]["kernel"][:, 1])


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                     strict=True))
