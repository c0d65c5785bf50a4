"""Curvature-vector products over parameter pytrees, and operators built from them.

Three products, each pure, jit-able and vmap-able over anything they close over:

- ``hvp(loss_fn, params, v) = H v`` with ``H = d^2 loss / d params^2``, computed
  forward-over-reverse: the directional derivative of the gradient,
  ``jax.jvp(jax.grad(loss_fn), (params,), (v,))`` — about 2-3 gradients of cost and one
  gradient's memory (Pearlmutter 1994; Dagréou et al. 2024 for the JAX idiom).
- ``ggn_vp(predict_fn, output_loss_fn, params, v) = J^T H_out J v``, the generalized
  Gauss-Newton product (Schraudolph 2002; Martens 2020): ``J`` is the Jacobian of the model's
  outputs, ``H_out`` the Hessian of the loss with respect to the outputs. One jvp, one
  output-space HVP, one vjp. It equals the Hessian for a linear model with a convex loss.
- The data-averaged versions: for a data set with a leading example axis,
  ``H = (1/N) sum_i d^2 l(f(x_i; theta), y_i)``, accumulated chunk by chunk (``lax.scan``),
  so memory is that of one chunk whatever N is. A last, partial chunk is zero-padded and its
  padding carries weight 0.

A ``CurvatureOperator`` is such a product on flat vectors (what Lanczos needs), optionally
**restricted** to a subset of the parameters (one layer, a list of layers, or any predicate on
pytree paths): the restricted operator is the diagonal block ``H_SS`` of the full one, computed
by differentiating with respect to the selected leaves only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
LayerSelection = str | Sequence[str] | Callable[[tuple[str, ...], jax.Array], bool] | None


# --------------------------------------------------------------------------------------------
# Checks


def check_scalar_loss(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> None:
    """Raises a ValueError unless ``loss_fn(params)`` is a scalar."""
    out = jax.eval_shape(loss_fn, params)
    if not hasattr(out, "shape") or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(f"loss_fn must return a scalar, got shape {shape}; "
                         "average or sum the per-example losses")


def check_like(params: PyTree, v: PyTree, name: str = "v") -> None:
    """Raises a ValueError unless ``v`` has the pytree structure and leaf shapes of ``params``."""
    p_struct, v_struct = jax.tree.structure(params), jax.tree.structure(v)
    if p_struct != v_struct:
        raise ValueError(f"{name} must have the pytree structure of params; got {v_struct}, "
                         f"expected {p_struct}")
    for (path, p), q in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(v),
                            strict=True):
        if jnp.shape(p) != jnp.shape(q):
            raise ValueError(f"{name}{jax.tree_util.keystr(path)} has shape {jnp.shape(q)}, "
                             f"expected {jnp.shape(p)} as in params")


# --------------------------------------------------------------------------------------------
# Products


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
    """Hessian-vector product ``H v`` of a scalar ``loss_fn`` at ``params`` (forward-over-reverse).

    Args:
      loss_fn: ``loss_fn(params) -> scalar``.
      params: the point at which the Hessian is taken (any pytree of arrays).
      v: a pytree with the structure and shapes of ``params``.

    Returns:
      ``H v`` as a pytree like ``params``.
    """
    check_like(params, v)
    check_scalar_loss(loss_fn, params)
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def ggn_vp(predict_fn: Callable[[PyTree], PyTree], output_loss_fn: Callable[[PyTree], jax.Array],
           params: PyTree, v: PyTree) -> PyTree:
    """Generalized Gauss-Newton product ``J^T H_out J v``.

    Args:
      predict_fn: ``predict_fn(params) -> outputs`` (the model on a fixed batch).
      output_loss_fn: ``output_loss_fn(outputs) -> scalar`` (the loss on that batch as a
        function of the outputs only).
      params: the point of linearization.
      v: a pytree like ``params``.

    Returns:
      ``J^T H_out J v``, a pytree like ``params``.
    """
    check_like(params, v)
    outputs, jv = jax.jvp(predict_fn, (params,), (v,))
    check_scalar_loss(output_loss_fn, outputs)
    h_jv = jax.jvp(jax.grad(output_loss_fn), (outputs,), (jv,))[1]
    _, vjp_fn = jax.vjp(predict_fn, params)
    return vjp_fn(h_jv)[0]


# --------------------------------------------------------------------------------------------
# Restriction to a subset of the parameters


def _layer_tree(params: PyTree) -> PyTree:
    """The dict whose top-level keys are layer names (inside flax's ``{'params': ...}``)."""
    if isinstance(params, dict) and set(params) == {"params"}:
        return params["params"]
    return params


def selection_mask(params: PyTree, layers: LayerSelection) -> PyTree:
    """A pytree of bools like ``params``: True for the leaves ``layers`` selects.

    Args:
      params: a parameter pytree (flax ``params`` dict or ``{'params': ...}`` variables).
      layers: None (all parameters), a layer name, a list of layer names (top-level keys of the
        params dict), or a predicate ``fn(path, leaf) -> bool`` on key paths (tuples of str).
    """
    if layers is None:
        return jax.tree.map(lambda _: True, params)
    if callable(layers):
        def keep(path, leaf):
            names = tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                          for k in path)
            return bool(layers(names, leaf))

        mask = jax.tree_util.tree_map_with_path(keep, params)
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        tree = _layer_tree(params)
        if not isinstance(tree, dict):
            raise ValueError("selecting layers by name needs a dict of layers as params")
        unknown = [n for n in names if n not in tree]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; the params have layers {sorted(tree)}")
        chosen = {n: jax.tree.map(lambda _, sel=(n in names): sel, sub) for n, sub in tree.items()}
        mask = {"params": chosen} if tree is not params else chosen
    if not any(jax.tree.leaves(mask)):
        raise ValueError("the layer selection selects no parameters")
    return mask


