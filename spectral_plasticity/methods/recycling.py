"""Unit recycling: Continual Backprop (CBP) and ReDo, as pure functions.

Both replace hidden units of Dense and Conv layers. A unit of layer ``l`` (an output column of
its kernel; a channel for a convolution) is *recycled* by

1. redrawing its incoming weights (kernel column, bias entry) from the layer's initializer —
   taken from ``fresh_params``, a new initialization of the whole model;
2. zeroing its outgoing weights in the next layer (Dense rows; Conv input channels; after a
   flatten, the rows ``i`` with ``i % channels == unit``), so the network's function is
   unchanged at the moment of replacement (up to CBP's bias transfer below);
3. zeroing the optimizer moments (e.g. Adam's ``mu``, ``nu``) of every weight it touched.

**CBP** (Dohare et al. 2024, "Loss of plasticity in deep continual learning", Nature) keeps, per
unit, a running *contribution utility* ``u_i <- eta u_i + (1 - eta) |h_i| sum_k |w_ik|``
(``h_i`` the unit's activation averaged over the batch, ``w_ik`` its outgoing weights), a running
mean activation ``f_i``, and an age. Both averages are bias-corrected by ``1 - eta^age``. Each
step, ``replacement_rate * #mature`` units (mature: ``age > maturity_threshold``) are due,
accumulated fractionally; the due number of mature units with the LOWEST utility are recycled
and the next layer's bias absorbs their mean contribution ``f_i * w_i``. (The paper authors' JAX
code replaced the highest-utility units; this is the reference behaviour.)

**ReDo** (Sokar et al. 2023, "The dormant neuron phenomenon in deep RL") recycles the units whose
score ``s_i = E|h_i| / mean_k E|h_k|`` (``metrics.dormant_scores``) is at most ``tau``; call it
every F steps.

``layer_pairs`` are ``(layer, next_layer)`` names, e.g. ``models.unit_layers(model)``; params
are flax ``params`` dicts ``{layer: {'kernel', 'bias'}}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from spectral_plasticity.methods.optimizer_state import zero_param_entries
from spectral_plasticity.metrics import dormant_scores, feature_matrix

PyTree = Any
LayerPairs = Sequence[tuple[str, str]]


def _known(value: Any) -> bool:
    """True unless ``value`` is traced (a swept setting): only known values can be checked."""
    return not isinstance(value, jax.core.Tracer)


# ------------------------------------------------------------------------------------------
# Masks of the weights a unit owns


def _outgoing_unit_axis(next_kernel: jax.Array, units: int) -> jax.Array:
    """For each entry of ``next_kernel``, the index of the unit of the previous layer feeding
    it (``(kh, kw, in, out)`` conv: the ``in`` index; ``(in, out)`` dense: the row, modulo the
    number of units when a flatten of ``(H, W, units)`` precedes it)."""
    if next_kernel.ndim == 4:
        idx = jnp.arange(next_kernel.shape[2])[None, None, :, None]
    else:
        rows = next_kernel.shape[0]
        if rows % units:
            raise ValueError(f"next layer has {rows} inputs, not a multiple of {units} units")
        idx = (jnp.arange(rows) % units)[:, None]
    return jnp.broadcast_to(idx, next_kernel.shape)


def unit_masks(params: PyTree, layer: str, next_layer: str, replace: jax.Array
               ) -> dict[str, dict[str, jax.Array]]:
    """Boolean masks (like the two layers' params) of the weights the ``replace``-d units own.

    Returns ``{layer: {kernel, bias}, next_layer: {kernel, bias}}`` with True on the incoming
    weights and bias of the units, and on their outgoing weights (the next layer's bias: False).
    """
    kernel = params[layer]["kernel"]
    units = kernel.shape[-1]
    incoming = {"kernel": jnp.broadcast_to(replace, kernel.shape)}
    if "bias" in params[layer]:
        incoming["bias"] = replace
    next_kernel = params[next_layer]["kernel"]
    outgoing = {"kernel": replace[_outgoing_unit_axis(next_kernel, units)]}
    if "bias" in params[next_layer]:
        outgoing["bias"] = jnp.zeros_like(params[next_layer]["bias"], bool)
    return {layer: incoming, next_layer: outgoing}


def _full_mask(params: PyTree, partial: Mapping[str, Mapping[str, jax.Array]]) -> PyTree:
    def leaf_mask(path, leaf):
        layer, name = path[0].key, path[-1].key
        mask = partial.get(layer, {}).get(name)
        return jnp.zeros(leaf.shape, bool) if mask is None else mask

    return jax.tree_util.tree_map_with_path(leaf_mask, params)


def recycle(params: PyTree, fresh_params: PyTree, opt_state: PyTree, layer: str,
            next_layer: str, replace: jax.Array) -> tuple[PyTree, PyTree]:
    """Recycles the ``replace``-d units of ``layer``: fresh incoming weights, zero outgoing
    weights, zero optimizer moments of both (``zero_param_entries``: moments only, anchors
    such as ``l2_init``'s initial parameters kept). Returns ``(params, opt_state)``."""
    masks = unit_masks(params, layer, next_layer, replace)
    incoming = _full_mask(params, {layer: masks[layer]})
    touched = _full_mask(params, masks)
    params = jax.tree.map(lambda p, f, m: jnp.where(m, f, p), params, fresh_params, incoming)
    outgoing = _full_mask(params, {next_layer: masks[next_layer]})
    params = jax.tree.map(lambda p, m: jnp.where(m, 0.0, p), params, outgoing)
    return params, zero_param_entries(opt_state, params, touched)


def _outgoing_weight_sums(params: PyTree, layer: str, next_layer: str) -> jax.Array:
    """``sum_k |w_ik|`` per unit ``i`` of ``layer`` over its outgoing weights."""
    units = params[layer]["kernel"].shape[-1]
    next_kernel = params[next_layer]["kernel"]
    owner = _outgoing_unit_axis(next_kernel, units)
    return jax.ops.segment_sum(jnp.abs(next_kernel).reshape(-1), owner.reshape(-1), units)


def _outgoing_mean_contribution(params: PyTree, layer: str, next_layer: str,
                                mean_activation: jax.Array, replace: jax.Array) -> jax.Array:
    """Sum over replaced units of ``f_i * w_i`` into each output of ``next_layer``."""
    units = params[layer]["kernel"].shape[-1]
    next_kernel = params[next_layer]["kernel"]
    owner = _outgoing_unit_axis(next_kernel, units)
    weight = jnp.where(replace, mean_activation, 0.0)[owner] * next_kernel
    return weight.reshape((-1, next_kernel.shape[-1])).sum(axis=0)


# ------------------------------------------------------------------------------------------
# Continual Backprop


class CBPLayerState(NamedTuple):
    utility: jax.Array
    mean_activation: jax.Array
    age: jax.Array
    to_replace: jax.Array


class CBPState(NamedTuple):
    """Per recycled layer: running utility, mean activation, age, and the fractional count."""

    layers: dict[str, CBPLayerState]


def cbp_init(params: PyTree, layer_pairs: LayerPairs) -> CBPState:
    """Zero utilities and ages for every layer of ``layer_pairs``."""
    layers = {}
    for layer, _ in layer_pairs:
        units = params[layer]["kernel"].shape[-1]
        zeros = jnp.zeros((units,), jnp.float32)
        layers[layer] = CBPLayerState(zeros, zeros, jnp.zeros((units,), jnp.int32),
                                      jnp.zeros((), jnp.float32))
    return CBPState(layers=layers)


def cbp_step(params: PyTree, opt_state: PyTree, state: CBPState, features: Mapping[str, jax.Array],
             fresh_params: PyTree, *,
             layer_pairs: LayerPairs, replacement_rate: float | jax.Array = 1e-4,
             decay_rate: float | jax.Array = 0.99, maturity_threshold: int | jax.Array = 100,
             ) -> tuple[PyTree, PyTree, CBPState, jax.Array]:
    """One CBP step after an update: update utilities, recycle the lowest-utility mature units.

    Args:
      params: current parameters (after the optimizer step).
      opt_state: the optimizer's state (moments of recycled weights are zeroed).
      state: ``CBPState`` from ``cbp_init``.
      features: the model's features on this step's batch.
      fresh_params: a new initialization of the model (e.g. ``init_fn(key)``): the source of
        the recycled units' incoming weights.
      layer_pairs: ``(layer, next_layer)`` pairs to recycle (``models.unit_layers``).
      replacement_rate: fraction of mature units replaced per step, in [0, 1].
      decay_rate: ``eta`` of the running averages, in [0, 1).
      maturity_threshold: steps a unit must live before it may be replaced.
      (The three may be traced, e.g. swept under ``vmap``; only known values are checked.)

    Returns:
      ``(params, opt_state, state, num_replaced)``.
    """
    if _known(replacement_rate) and not 0.0 <= replacement_rate <= 1.0:
        raise ValueError(f"replacement_rate must lie in [0, 1], got {replacement_rate}")
    if _known(decay_rate) and not 0.0 <= decay_rate < 1.0:
        raise ValueError(f"decay_rate must lie in [0, 1), got {decay_rate}")
    new_layers = {}
    total = jnp.zeros((), jnp.int32)
    for layer, next_layer in layer_pairs:
        s = state.layers[layer]
        h = feature_matrix(features[layer])
        activation = jnp.mean(h, axis=0)
        contribution = jnp.mean(jnp.abs(h), axis=0) * _outgoing_weight_sums(params, layer,
                                                                           next_layer)
        age = s.age + 1
        utility = decay_rate * s.utility + (1 - decay_rate) * contribution
        mean_activation = decay_rate * s.mean_activation + (1 - decay_rate) * activation
        correction = 1.0 - decay_rate ** age.astype(jnp.float32)
        corrected_utility = utility / correction
        corrected_activation = mean_activation / correction
        mature = age > maturity_threshold
        to_replace = s.to_replace + replacement_rate * jnp.sum(mature)
        count = jnp.floor(to_replace).astype(jnp.int32)
        to_replace = to_replace - count
        ranking = jnp.argsort(jnp.argsort(jnp.where(mature, corrected_utility, jnp.inf)))
        replace = mature & (ranking < count)
        bias_shift = _outgoing_mean_contribution(params, layer, next_layer,
                                                 corrected_activation, replace)
        params, opt_state = recycle(params, fresh_params, opt_state, layer,
                                    next_layer, replace)
        if "bias" in params[next_layer]:
            params = {**params, next_layer: {**params[next_layer],
                                             "bias": params[next_layer]["bias"] + bias_shift}}
        new_layers[layer] = CBPLayerState(
            utility=jnp.where(replace, 0.0, utility),
            mean_activation=jnp.where(replace, 0.0, mean_activation),
            age=jnp.where(replace, 0, age),
            to_replace=to_replace,
        )
        total = total + jnp.sum(replace)
    return params, opt_state, CBPState(layers=new_layers), total


# ------------------------------------------------------------------------------------------
# ReDo


def redo_step(params: PyTree, opt_state: PyTree, features: Mapping[str, jax.Array],
              fresh_params: PyTree, *,
              layer_pairs: LayerPairs, tau: float | jax.Array = 0.025,
              ) -> tuple[PyTree, PyTree, jax.Array]:
    """Recycles every tau-dormant unit (``s_i <= tau``) of the layers of ``layer_pairs``.

    Returns ``(params, opt_state, num_recycled)``. Call it every F steps with the features of a
    batch (Sokar et al. use F = 1000 gradient steps and tau = 0.025 in supervised settings).
    """
    if _known(tau) and tau < 0:
        raise ValueError(f"tau must be non-negative, got {tau}")
    total = jnp.zeros((), jnp.int32)
    for layer, next_layer in layer_pairs:
        replace = dormant_scores(features[layer]) <= tau
        params, opt_state = recycle(params, fresh_params, opt_state, layer,
                                    next_layer, replace)
        total = total + jnp.sum(replace)
    return params, opt_state, total
