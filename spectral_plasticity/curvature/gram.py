"""The loss-weighted Gram matrix ``H_out^(1/2) J J^T H_out^(1/2)``: the GGN seen from output space.

With ``J`` the ``(N*C, P)`` Jacobian of all ``N x C`` outputs of a batch and ``H_out`` the
block-diagonal ``(N*C, N*C)`` Hessian of the mean loss ``(1/N) sum_n l(f_n, y_n)`` with respect to
them, the GGN is ``J^T H_out J = B^T B`` with ``B = H_out^(1/2) J``; the Gram matrix
``B B^T = H_out^(1/2) (J J^T) H_out^(1/2)`` has the same nonzero eigenvalues. ``J J^T`` is the
empirical neural tangent kernel (Jacot et al. 2018), so the Gram matrix ties NTK dynamics to the
curvature the paper measures (He et al. 2025): a GGN of ``P`` parameters has rank at most
``N * C``, and its whole nonzero spectrum is the spectrum of an ``N*C x N*C`` matrix.

``H_out^(1/2)`` is the symmetric PSD square root of each example's ``C x C`` block, so the loss
must be convex in the outputs (cross-entropy, squared error); negative rounding-level eigenvalues
are clipped to 0. Cost: ``N*C`` Jacobian-vector/vector-Jacobian product pairs over the batch
(``lax.map``, ``batch_size`` of them vmapped at once), memory ``O(P + (N*C)^2)`` — for small
problems (``N*C`` up to a few thousand).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity import linalg
from spectral_plasticity.curvature.cotangents import check_per_example_loss, output_hessians
from spectral_plasticity.curvature.operators import (
    LayerSelection,
    combine,
    model_outputs,
    partition,
    selection_mask,
)

PyTree = Any


def psd_sqrt(matrices: jax.Array) -> jax.Array:
    """Symmetric square roots of a batch of symmetric PSD matrices (negative eigenvalues -> 0)."""
    values, vectors = linalg.eigh(matrices)
    roots = jnp.sqrt(jnp.clip(values, 0.0, None))
    return jnp.einsum("...ik,...k,...jk->...ij", vectors, roots, vectors)


def loss_weighted_gram(apply_fn: Callable[..., Any],
                       loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                       params: PyTree, inputs: jax.Array, targets: jax.Array, *,
                       layers: LayerSelection = None, batch_size: int | None = None
                       ) -> jax.Array:
    """The ``(N*C, N*C)`` matrix ``H_out^(1/2) J J^T H_out^(1/2)`` of a batch.

    Its nonzero eigenvalues are those of the GGN of the mean loss (``dataset_operator(...,
    kind='ggn')``), restricted to ``layers`` when given. Rows and columns are ordered
    example-major (index ``n * C + c``).

    Args:
      apply_fn: ``apply_fn(params, inputs) -> (N, C) outputs`` (or ``(outputs, features)``).
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``, convex in the outputs.
      params: where the Jacobian is taken.
      inputs, targets: the batch.
      layers: restrict ``J`` to these parameters (see ``selection_mask``).
      batch_size: Gram columns computed at once (vmapped); default all ``N*C``.
    """
    selected, rest = partition(params, selection_mask(params, layers))
    predict = lambda s: model_outputs(apply_fn, combine(s, rest), inputs)
    outputs, jvp_fn = jax.linearize(predict, selected)
    chex.assert_rank(outputs, 2)
    n, c = outputs.shape
    check_per_example_loss(loss_fn, outputs, targets)
    roots = psd_sqrt(output_hessians(loss_fn, outputs, targets) / n)  # (N, C, C)
    vjp_fn = jax.linear_transpose(jvp_fn, selected)
    root_of = lambda u: jnp.einsum("nij,nj->ni", roots, u)

    def column(index: jax.Array) -> jax.Array:
        unit = jax.nn.one_hot(index, n * c, dtype=outputs.dtype).reshape(n, c)
        tangent = vjp_fn(root_of(unit))[0]
        return root_of(jvp_fn(tangent)).reshape(-1)

    columns = jax.lax.map(column, jnp.arange(n * c), batch_size=batch_size or n * c)
    chex.assert_shape(columns, (n * c, n * c))
    return columns.T
