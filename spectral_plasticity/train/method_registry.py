"""Plasticity methods by name: what each one adds to a trainer.

A trainer (supervised or PPO) asks ``method_plan(name, settings)`` what to do; the plan says
which optax transforms go before and after the base optimizer, whether the model uses
LayerNorm, and which hooks run: unit recycling (CBP every step, ReDo every F steps), the
alternating effective-rank ascent every N steps, or a full reset at task boundaries.

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
spectral_reg           spectral-norm regularization (Lewandowski et al. 2025)
parseval               Parseval regularization (Chung et al. 2024)
shrink_perturb         per-step shrink (weight decay) + Gaussian noise (Dohare et al.)
reset                  re-initialize everything at every task boundary
=====================  ===============================================================

Strengths come from ``settings`` (a mapping; vmapped hyperparameters override it): ``l2``,
``erank``, ``erank_learning_rate``, ``l2_init``, ``spectral_reg``, ``parseval``, ``shrink``,
``noise_std``; hook settings ``erank_every``, ``erank_batch``, ``erank_layers``,
``replacement_rate``, ``maturity_threshold``, ``cbp_decay``, ``redo_tau``, ``redo_every``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import optax

from spectral_plasticity.methods import (
    l2_init,
    parseval,
    shrink_perturb,
    spectral_norm_reg,
    spectral_reg,
)

METHODS = ("bp", "l2", "l2_init", "er", "l2_er", "l2_er_joint", "cbp", "cbp_l2", "redo",
           "layernorm_l2", "spectral_reg", "parseval", "shrink_perturb", "reset")

DEFAULTS: dict[str, Any] = {
    "l2": 1e-4, "erank": 1e-2, "erank_learning_rate": 1e-3, "erank_every": 100,
    "erank_batch": 100, "erank_layers": "all", "l2_init": 1e-3, "spectral_reg": 1e-4,
    "parseval": 1e-3, "shrink": 1e-5, "noise_std": 1e-4, "replacement_rate": 1e-4,
    "maturity_threshold": 100, "cbp_decay": 0.99, "redo_tau": 0.025, "redo_every": 1000,
}


class MethodPlan(NamedTuple):
    """What a trainer runs for one method.

    Attributes:
      before: transforms chained before the base optimizer (they change the gradient).
      after: transforms chained after it (they are parameter steps).
      layer_norm: build the model with LayerNorm.
      recycling: ``"cbp"``, ``"redo"`` or None.
      erank_ascent: run the alternating ER ascent every ``erank_every`` steps.
      needs_features_fn: ``update`` needs the ``features_fn`` extra argument.
      reset_every_task: re-initialize params and optimizer at every task boundary.
      settings: the resolved settings (defaults overridden by the caller's).
    """

    before: tuple[optax.GradientTransformation, ...]
    after: tuple[optax.GradientTransformation, ...]
    layer_norm: bool
    recycling: str | None
    erank_ascent: bool
    needs_features_fn: bool
    reset_every_task: bool
    settings: dict[str, Any]


def config_settings(config: Any) -> dict[str, Any]:
    """The settings of ``config.method``: ``config.method_settings`` (shared by every method)
    overridden by ``config.method_settings_by_method[config.method]`` (this method's own)."""
    own = config.get("method_settings_by_method", None) or {}
    return {**dict(config.method_settings), **dict(own.get(config.method, None) or {})}


def check_settings_by_method(by_method: Mapping[str, Mapping[str, Any]],
                             methods: Sequence[str]) -> None:
    """Refuses per-method settings of a method not in ``methods`` or of an unknown setting."""
    stray = sorted(set(by_method) - set(methods))
    if stray:
        raise ValueError(f"method_settings_by_method names methods {stray} that this experiment "
                         f"does not run; its methods: {list(methods)}")
    for method, settings in by_method.items():
        unknown = sorted(set(settings or {}) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"method_settings_by_method.{method}: unknown settings {unknown}; "
                             f"valid: {sorted(DEFAULTS)}")


def check_methods(names: Sequence[str]) -> None:
    """Raises a ValueError naming any unknown method and listing the valid ones."""
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")


def method_plan(name: str, settings: Mapping[str, Any] | None = None) -> MethodPlan:
    """The plan of method ``name`` with ``settings`` over ``DEFAULTS``."""
    check_methods([name])
    unknown = sorted(set(settings or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown method settings {unknown}; valid: {sorted(DEFAULTS)}")
    s = {**DEFAULTS, **dict(settings or {})}
    before: list[optax.GradientTransformation] = []
    after: list[optax.GradientTransformation] = []
    if name in ("l2", "l2_er", "cbp_l2", "layernorm_l2"):
        before.append(spectral_reg(l2=s["l2"], erank=0.0))
    if name == "l2_er_joint":
        before.append(spectral_reg(l2=s["l2"], erank=s["erank"], layers=s["erank_layers"]))
    if name == "l2_init":
        before.append(l2_init(s["l2_init"]))
    if name == "spectral_reg":
        before.append(spectral_norm_reg(s["spectral_reg"]))
    if name == "parseval":
        before.append(parseval(s["parseval"]))
    if name == "shrink_perturb":
        after.append(shrink_perturb(s["shrink"], s["noise_std"]))
    recycling = {"cbp": "cbp", "cbp_l2": "cbp", "redo": "redo"}.get(name)
    return MethodPlan(
        before=tuple(before), after=tuple(after), layer_norm=name == "layernorm_l2",
        recycling=recycling, erank_ascent=name in ("er", "l2_er"),
        needs_features_fn=name == "l2_er_joint", reset_every_task=name == "reset",
        settings=s)


def build_optimizer(plan: MethodPlan, base: optax.GradientTransformation
                    ) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*plan.before, base, *plan.after)``."""
    return optax.chain(*plan.before, base, *plan.after)


def base_optimizer(name: str, learning_rate: Any, **kwargs: Any) -> optax.GradientTransformation:
    """``sgd`` (with ``momentum``, ``nesterov``) or ``adam`` (with ``b1``, ``b2``, ``eps``).

    An option the optimizer does not take is refused, never silently ignored.
    """
    valid = {"sgd": ("momentum", "nesterov"), "adam": ("b1", "b2", "eps")}
    if name not in valid:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(valid)}")
    unknown = sorted(set(kwargs) - set(valid[name]))
    if unknown:
        raise ValueError(f"optimizer {name!r} takes {list(valid[name])}, not {unknown}")
    if name == "sgd":
        momentum = kwargs.get("momentum") or None  # 0: plain SGD, no momentum buffer
        return optax.sgd(learning_rate, momentum=momentum,
                         nesterov=bool(kwargs.get("nesterov", False)))
    return optax.adam(learning_rate, **kwargs)


def swept_optimizer(method: str, settings: Mapping[str, Any], optimizer: Mapping[str, Any],
                    hparams: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """The method's optimizer chain with the swept values of ``hparams`` in place.

    Args:
      method: a name of ``METHODS``.
      settings: the method's settings (``method_plan(...).settings``).
      optimizer: the config's optimizer fields (``name``, ``learning_rate`` and its options).
      hparams: swept values (possibly traced): ``learning_rate`` and any method setting.
    """
    lr = hparams.get("learning_rate", optimizer["learning_rate"])
    options = {k: v for k, v in optimizer.items() if k not in ("name", "learning_rate")}
    plan = method_plan(method, {k: hparams.get(k, v) for k, v in settings.items()})
    return build_optimizer(plan, base_optimizer(optimizer["name"], lr, **options))