def partition(params: PyTree, mask: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``params`` into (selected, rest); unselected leaves are None in ``selected``."""
    selected = jax.tree.map(lambda x, m: x if m else None, params, mask)
    rest = jax.tree.map(lambda x, m: None if m else x, params, mask)
    return selected, rest


def combine(selected: PyTree, rest: PyTree) -> PyTree:
    """Inverse of ``partition``."""
    return jax.tree.map(lambda s, r: r if s is None else s, selected, rest,
                        is_leaf=lambda x: x is None)


# --------------------------------------------------------------------------------------------
# Operators on flat vectors


class CurvatureOperator(NamedTuple):
    """A symmetric curvature matrix given by its product with flat vectors.

    Attributes:
      matvec: ``(dim,) -> (dim,)``, the product with the (restricted) curvature matrix.
      dim: the number of (selected) parameters.
      unravel: flat ``(dim,)`` vector -> pytree of the selected parameters (None elsewhere).
      params: the selected parameters (where the curvature is taken), as a pytree.
    """

    matvec: Callable[[jax.Array], jax.Array]
    dim: int
    unravel: Callable[[jax.Array], PyTree]
    params: PyTree

    def ravel(self, tree: PyTree) -> jax.Array:
        """Pytree of the selected parameters -> flat vector."""
        return ravel_pytree(tree)[0]


def _flat_operator(product: Callable[[PyTree, PyTree], PyTree], selected: PyTree
                   ) -> CurvatureOperator:
    flat, unravel = ravel_pytree(selected)

    def matvec(x: jax.Array) -> jax.Array:
        if jnp.shape(x) != flat.shape:
            raise ValueError(f"the operator acts on vectors of shape {flat.shape} (the "
                             f"selected parameters, flattened), got {jnp.shape(x)}")
        return ravel_pytree(product(selected, unravel(x.astype(flat.dtype))))[0]

    return CurvatureOperator(matvec=matvec, dim=int(flat.size), unravel=unravel, params=selected)


def hessian_operator(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *,
                     layers: LayerSelection = None) -> CurvatureOperator:
    """The Hessian of ``loss_fn`` at ``params`` (block of ``layers``) as a flat operator."""
    check_scalar_loss(loss_fn, params)
    selected, rest = partition(params, selection_mask(params, layers))
    restricted = lambda s: loss_fn(combine(s, rest))
    return _flat_operator(lambda p, v: jax.jvp(jax.grad(restricted), (p,), (v,))[1], selected)


def ggn_operator(predict_fn: Callable[[PyTree], PyTree],
                 output_loss_fn: Callable[[PyTree], jax.Array], params: PyTree, *,
                 layers: LayerSelection = None) -> CurvatureOperator:
    """The GGN ``J^T H_out J`` at ``params`` (block of ``layers``) as a flat operator."""
    selected, rest = partition(params, selection_mask(params, layers))
    restricted = lambda s: predict_fn(combine(s, rest))
    return _flat_operator(lambda p, v: ggn_vp(restricted, output_loss_fn, p, v), selected)


def model_outputs(apply_fn: Callable[..., Any], params: PyTree, inputs: jax.Array) -> jax.Array:
    """``apply_fn(params, inputs)``, or its first element when it returns a tuple.

    Our models return ``(outputs, features)``; the curvature is that of the outputs' loss.
    """
    out = apply_fn(params, inputs)
    return out[0] if isinstance(out, tuple) else out


def chunk_dataset(data: tuple[jax.Array, jax.Array], chunk_size: int
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Data reshaped to ``(num_chunks, chunk_size, ...)`` with per-example weights ``1/N``.

    ``sum_chunks sum_i w_i f(x_i, y_i)`` over the result is the data mean
    ``(1/N) sum_n f(x_n, y_n)``, so a ``lax.scan`` over the chunks accumulates a data average in
    the memory of one chunk. A partial last chunk is filled with copies of the first examples
    (real inputs, so a loss or normalization that is undefined at zero cannot inject NaN)
    carrying weight exactly 0.

    Args:
      data: ``(inputs, targets)`` with a common leading example axis of size ``N > 0``.
      chunk_size: examples per chunk (capped at ``N``).

    Returns:
      ``(inputs, targets, weights)`` of shapes ``(K, S, ...)``, ``(K, S, ...)`` and ``(K, S)``
      with ``K = ceil(N / S)`` chunks of ``S = min(chunk_size, N)`` examples.
    """
    inputs, targets = data
    n = inputs.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"inputs and targets need the same number of examples, got {n} and "
                         f"{targets.shape[0]}")
    if n == 0:
        raise ValueError("the data set is empty")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    chunk_size = min(chunk_size, n)
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n

    def reshape(a: jax.Array) -> jax.Array:
        a = a[jnp.arange(num_chunks * chunk_size) % n] if pad else a
        return a.reshape((num_chunks, chunk_size, *a.shape[1:]))

    weights = jnp.concatenate([jnp.full((n,), 1.0 / n), jnp.zeros((pad,))])
    return reshape(inputs), reshape(targets), weights.reshape((num_chunks, chunk_size))


