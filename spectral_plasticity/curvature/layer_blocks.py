"""A layer's exact curvature block (``dataset_operator`` restricted to its parameters) and its
KFAC block ``scale * A (x) G`` as operators in the same coordinates, for comparing the two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import chex
import jax

from spectral_plasticity.curvature.capture import ApplyFn
from spectral_plasticity.curvature.cotangents import LossFn
from spectral_plasticity.curvature.factors import KroneckerFactors, layer_matrix
from spectral_plasticity.curvature.operators import CurvatureOperator, dataset_operator

PyTree = Any


def _key(node: Mapping[Any, Any], name: str) -> Any:
    """The key of ``node`` spelled ``name`` (nnx lists have integer keys, ``'layers/0'``)."""
    return next((k for k in node if str(k) == name), name)


def _layer_path(params: PyTree, layer: str) -> tuple[Any, ...]:
    """Key path of ``layer`` (``'block_0_0/conv_0'``) in ``params`` (or ``{'params': ...}``)."""
    names = tuple(layer.split("/"))
    if isinstance(params, Mapping) and set(params) == {"params"}:
        names = ("params", *names)
    node, path = params, ()
    for name in names:
        if not isinstance(node, Mapping) or _key(node, name) not in node:
            known = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(f"unknown layer {layer!r}: no {name!r} under "
                             f"{'/'.join(map(str, path)) or 'params'} (has {known})")
        path = (*path, _key(node, name))
        node = node[path[-1]]
    return path


def _get(tree: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Mapping[Any, Any], path: tuple[Any, ...], value: Any) -> dict[Any, Any]:
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def layer_operator(apply_fn: ApplyFn, params: PyTree, data: tuple[jax.Array, jax.Array],
                   loss_fn: LossFn, layer: str, *, kind: str = "ggn", chunk_size: int = 100
                   ) -> CurvatureOperator:
    """The exact data-averaged GGN or Hessian block of one layer (``dataset_operator``).

    Args:
      apply_fn, params, loss_fn: as ``dataset_operator``.
      data: ``(inputs, targets)``.
      layer: a KFAC layer name (``'hidden_0'``, ``'block_0_0/conv_0'``): every parameter under
        that path of ``params``.
      kind: ``"ggn"`` or ``"hessian"``.
      chunk_size: examples per chunk.
    """
    path = _layer_path(params, layer)
    return dataset_operator(apply_fn, loss_fn, params, data, kind=kind, chunk_size=chunk_size,
                            layers=lambda p, _: p[: len(path)] == tuple(map(str, path)))


def kfac_operator(factors: KroneckerFactors, exact: CurvatureOperator, layer: str
                  ) -> CurvatureOperator:
    """The block ``scale * A (x) G`` acting in the coordinates of ``exact`` (``layer_operator``).

    ``v`` is unflattened to the layer's ``{kernel, bias}``, ``M = layer_matrix`` of it mapped to
    ``scale * A M G`` (``= scale * kron(A, G) vec(M)``) and flattened back, so the same probe
    vector means the same parameter direction for both operators.
    """
    path = _layer_path(exact.params, layer)
    sub = _get(exact.params, path)
    kernel_shape = sub["kernel"].shape
    d_a, d_g = factors.a.shape[0], factors.g.shape[0]
    if layer_matrix(sub).shape != (d_a, d_g):
        raise ValueError(f"layer {layer!r} has a {layer_matrix(sub).shape} parameter matrix but "
                         f"the factors are {d_a} x {d_a} and {d_g} x {d_g}")

    kernel_rows = d_a - 1 if "bias" in sub else d_a

    def matvec(v: jax.Array) -> jax.Array:
        chex.assert_shape(v, (exact.dim,))
        tree = exact.unravel(v)
        m = factors.scale * (factors.a @ layer_matrix(_get(tree, path)) @ factors.g)
        new = {"kernel": m[:kernel_rows].reshape(kernel_shape)}
        if "bias" in sub:
            new["bias"] = m[-1]
        return exact.ravel(_replace(tree, path, new))

    return CurvatureOperator(matvec=matvec, dim=exact.dim, unravel=exact.unravel,
                             params=exact.params)
