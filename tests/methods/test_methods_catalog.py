"""Every method of the catalog through the trainers' interface: every sweepable setting can be
traced (vmapped, as ``run_sweep`` sweeps it) and changes the run; the same value gives the same
run bit for bit.

A small MLP takes three optimizer steps with each method's ``optimizer`` and ``after_update``
hook, vmapped over runs that differ in one setting each. The reference is the run with the base
values: a run whose setting differs must end elsewhere (parameters, optimizer or method state).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from spectral_plasticity.methods.catalog import METHODS
from spectral_plasticity.methods.method import StepInputs
from spectral_plasticity.models import MLP, unit_layers
from spectral_plasticity.train import method_registry

MODEL = MLP(hidden_sizes=(8, 8), num_outputs=3)
X = jax.random.normal(jax.random.key(0), (16, 4))
Y = jax.random.randint(jax.random.key(1), (16,), 0, 3)
PARAMS = MODEL.init(jax.random.key(2), X)["params"]
PAIRS = unit_layers(MODEL)
# Base values under which every hook acts within three steps, and another value of each.
BASE = {"l2": 0.1, "erank": 0.5, "erank_learning_rate": 0.1, "erank_every": 1, "l2_init": 0.1,
        "spectral_norm": 0.1, "parseval": 0.1, "shrink": 0.01, "noise_std": 0.0,
        "replacement_rate": 0.3, "maturity_threshold": 0, "cbp_decay": 0.5, "redo_tau": 0.9,
        "redo_every": 1}
OTHER = {"l2": 0.3, "erank": 2.0, "erank_learning_rate": 0.3, "erank_every": 2, "l2_init": 0.3,
         "spectral_norm": 0.3, "parseval": 0.3, "shrink": 0.05, "noise_std": 0.1,
         "replacement_rate": 0.6, "maturity_threshold": 5, "cbp_decay": 0.9, "redo_tau": 0.0,
         "redo_every": 2}


def _three_steps(method, settings, swept):
    values = method.values(settings, swept)
    tx = method.optimizer(values, optax.sgd(0.1))
    params, opt_state = PARAMS, tx.init(PARAMS)
    state = method.init_state(params, PAIRS)
    features_fn = lambda p: MODEL.apply({"params": p}, X)[1]

    def loss_fn(p):
        logits, features = MODEL.apply({"params": p}, X)
        return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean(), features

    for step in range(3):
        key = jax.random.key(10 + step)
        grads, features = jax.grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params, features_fn=features_fn,
                                       key=key)
        params = optax.apply_updates(params, updates)
        params, opt_state, state, _ = method.after_update(values, params, opt_state, state,
                                                          StepInputs(
            step=jnp.asarray(step), features=features, features_fn=features_fn,
            scoring_features=features_fn, layer_pairs=PAIRS,
            fresh_params=lambda key=key: MODEL.init(key, X)["params"]))
    return params, opt_state, state


def test_every_sweepable_setting_has_two_test_values():
    swept = {s for m in METHODS.values() for s in method_registry.sweepable(m)}
    assert swept - {"learning_rate"} == set(BASE) == set(OTHER)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_swept_setting_is_traced_and_takes_effect(name):
    method = METHODS[name]
    names = [s for s in method_registry.sweepable(method) if s != "learning_rate"]
    if not names:  # bp, reset: nothing but the learning rate to sweep
        assert method.settings == ()
        return
    settings = method_registry.resolve_settings({s: BASE[s] for s in method.settings
                                                 if s in BASE})
    # runs: base, base again, then one run per setting with its other value
    runs = [dict(BASE), dict(BASE)] + [{**BASE, s: OTHER[s]} for s in names]
    swept = {s: jnp.asarray([r[s] for r in runs], jnp.float32) for s in names}
    out = jax.jit(jax.vmap(lambda h: _three_steps(method, settings, h)))(swept)
    leaves = [np.asarray(jax.random.key_data(leaf) if jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key) else leaf) for leaf in jax.tree.leaves(out)]
    run = lambda i: [leaf[i] for leaf in leaves]
    assert all(np.array_equal(a, b) for a, b in zip(run(0), run(1), strict=True))
    for i, s in enumerate(names, start=2):
        assert not all(np.array_equal(a, b) for a, b in zip(run(0), run(i), strict=True)), s