def check_per_example_loss(apply_fn: Callable[..., Any],
                           loss_fn: Callable[[jax.Array, jax.Array], jax.Array], params: PyTree,
                           inputs: jax.Array, targets: jax.Array) -> None:
    """Raises a ValueError unless ``loss_fn`` returns one loss per example of the batch."""
    out = jax.eval_shape(lambda p, x, y: loss_fn(model_outputs(apply_fn, p, x), y), params,
                         inputs, targets)
    expected = (inputs.shape[0],)
    if getattr(out, "shape", None) != expected:
        raise ValueError(f"loss_fn(outputs, targets) must return one loss per example, shape "
                         f"{expected}, got {getattr(out, 'shape', type(out).__name__)}; do not "
                         "average inside it (the data operators weight the examples)")


def dataset_loss(apply_fn: Callable[..., Any], loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                 params: PyTree, data: tuple[jax.Array, jax.Array], *, chunk_size: int = 100
                 ) -> jax.Array:
    """Mean per-example loss over ``data``, evaluated chunk by chunk."""
    xs, ys, ws = chunk_dataset(data, chunk_size)
    check_per_example_loss(apply_fn, loss_fn, params, xs[0], ys[0])

    def body(total, chunk):
        x, y, w = chunk
        losses = loss_fn(model_outputs(apply_fn, params, x), y)
        return total + jnp.sum(w * losses), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ys, ws))[0]


def dataset_operator(apply_fn: Callable[..., Any],
                     loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
                     params: PyTree, data: tuple[jax.Array, jax.Array], *,
                     kind: str = "hessian", chunk_size: int = 100,
                     layers: LayerSelection = None) -> CurvatureOperator:
    """The data-averaged Hessian or GGN of a model's loss, as a flat operator.

    ``H = (1/N) sum_i d^2/dtheta^2 loss_fn(f(x_i; theta), y_i)`` (or the GGN
    ``(1/N) sum_i J_i^T H_out,i J_i``), accumulated over chunks of ``chunk_size`` examples with
    ``lax.scan``, so memory is that of one chunk.

    Args:
      apply_fn: ``apply_fn(params, inputs) -> outputs``; a tuple return (our models'
        ``(outputs, features)``) uses its first element. For any other output structure, wrap:
        ``lambda p, x: model.apply({'params': p}, x)['logits']``.
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (batch,)``.
      params: where the curvature is taken.
      data: ``(inputs, targets)`` with a leading example axis.
      kind: ``"hessian"`` or ``"ggn"``.
      chunk_size: examples per chunk (the last chunk may be partial).
      layers: restrict to these layers (see ``selection_mask``).
    """
    if kind not in ("hessian", "ggn"):
        raise ValueError(f"kind must be 'hessian' or 'ggn', got {kind!r}")
    xs, ys, ws = chunk_dataset(data, chunk_size)
    check_per_example_loss(apply_fn, loss_fn, params, xs[0], ys[0])
    selected, rest = partition(params, selection_mask(params, layers))

    def chunk_product(p: PyTree, v: PyTree, x: jax.Array, y: jax.Array, w: jax.Array) -> PyTree:
        outputs_of = lambda s: model_outputs(apply_fn, combine(s, rest), x)
        weighted_loss = lambda out: jnp.sum(w * loss_fn(out, y))
        if kind == "ggn":
            return ggn_vp(outputs_of, weighted_loss, p, v)
        return jax.jvp(jax.grad(lambda s: weighted_loss(outputs_of(s))), (p,), (v,))[1]

    def product(p: PyTree, v: PyTree) -> PyTree:
        def body(total, chunk):
            x, y, w = chunk
            return jax.tree.map(jnp.add, total, chunk_product(p, v, x, y, w)), None

        zeros = jax.tree.map(jnp.zeros_like, v)
        return jax.lax.scan(body, zeros, (xs, ys, ws))[0]

    return _flat_operator(product, selected)
