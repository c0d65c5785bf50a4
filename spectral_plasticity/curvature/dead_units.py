"""Dead ReLU units on a data set and the upper bound they imply on the Hessian rank.

A ReLU unit whose output is 0 on every example of a data set has a pre-activation ``<= 0``
there, where ``relu' = relu'' = 0`` (JAX differentiates ``relu`` at 0 to 0). Then the loss on
that data set has zero first *and* second derivatives with respect to every parameter that
reaches the network only through the unit: its incoming weights and bias (they act through
``relu(s)``) and its outgoing weights (they multiply its zero output; their mixed derivatives with
the incoming weights carry a factor ``relu'(s) = 0``). Every Hessian (and GGN) row and column of
those parameters is zero, so

    rank(H) <= P - |removed|,

``removed`` being the union of those parameters over all dead units (a weight between two dead
units is counted once). This is the mechanism the paper ties to rank collapse: each dead hidden
unit deletes ``fan_in + 1 + fan_out`` curvature directions.

For a convolutional layer a unit is a channel: dead when its (pooled) feature map is 0 at every
location of every example; it owns ``kernel[..., c]``, ``bias[c]`` and, in the next layer,
``kernel[:, :, c, :]`` (conv) or every flattened input row ``i`` with ``i % channels == c``
(dense after a channel-last flatten, see ``models.unit_layers``).

References: Lu et al. (2020), "Dying ReLU and initialization: theory and numerical examples";
He et al. (2025) on curvature collapse and loss of plasticity.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.curvature.operators import chunk_dataset
from spectral_plasticity.models import MLP, ConvNet, unit_layers

PyTree = Any


class DeadUnitBound(NamedTuple):
    """Dead units and the Hessian-rank bound they imply.

    Attributes:
      dead: ``{layer: (units,) bool}``, True for units that are 0 on every example.
      num_dead: total number of dead units.
      removed: ``{layer: {param: bool mask}}`` of the parameters with zero curvature rows.
      num_removed: number of such parameters (union over dead units).
      num_params: total number of parameters ``P`` (an array, so the bound can be jitted).
      rank_bound: ``P - num_removed``, an upper bound on the rank of the Hessian and the GGN.
    """

    dead: dict[str, jax.Array]
    num_dead: jax.Array
    removed: dict[str, dict[str, jax.Array]]
    num_removed: jax.Array
    num_params: jax.Array
    rank_bound: jax.Array


def dead_units(model: nn.Module, params: PyTree, inputs: jax.Array, *,
               chunk_size: int = 1000) -> dict[str, jax.Array]:
    """``{layer: (units,) bool}``: hidden units whose feature is exactly 0 on all ``inputs``.

    Features are those the model returns (post-activation, after pooling for conv layers),
    read chunk by chunk (``lax.scan``; the weight-0 padding of a last partial chunk is ignored).
    """
    chex.assert_rank(inputs, {2, 3, 4})
    names = [layer for layer, _ in unit_layers(model)]
    xs, _, ws = chunk_dataset((inputs, jnp.zeros(inputs.shape[0])), chunk_size)

    def body(active, chunk):
        x, w = chunk
        features = model.apply({"params": params}, x)[1]
        seen = {}
        for name in names:
            h = features[name].reshape((x.shape[0], -1, features[name].shape[-1]))
            real = (w > 0)[:, None, None]
            seen[name] = active[name] | jnp.any((h != 0) & real, axis=(0, 1))
        return seen, None

    shapes = jax.eval_shape(lambda x: model.apply({"params": params}, x)[1], xs[0])
    start = {name: jnp.zeros(shapes[name].shape[-1], bool) for name in names}
    active = jax.lax.scan(body, start, (xs, ws))[0]
    return {name: ~active[name] for name in names}


def _outgoing_mask(kernel: jax.Array, dead: jax.Array) -> jax.Array:
    """Entries of the next layer's kernel fed by a dead unit."""
    if kernel.ndim == 4:  # conv (kh, kw, c_in, c_out)
        return jnp.broadcast_to(dead[None, None, :, None], kernel.shape)
    rows = jnp.arange(kernel.shape[0]) % dead.shape[0]  # dense, after a channel-last flatten
    return jnp.broadcast_to(dead[rows][:, None], kernel.shape)


def dead_unit_bound(model: nn.Module, params: PyTree, inputs: jax.Array, *,
                    chunk_size: int = 1000) -> DeadUnitBound:
    """Dead units of ``model`` on ``inputs`` and the implied upper bound on the Hessian rank.

    Args:
      model: an ``MLP`` or ``ConvNet`` with ``activation='relu'`` and no LayerNorm (a LayerNorm
        lets a dead unit's incoming weights act on the other units through its statistics).
      params: the model's params.
      inputs: the whole data set ``(N, ...)`` on which the Hessian is taken.
      chunk_size: examples per forward pass.
    """
    if not isinstance(model, MLP | ConvNet):
        raise ValueError(f"the dead-unit bound supports MLP and ConvNet, not "
                         f"{type(model).__name__}")
    if model.activation != "relu" or model.layer_norm:
        raise ValueError("the dead-unit bound needs activation='relu' (zero output implies zero "
                         f"derivative) and no LayerNorm, got activation={model.activation!r}, "
                         f"layer_norm={model.layer_norm}")
    dead = dead_units(model, params, inputs, chunk_size=chunk_size)
    removed = jax.tree.map(lambda p: jnp.zeros(p.shape, bool), dict(params))
    for layer, next_layer in unit_layers(model):
        mask = dead[layer]
        removed[layer] = {"kernel": removed[layer]["kernel"] | mask,
                          "bias": removed[layer]["bias"] | mask}
        kernel = params[next_layer]["kernel"]
        removed[next_layer] = {**removed[next_layer],
                               "kernel": removed[next_layer]["kernel"]
                               | _outgoing_mask(kernel, mask)}
    num_params = jnp.asarray(sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params)))
    num_removed = sum(jnp.sum(m) for m in jax.tree.leaves(removed))
    return DeadUnitBound(dead=dead, num_dead=sum(jnp.sum(d) for d in dead.values()),
                         removed=removed, num_removed=num_removed, num_params=num_params,
                         rank_bound=num_params - num_removed)
