"""KFAC factors ``A = E[a a^T]`` and ``G = E[g g^T]`` of every Dense and Conv layer on a data set
(Martens & Grosse 2015; Grosse & Martens 2016 for convolutions), and the layer matrix their
Kronecker product acts on. Conventions (parameter order, conv scale, modes): ``kfac``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from spectral_plasticity.curvature.capture import HIGHEST, ApplyFn, Layers, layer_statistics
from spectral_plasticity.curvature.cotangents import (
    LossFn,
    SampleFn,
    check_mode,
    output_cotangents,
)
from spectral_plasticity.curvature.operators import chunk_dataset

PyTree = Any


class KroneckerFactors(NamedTuple):
    """One layer's KFAC block ``scale * A (x) G``.

    Attributes:
      a: ``(d_in [+1], d_in [+1])`` input second moment (bias as a last constant-1 feature).
      g: ``(d_out, d_out)`` output-gradient second moment.
      scale: number of locations the layer is applied to (1 for Dense, ``T`` for Conv).
    """

    a: jax.Array
    g: jax.Array
    scale: jax.Array


def _second_moment(x: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum_n w_n sum_t x_{n,t} x_{n,t}^T`` of ``x`` shaped ``(n, [*locations,] d)``."""
    x = x.reshape((x.shape[0], -1, x.shape[-1]))
    return jnp.einsum("nti,ntj,n->ij", x, x, weights.astype(x.dtype), precision=HIGHEST)


def kfac_factors(apply_fn: ApplyFn, params: PyTree, data: tuple[jax.Array, jax.Array],
                 loss_fn: LossFn, *, mode: str = "ggn", key: jax.Array | None = None,
                 sample_fn: SampleFn | None = None, num_samples: int = 1, layers: Layers = None,
                 chunk_size: int | None = None) -> dict[str, KroneckerFactors]:
    """KFAC factors ``A`` and ``G`` of every Dense and Conv layer on ``data``.

    ``A = (1/N) sum_n (1/T) sum_t a a^T`` and ``G = (1/N) sum_n (1/T) sum_t sum_k c_k g g^T``
    (``T = 1`` for Dense; see the module docstring for ``mode`` and the conv convention).
    Examples are processed in chunks of ``chunk_size`` with ``lax.scan`` and the ``K`` output
    cotangents of a chunk one after another (memory of one chunk and one backward pass).
    Sums use ``HIGHEST`` matmul precision (TF32 rounding would fill the factors' null spaces).

    Args:
      apply_fn: ``apply_fn(params, inputs)`` of a flax model (see ``layer_statistics``).
      params: its params.
      data: ``(inputs, targets)`` with a leading example axis.
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (batch,)``, the loss whose
        curvature is approximated (``dataset_operator``'s convention: averaged over examples).
      mode: ``"ggn"``, ``"fisher"`` or ``"empirical"``.
      key: PRNG key (``"fisher"`` only).
      sample_fn: ``sample_fn(key, outputs) -> targets`` (``"fisher"`` only).
      num_samples: sampled targets per example (``"fisher"`` only).
      layers: a layer name or names (default: all Dense and Conv layers).
      chunk_size: examples per chunk (default: all at once).

    Returns:
      ``{layer: KroneckerFactors}``.
    """
    check_mode(mode, num_samples, key, sample_fn)
    xs, ys, ws = chunk_dataset(data, chunk_size or data[0].shape[0])
    keys = jax.random.split(jax.random.key(0) if key is None else key, xs.shape[0])

    def chunk_sums(x, y, w, chunk_key):
        stats = layer_statistics(apply_fn, params, x, layers)
        u, c = output_cotangents(stats.outputs, y, loss_fn, mode, chunk_key, sample_fn,
                                 num_samples)
        a_sums = {name: _second_moment(a, w) for name, a in stats.inputs.items()}
        g_shapes = jax.eval_shape(stats.vjp, u[0])

        def add_cotangent(total, cotangent):
            u_k, c_k = cotangent
            g = stats.vjp(u_k)
            return {name: total[name] + _second_moment(g[name], c_k * w) for name in total}, None

        g_zeros = {name: jnp.zeros((s.shape[-1],) * 2, s.dtype) for name, s in g_shapes.items()}
        g_sums = jax.lax.scan(add_cotangent, g_zeros, (u, c))[0]
        return {name: (a_sums[name], g_sums[name]) for name in a_sums}

    a_shapes = jax.eval_shape(lambda x: layer_statistics(apply_fn, params, x, layers).inputs,
                              xs[0])
    locations = {name: int(np.prod(s.shape[1:-1])) for name, s in a_shapes.items()}
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(chunk_sums, xs[0], ys[0], ws[0], keys[0]))

    def body(total, chunk):
        return jax.tree.map(jnp.add, total, chunk_sums(*chunk)), None

    totals = jax.lax.scan(body, zeros, (xs, ys, ws, keys))[0]
    return {name: KroneckerFactors(a=a_sum / locations[name], g=g_sum / locations[name],
                                   scale=jnp.asarray(locations[name], a_sum.dtype))
            for name, (a_sum, g_sum) in totals.items()}


def layer_matrix(layer_params: Mapping[str, jax.Array]) -> jax.Array:
    """``[kernel.reshape(-1, d_out); bias]``: the ``(d_in [+1], d_out)`` matrix ``A (x) G`` acts on.

    Its row-major flattening is the coordinate order of ``kron(A, G)``.
    """
    if "kernel" not in layer_params:
        raise ValueError(f"a Dense/Conv layer's params have a 'kernel', got {sorted(layer_params)}")
    kernel = layer_params["kernel"]
    matrix = kernel.reshape((-1, kernel.shape[-1]))
    if "bias" in layer_params:
        matrix = jnp.concatenate([matrix, layer_params["bias"][None]], axis=0)
    return matrix


def kfac_matrix(factors: KroneckerFactors) -> jax.Array:
    """The dense block ``scale * kron(A, G)`` (for small layers and tests)."""
    return factors.scale * jnp.kron(factors.a, factors.g)
