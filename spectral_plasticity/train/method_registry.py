"""Plasticity methods by name, as a trainer asks for them from its config.

The methods themselves, their settings and hooks are ``methods.catalog`` (``METHODS``,
``SETTINGS``; the interface is ``methods.method.Method``). This module is the trainers' side:
the method a config names (``for_config``: checked for the trainer, its settings resolved, its
sweep checked), the base optimizer, and the optimizer chain with the swept values in place.

Settings come from ``config.method_settings`` (shared by every method) overridden by
``config.method_settings_by_method[method]``; swept values (``config.sweep``, vmapped by the
runner) override both. A sweep may vary ``learning_rate`` and the sweepable settings the method
reads (``sweepable``); any other swept name is refused, as it would have no effect.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import optax

from spectral_plasticity.methods.catalog import DEFAULTS, SETTINGS
from spectral_plasticity.methods.catalog import METHODS as CATALOG
from spectral_plasticity.methods.method import Method

METHODS = tuple(CATALOG)


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


def get(name: str, trainer: str | None = None) -> Method:
    """The method ``name``; with ``trainer``, refused unless the method runs on it."""
    check_methods([name])
    method = CATALOG[name]
    if trainer is not None and trainer not in method.trainers:
        runs_on = [m for m in METHODS if trainer in CATALOG[m].trainers]
        raise ValueError(f"method {name!r} does not run on the {trainer} trainer; methods that "
                         f"do: {runs_on}")
    return method


def resolve_settings(settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``settings`` over ``DEFAULTS``; an unknown setting is refused."""
    unknown = sorted(set(settings or {}) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown method settings {unknown}; valid: {sorted(DEFAULTS)}")
    return {**DEFAULTS, **dict(settings or {})}


def sweepable(method: Method) -> tuple[str, ...]:
    """What a sweep of ``method`` may vary: ``learning_rate`` and its sweepable settings."""
    return ("learning_rate", *(s for s in method.settings if SETTINGS[s].sweepable))


def check_sweep(method: Method, names: Sequence[str]) -> None:
    """Refuses swept names that ``method`` does not read (they would change nothing) and
    structural settings (they fix shapes; set them in the config)."""
    valid = sweepable(method)
    refused = sorted(set(names) - set(valid))
    if refused:
        static = sorted(n for n in refused if n in method.settings)
        why = f"; {static} fix array shapes: set them in method_settings" if static else ""
        raise ValueError(f"cannot sweep {refused} with method {method.name!r}{why}; it sweeps "
                         f"{list(valid)}")


def for_config(config: Any, trainer: str) -> tuple[Method, dict[str, Any]]:
    """The method of ``config.method`` for ``trainer`` and its resolved settings
    (``config_settings`` over ``DEFAULTS``), with ``config.sweep`` checked."""
    method = get(config.method, trainer)
    settings = resolve_settings(config_settings(config))
    check_sweep(method, list(config.get("sweep", None) or {}))
    return method, settings


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


def optimizer(method: Method, settings: Mapping[str, Any], optimizer_config: Mapping[str, Any],
              hparams: Mapping[str, Any]) -> optax.GradientTransformationExtraArgs:
    """The method's optimizer chain with the swept values of ``hparams`` in place.

    Args:
      method: the method.
      settings: its resolved settings (``for_config``).
      optimizer_config: the config's optimizer fields (``name``, ``learning_rate``, options).
      hparams: swept values (possibly traced): ``learning_rate`` and method settings.
    """
    lr = hparams.get("learning_rate", optimizer_config["learning_rate"])
    options = {k: v for k, v in optimizer_config.items() if k not in ("name", "learning_rate")}
    return method.optimizer(method.values(settings, hparams),
                            base_optimizer(optimizer_config["name"], lr, **options))
