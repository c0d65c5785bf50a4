"""Every plasticity method inside PPO does what it is for, on both networks.

Each test runs the tiny continual-Pendulum config (two phases, 16 gradient steps each) once per
setting of the method's strength, every setting from the same seed and ``jax.vmap``-ed in one
compiled program, so a setting of strength 0 is plain backprop on the very same data: the
difference is the method's doing. The checks are the method's defining effect, computed
directly from the final parameters where possible (singular values, Gram matrices, distances).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spectral_plasticity.methods import catalog
from spectral_plasticity.rl import ppo
from spectral_plasticity.train import method_registry

NETWORKS = ("actor", "critic")


def _run(method, settings=None, **hparams):
    """``(initial params, final state, rows)`` of the tiny run of ``method``, one run per
    position of the ``hparams`` lists (``name -> values``), all from seed 0."""
    config = ppo.default_config("continual_pendulum", "tiny")
    config.method, config.measure_hessian = method, False
    config.optimizer.learning_rate = 3e-3
    config.method_settings.update(settings or {})
    trainer = ppo.make_train(config)
    hp = {k: jnp.asarray(v, jnp.float32) for k, v in hparams.items()}
    runs = len(next(iter(hp.values()))) if hp else 1
    keys = jax.vmap(lambda _: jax.random.key(0))(jnp.arange(runs))

    def run(key, h):
        state = trainer.init(key, h)
        final, rows = trainer.run_chunk(state, h)
        return state.params, final, rows

    init_params, state, rows = jax.jit(jax.vmap(run))(keys, hp)
    return init_params, state, {k: np.asarray(v) for k, v in rows.items()}


def _kernel(params, network, run, layer="hidden_0"):
    return np.asarray(params[network][layer]["kernel"][run], np.float64)


def _end(rows, name):
    """The metric at the end of the last phase, one value per run."""
    return rows[name][:, -1]


def _weight_norms(rows):
    return {n: _end(rows, f"weight_norm/{n}") for n in NETWORKS}


def _check_l2_lowers_the_weight_norm(rows, with_l2, without):
    for n, norm in _weight_norms(rows).items():
        assert norm[with_l2] < 0.95 * norm[without], (n, norm)


def _check_erank_rises(rows, with_er, without):
    for n in NETWORKS:
        erank = _end(rows, f"effective_rank/{n}/hidden_0")
        assert erank[with_er] > erank[without] + 0.5, (n, erank)


@pytest.mark.slow
def test_l2_lowers_the_weight_norm():
    # Coupled L2 enters Adam's normalization next to the critic's large value-loss gradient
    # (Pendulum returns are in the hundreds): a strength of 10 makes its pull visible in 32 steps.
    _, _, rows = _run("l2", l2=[0.0, 10.0])
    _check_l2_lowers_the_weight_norm(rows, 1, 0)


@pytest.mark.slow
def test_er_ascent_raises_the_feature_effective_rank():
    _, _, rows = _run("er", erank_learning_rate=[0.0, 0.3])
    _check_erank_rises(rows, 1, 0)


def test_l2_er_shrinks_weights_and_raises_the_effective_rank():
    # bp, L2 alone, L2 with the alternating ER ascent
    _, _, rows = _run("l2_er", l2=[0.0, 10.0, 10.0], erank_learning_rate=[0.0, 0.0, 0.3])
    _check_l2_lowers_the_weight_norm(rows, 1, 0)
    _check_erank_rises(rows, 2, 1)


@pytest.mark.slow
def test_l2_er_joint_raises_the_effective_rank():
    # Inside Adam each weight moves by about the step size per step, whatever the gradient's
    # scale: a larger step size (both runs) lets 32 steps show the rise, and a strength of 100
    # lets the ER term outweigh the critic's value-loss gradient (Pendulum returns are in the
    # hundreds).
    _, _, rows = _run("l2_er_joint", l2=[0.0, 0.0], erank=[0.0, 100.0],
                      learning_rate=[1e-2, 1e-2])
    _check_erank_rises(rows, 1, 0)


@pytest.mark.slow  # CBP itself: tests/methods; in a trainer: tests/train
def test_cbp_l2_recycles_units_of_both_networks():
    # A replacement rate of 0.005 over 16 hidden units and 28 steps past maturity 4 recycles
    # a few units (at 0.05 nearly every unit is redrawn, which undoes L2's shrinkage); L2 still
    # lowers the norm.
    _, state, rows = _run("cbp_l2", {"replacement_rate": 0.005}, l2=[0.0, 10.0])
    assert np.all(rows["recycled_units"].sum(-1) > 0)
    for n in NETWORKS:  # CBP's per-unit ages: some reset to 0 by a replacement, some matured
        ages = np.asarray(state.method_state[n]["cbp"].layers["hidden_0"].age)
        assert np.all(ages.max(-1) == 32) and np.all(ages.min(-1) < 32), (n, ages)
    _check_l2_lowers_the_weight_norm(rows, 1, 0)


def _check_same_value_same_rows_other_value_other_rows(rows):
    """Runs 0 and 2 (one seed, one swept value) agree; run 1 (another value) does not."""
    for name in ("recycled_units", "value_loss", "weight_norm"):
        np.testing.assert_array_equal(rows[name][0], rows[name][2])
    assert not np.array_equal(rows["weight_norm"][0], rows["weight_norm"][1])


@pytest.mark.slow
def test_cbp_recycles_units_at_the_swept_rate():
    _, _, rows = _run("cbp", replacement_rate=[0.05, 0.01, 0.05])
    recycled = rows["recycled_units"].sum(-1)
    assert recycled[0] > recycled[1] > 0
    _check_same_value_same_rows_other_value_other_rows(rows)


@pytest.mark.slow
def test_redo_recycles_dormant_units_at_the_swept_period():
    # tau = 0.5: a unit whose mean activity is under half the layer's mean is dormant.
    _, _, rows = _run("redo", {"redo_tau": 0.5}, redo_every=[4, 8, 4])
    assert np.all(rows["recycled_units"].sum(-1) > 0)
    _check_same_value_same_rows_other_value_other_rows(rows)


@pytest.mark.slow
def test_layernorm_l2_normalizes_hidden_units():
    init, state, rows = _run("layernorm_l2", l2=[0.0, 10.0])
    for n in NETWORKS:
        assert set(state.params[n]["norm_0"]) == {"scale", "bias"}
        np.testing.assert_array_equal(init[n]["norm_0"]["scale"], 1.0)
        assert not np.allclose(state.params[n]["norm_0"]["scale"][0], 1.0)  # it trains
    _check_l2_lowers_the_weight_norm(rows, 1, 0)


@pytest.mark.slow
def test_spectral_norm_pulls_the_top_singular_value_to_one():
    # LeCun-uniform 3 x 16 first layer: sigma_max about 2 at initialization.
    init, state, _ = _run("spectral_norm", spectral_norm=[0.0, 0.1])
    for n in NETWORKS:
        sigma0 = np.linalg.svd(_kernel(init, n, 0), compute_uv=False)[0]
        gaps = [abs(np.linalg.svd(_kernel(state.params, n, r), compute_uv=False)[0] - 1.0)
                for r in (0, 1)]
        assert sigma0 > 1.3
        assert gaps[1] < 0.5 * gaps[0], (n, gaps)


@pytest.mark.slow
def test_parseval_orthogonalizes_the_rows():
    _, state, _ = _run("parseval", parseval=[0.0, 0.1])

    def distance(n, r):
        w = _kernel(state.params, n, r).T  # units x inputs
        return np.sum((w @ w.T - np.eye(w.shape[0])) ** 2)

    for n in NETWORKS:
        assert distance(n, 1) < 0.5 * distance(n, 0), n


@pytest.mark.slow
def test_l2_init_stays_near_the_initialization():
    init, state, _ = _run("l2_init", l2_init=[0.0, 1.0])
    for n in NETWORKS:
        moved = [np.linalg.norm(_kernel(state.params, n, r) - _kernel(init, n, r))
                 for r in (0, 1)]
        assert moved[1] < 0.5 * moved[0], (n, moved)


@pytest.mark.slow
def test_shrink_perturb_shrinks_and_perturbs():
    # bp, shrink alone, noise alone (std 0.05 per step: about 0.28 per weight after 32 steps)
    _, state, rows = _run("shrink_perturb", shrink=[0.0, 0.02, 0.0], noise_std=[0.0, 0.0, 0.05])
    norms = _weight_norms(rows)
    for n, norm in norms.items():
        assert norm[1] < 0.9 * norm[0] < 0.9 * norm[2], (n, norm)
        moved = np.std(_kernel(state.params, n, 2) - _kernel(state.params, n, 0))
        assert 0.1 < moved < 1.0, (n, moved)


@pytest.mark.slow
def test_reset_reinitializes_at_every_phase():
    # Adam's step count restarts at each phase: 16 steps in the last phase, not 32.
    _, state, _ = _run("reset")
    _, bp_state, _ = _run("bp")
    for n in NETWORKS:
        assert int(state.opt_state[n][0][0].count[0]) == 16
        assert int(bp_state.opt_state[n][0][0].count[0]) == 32


def test_ppo_runs_the_methods_that_declare_it_and_refuses_others(monkeypatch):
    assert set(ppo.PAPER_METHODS) <= set(method_registry.METHODS)
    config = ppo.default_config("continual_cartpole", "tiny")
    config.method = "dropout"
    with pytest.raises(ValueError, match=r"unknown methods \['dropout'\]"):
        ppo.make_train(config)
    supervised_only = dataclasses.replace(method_registry.get("l2"), trainers=("supervised",))
    monkeypatch.setitem(catalog.METHODS, "l2", supervised_only)
    config.method = "l2"
    with pytest.raises(ValueError, match="'l2' does not run on the ppo trainer"):
        ppo.make_train(config)
