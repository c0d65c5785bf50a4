"""Every plasticity method by name, built from parts (``methods.method``).

=====================  ===============================================================
name                   what it is
=====================  ===============================================================
bp                     plain backprop with the base optimizer
l2                     coupled L2: ``g + l2 * theta``
l2_init                L2 toward the initial parameters (Kumar et al. 2023)
er                     effective-rank ascent alone, alternating (every ``erank_every``)
l2_er                  L2 + alternating ER ascent (the paper's code; He et al. 2025)
l2_er_joint            L2 + ER in the gradient of every step (``spectral_reg``)
cbp                    continual backprop (Dohare et al. 2024)
cbp_l2                 CBP + L2
redo                   ReDo (Sokar et al. 2023)
layernorm_l2           LayerNorm before every hidden activation + L2
spectral_norm          spectral-norm regularization (Lewandowski et al. 2025)
parseval               Parseval regularization (Chung et al. 2024)
shrink_perturb         per-step shrink (weight decay) + Gaussian noise (Dohare et al.)
reset                  re-initialize everything at every task boundary
=====================  ===============================================================

The settings, their defaults and meaning are ``SETTINGS``; each method reads only those of its
parts (``Method.settings``).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from spectral_plasticity.methods.effective_rank import erank_ascent
from spectral_plasticity.methods.method import (
    Method,
    Part,
    Setting,
    StepInputs,
    Values,
    as_float,
    as_int,
    every,
)
from spectral_plasticity.methods.recycling import cbp_init, cbp_step, redo_step
from spectral_plasticity.methods.regularizers import (
    l2_init,
    parseval,
    shrink_perturb,
    spectral_norm_reg,
    spectral_reg,
)
from spectral_plasticity.methods.resets import reset_all

PyTree = Any

SETTINGS: dict[str, Setting] = {
    "l2": Setting(1e-4, "coupled L2 strength: g + l2 * theta"),
    "erank": Setting(1e-2, "joint ER strength (l2_er_joint)"),
    "erank_learning_rate": Setting(1e-3, "step size of the alternating ER ascent"),
    "erank_every": Setting(100, "optimizer steps between two ER ascent steps"),
    "erank_batch": Setting(100, "recent examples whose features ER and ReDo read (supervised)",
                           sweepable=False),
    "erank_layers": Setting("all", "ER layers: 'all', 'last_two' or layer names",
                            sweepable=False),
    "l2_init": Setting(1e-3, "L2-Init strength"),
    "spectral_norm": Setting(1e-4, "spectral-norm regularization strength"),
    "parseval": Setting(1e-3, "Parseval regularization strength"),
    "shrink": Setting(1e-5, "Shrink & Perturb's per-step shrink"),
    "noise_std": Setting(1e-4, "Shrink & Perturb's noise standard deviation"),
    "replacement_rate": Setting(1e-4, "CBP: fraction of mature units replaced per step"),
    "maturity_threshold": Setting(100, "CBP: steps a unit lives before it may be replaced"),
    "cbp_decay": Setting(0.99, "CBP: decay of the running utility"),
    "redo_tau": Setting(0.025, "ReDo: dormancy threshold"),
    "redo_every": Setting(1000, "ReDo: optimizer steps between two recycling passes"),
}
DEFAULTS: dict[str, Any] = {name: s.default for name, s in SETTINGS.items()}


def _er_ascent(values: Values, params: PyTree, opt_state: PyTree, state: PyTree,
               inputs: StepInputs):
    params = every(values["erank_every"], inputs.step,
                   lambda p: erank_ascent(p, inputs.features_fn, layers=values["erank_layers"],
                                          learning_rate=values["erank_learning_rate"]),
                   lambda p: p, params)
    return params, opt_state, state, jnp.zeros((), jnp.int32)


def _cbp(values: Values, params: PyTree, opt_state: PyTree, state: PyTree,
         inputs: StepInputs):
    return cbp_step(params, opt_state, state, inputs.features, inputs.fresh_params(),
                    layer_pairs=inputs.layer_pairs,
                    replacement_rate=as_float(values["replacement_rate"]),
                    decay_rate=as_float(values["cbp_decay"]),
                    maturity_threshold=as_int(values["maturity_threshold"]))


def _redo(values: Values, params: PyTree, opt_state: PyTree, state: PyTree,
          inputs: StepInputs):
    params, opt_state, recycled = every(
        values["redo_every"], inputs.step,
        lambda po: redo_step(po[0], po[1], inputs.scoring_features(po[0]),
                             inputs.fresh_params(), layer_pairs=inputs.layer_pairs,
                             tau=as_float(values["redo_tau"])),
        lambda po: (*po, jnp.zeros((), jnp.int32)), (params, opt_state))
    return params, opt_state, state, recycled


L2 = Part("l2", ("l2",), before=lambda v: spectral_reg(l2=v["l2"], erank=0.0))
L2_ER_JOINT = Part("l2_er_joint", ("l2", "erank", "erank_layers", "erank_batch"),
                   before=lambda v: spectral_reg(l2=v["l2"], erank=v["erank"],
                                                 layers=v["erank_layers"]),
                   feature_batch=True)
L2_INIT = Part("l2_init", ("l2_init",), before=lambda v: l2_init(v["l2_init"]))
SPECTRAL_NORM = Part("spectral_norm", ("spectral_norm",),
                     before=lambda v: spectral_norm_reg(v["spectral_norm"]))
PARSEVAL = Part("parseval", ("parseval",), before=lambda v: parseval(v["parseval"]))
SHRINK_PERTURB = Part("shrink_perturb", ("shrink", "noise_std"),
                      after=lambda v: shrink_perturb(v["shrink"], v["noise_std"]))
LAYER_NORM = Part("layer_norm", layer_norm=True)
ER_ASCENT = Part("er_ascent", ("erank_every", "erank_layers", "erank_learning_rate",
                               "erank_batch"), after_update=_er_ascent, feature_batch=True,
               erank_ascent=True)
CBP = Part("cbp", ("replacement_rate", "maturity_threshold", "cbp_decay"),
           init_state=cbp_init, after_update=_cbp, recycles=True)
REDO = Part("redo", ("redo_tau", "redo_every", "erank_batch"), after_update=_redo,
            recycles=True, feature_batch=True)
RESET = Part("reset", at_task_start=lambda params, opt_state, fresh, tx: reset_all(fresh(), tx),
             reinitializes=True)

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bp", "plain backprop with the base optimizer"),
    Method("l2", "coupled L2", (L2,)),
    Method("l2_init", "L2 toward the initial parameters (Kumar et al. 2023)", (L2_INIT,)),
    Method("er", "alternating effective-rank ascent alone", (ER_ASCENT,)),
    Method("l2_er", "L2 + alternating ER ascent (He et al. 2025)", (L2, ER_ASCENT)),
    Method("l2_er_joint", "L2 + ER in the gradient of every step", (L2_ER_JOINT,)),
    Method("cbp", "continual backprop (Dohare et al. 2024)", (CBP,)),
    Method("cbp_l2", "CBP + L2", (L2, CBP)),
    Method("redo", "ReDo (Sokar et al. 2023)", (REDO,)),
    Method("layernorm_l2", "LayerNorm + L2", (LAYER_NORM, L2)),
    Method("spectral_norm", "spectral-norm regularization (Lewandowski et al. 2025)",
           (SPECTRAL_NORM,)),
    Method("parseval", "Parseval regularization (Chung et al. 2024)", (PARSEVAL,)),
    Method("shrink_perturb", "Shrink & Perturb (Ash & Adams 2020; Dohare et al. 2024)",
           (SHRINK_PERTURB,)),
    Method("reset", "re-initialize everything at every task boundary", (RESET,)),
)}
