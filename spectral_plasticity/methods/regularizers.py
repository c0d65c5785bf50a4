"""Plasticity-preserving regularizers as optax gradient transformations.

Each function returns an ``optax.GradientTransformation`` (``...ExtraArgs`` where it needs
more than the gradient) with a ``NamedTuple`` state; it composes with ``optax.chain`` and works
under ``jax.jit`` and ``jax.vmap`` over stacked parameters of several seeds. "Before the
optimizer" transforms change the gradient ``g``; "after the optimizer" ones change the final
update ``u`` (a parameter step) and belong last in the chain.

- ``spectral_reg`` (L2-ER, He et al. 2025), before: ``g + lambda theta - beta grad mean_l
  erank(Phi_l)``, its L2 term ``optax.add_decayed_weights`` (schedules, ``mask``).
- ``l2_init`` (Kumar et al. 2023, "Maintaining plasticity via regenerative regularization"),
  before: ``g + lambda (theta - theta_0)``.
- ``spectral_norm_reg`` (Lewandowski et al. 2025, "Learning continually by spectral
  regularization"), before: the gradient of ``lambda [sum_W (sigma_max(W)^k - target^k)^2 +
  sum_b ||b||^2 + sum_s ||s - 1||^2]`` with ``sigma_max`` by one power-iteration step per update
  (vectors kept in the state).
- ``parseval`` (Cisse et al. 2017; Chung et al. 2024), before: the gradient of
  ``lambda sum_W ||W W^T - s I||_F^2`` with ``W`` the (units x inputs) matrix of a layer.
- ``shrink_perturb`` (Dohare et al. 2024's per-step form; Ash & Adams 2020), after:
  ``u - lambda (theta - anchor) + sigma * eps`` with ``anchor = 0`` (weight decay plus noise) or
  the initial parameters (interpolation toward them).

Kernels of rank 4 (convolutions, ``(kh, kw, in, out)``) are read as ``(kh*kw*in, out)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from spectral_plasticity.methods.effective_rank import Features, LayerChoice, erank_gradient
from spectral_plasticity.metrics import check_samples

PyTree = Any


def _is_zero(value: float | jax.Array) -> bool:
    """True for a Python zero (a traced strength, e.g. a vmapped hyperparameter, never is)."""
    return isinstance(value, int | float) and value == 0


def _check_non_negative(**values: float | jax.Array) -> None:
    """Raises for negative Python numbers; traced values (vmapped sweeps) are not checked."""
    for name, value in values.items():
        if isinstance(value, int | float) and value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")


def _leaf_name(path: tuple[Any, ...]) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def _as_matrix(kernel: jax.Array) -> jax.Array:
    """``(inputs, units)`` view of a Dense or Conv kernel."""
    return kernel.reshape((-1, kernel.shape[-1]))


def _is_kernel(path: tuple[Any, ...], leaf: jax.Array) -> bool:
    return _leaf_name(path) == "kernel" and leaf.ndim >= 2


# ------------------------------------------------------------------------------------------
# L2-ER


class SpectralRegState(NamedTuple):
    """The state of the L2 part (``optax.add_decayed_weights``: a step count for a schedule)."""

    l2: optax.OptState


def _under_mask(params: PyTree) -> bool:
    """True when ``params`` come from ``optax.masked`` (masked-out leaves are ``MaskedNode``)."""
    return any(isinstance(leaf, optax.MaskedNode) for leaf in
               jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)))


def _erank_term(params: PyTree, features_fn: Callable[[PyTree], Features] | None,
                layers: LayerChoice) -> PyTree:
    """``grad_theta mean_l erank(Phi_l(theta))``, with the errors a user can run into."""
    if features_fn is None:
        raise ValueError("spectral_reg with erank > 0 needs the extra argument "
                         "features_fn=lambda params: model features on the batch, e.g. "
                         "lambda p: layer_inputs(apply_fn, p, x) (a traced erank, e.g. under "
                         "optax.inject_hyperparams, counts as > 0)")
    if _under_mask(params):
        raise ValueError("spectral_reg's ER term needs all the params (the features depend on "
                         "every layer), but optax.masked hid some: use spectral_reg(..., "
                         "mask=...) to mask only the L2 term, or mask a spectral_reg with "
                         "erank=0 and add an unmasked one for the ER term")
    check_samples(jax.eval_shape(features_fn, params))
    return erank_gradient(features_fn, params, layers)


def spectral_reg(l2: optax.ScalarOrSchedule = 1e-3, erank: float | jax.Array = 1e-2, *,
                 layers: LayerChoice = "all", decoupled: bool = False,
                 mask: PyTree | Callable[[PyTree], PyTree] | None = None
                 ) -> optax.GradientTransformationExtraArgs:
    """L2-ER: L2 on the parameters plus ascent on the effective rank of hidden features.

    Coupled (default, as the paper; place before the optimizer)::

        g <- g + l2 * theta - erank * grad_theta mean_{l in layers} erank(Phi_l(theta))

    Decoupled (``decoupled=True``; place LAST in the chain, after the optimizer): both terms are
    applied as direct parameter steps, independent of the optimizer's scaling::

        u <- u - l2 * theta + erank * grad_theta mean_l erank(Phi_l(theta))

    The L2 term is ``optax.add_decayed_weights(l2, mask)`` (``-l2`` when decoupled): ``l2`` may
    be a schedule of the step count and ``mask`` restricts it (e.g. no L2 on biases). The
    features come from the extra argument ``features_fn``: a function of the parameters
    returning a dict of hidden features on the current batch, e.g. ``lambda p:
    layer_inputs(apply_fn, p, x)`` for any flax model (``curvature.layer_inputs``; nnx models
    through ``nnx_functional``) or ``lambda p: model.apply({'params': p}, x)[1]`` for ours.
    It is required unless ``erank`` is a Python 0. (For the joint objective in a single
    backward pass, add ``beta * erank_penalty(features)`` to the loss and use ``erank=0``.)
    Strengths may be traced (``jax.vmap`` sweeps, ``optax.inject_hyperparams``).

    Args:
      l2: L2 strength ``lambda >= 0``, or a schedule ``step -> lambda``.
      erank: ER strength ``beta >= 0``.
      layers: ``"all"`` hidden layers, ``"last_two"``, or layer names.
      decoupled: apply both terms after the optimizer (see above).
      mask: a pytree of bools like the params (or a function of the params returning one):
        True where L2 applies (``optax.add_decayed_weights``'s ``mask``). The ER term always
        acts on every parameter.

    Reference: He, Guo, Prakash et al. (2025), arXiv 2509.22335.
    """
    _check_non_negative(erank=erank, **({} if callable(l2) else {"l2": l2}))
    sign = -1.0 if decoupled else 1.0
    signed_l2 = (lambda count: sign * l2(count)) if callable(l2) else -l2 if decoupled else l2
    decay = optax.add_decayed_weights(signed_l2, mask)

    def init_fn(params: PyTree) -> SpectralRegState:
        return SpectralRegState(l2=decay.init(params))

    def update_fn(updates: PyTree, state: SpectralRegState, params: PyTree | None = None, *,
                  features_fn: Callable[[PyTree], Features] | None = None,
                  **extra_args: Any) -> tuple[PyTree, SpectralRegState]:
        del extra_args
        if params is None:
            raise ValueError("spectral_reg needs params: call update(grads, state, params, ...)")
        updates, l2_state = decay.update(updates, state.l2, params)
        if not _is_zero(erank):
            grads = _erank_term(params, features_fn, layers)
            updates = jax.tree.map(lambda u, g: u - sign * erank * g, updates, grads)
        return updates, SpectralRegState(l2=l2_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ------------------------------------------------------------------------------------------
# L2-Init


class L2InitState(NamedTuple):
    """The parameters at initialization, ``theta_0``."""

    initial_params: PyTree


def l2_init(strength: float) -> optax.GradientTransformation:
    """Regenerative regularization toward the initial parameters: ``g + lambda (theta - theta_0)``.

    ``theta_0`` is the ``params`` given to ``init``. Place before the optimizer.

    Reference: Kumar, Marklund & Van Roy (2023), "Maintaining plasticity in continual learning
    via regenerative regularization".
    """
    _check_non_negative(strength=strength)

    def init_fn(params: PyTree) -> L2InitState:
        return L2InitState(initial_params=params)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("l2_init needs params: call update(grads, state, params)")
        updates = jax.tree.map(lambda u, p, p0: u + strength * (p - p0), updates, params,
                               state.initial_params)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------------
# Spectral norm regularization


class SpectralNormState(NamedTuple):
    """Right singular-vector estimates per kernel (None for other leaves)."""

    vectors: PyTree


def largest_singular_value(kernel: jax.Array, v: jax.Array, num_iters: int = 1
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Power iteration on ``W = _as_matrix(kernel)``: ``(sigma_max, u, v)`` after ``num_iters``."""
    w = _as_matrix(kernel)
    for _ in range(num_iters):
        v = w.T @ (w @ v)
        v = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
    wv = w @ v
    sigma = jnp.linalg.norm(wv)
    return sigma, wv / jnp.maximum(sigma, 1e-12), v


def spectral_norm_reg(strength: float, k: int = 2, target: float = 1.0, *,
                      num_iters: int = 1) -> optax.GradientTransformation:
    """Spectral regularization: pull every layer's largest singular value to ``target``.

    Adds to the gradient that of ``lambda [sum_W (sigma_max(W)^k - target^k)^2 +
    sum_b ||b||^2 + sum_s ||s - 1||^2]`` over kernels ``W``, biases ``b`` and normalization
    scales ``s``; ``d sigma_max / d W = u v^T`` with the singular vectors from ``num_iters`` power
    iterations per update, warm-started from the previous ones. (The paper authors' code pulled
    ``sigma_max^2`` to 2; this pulls ``sigma_max`` to ``target`` = 1, as Lewandowski et al.)
    Place before the optimizer.

    Reference: Lewandowski, Bortkiewicz, Kumar, György, Schuurmans, Ostaszewski & Machado
    (2025), "Learning continually by spectral regularization", ICLR.
    """
    _check_non_negative(strength=strength, target=target)
    if k < 1 or num_iters < 1:
        raise ValueError(f"k and num_iters must be at least 1, got {k} and {num_iters}")

    def init_fn(params):
        def start(path, leaf):
            if not _is_kernel(path, leaf):
                return None
            n = _as_matrix(leaf).shape[1]
            return jnp.full((n,), 1.0 / jnp.sqrt(n), leaf.dtype)

        return SpectralNormState(vectors=jax.tree_util.tree_map_with_path(start, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("spectral_norm_reg needs params: call update(grads, state, params)")
        new_vectors = {}

        def grad_of(path, p, v):
            name = _leaf_name(path)
            if v is not None:
                sigma, u, v_new = largest_singular_value(p, v, num_iters)
                new_vectors[jax.tree_util.keystr(path)] = v_new
                coeff = 2.0 * (sigma ** k - target ** k) * k * sigma ** (k - 1)
                return (coeff * jnp.outer(u, v_new)).reshape(p.shape)
            if name == "bias":
                return 2.0 * p
            if name == "scale":
                return 2.0 * (p - 1.0)
            return jnp.zeros_like(p)

        reg = jax.tree_util.tree_map_with_path(grad_of, params, state.vectors,
                                               is_leaf=lambda x: x is None)
        vectors = jax.tree_util.tree_map_with_path(
            lambda path, v: None if v is None else new_vectors[jax.tree_util.keystr(path)],
            state.vectors, is_leaf=lambda x: x is None)
        updates = jax.tree.map(lambda u, r: u + strength * r, updates, reg)
        return updates, SpectralNormState(vectors=vectors)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------------
# Parseval


def parseval_penalty(params: PyTree, scale: float = 1.0) -> jax.Array:
    """``sum_W ||W W^T - scale * I||_F^2`` with ``W`` the (units x inputs) matrix per kernel."""
    total = jnp.zeros(())
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if _is_kernel(path, leaf):
            w = _as_matrix(leaf).T
            gram = w @ w.T
            total = total + jnp.sum((gram - scale * jnp.eye(gram.shape[0], dtype=gram.dtype)) ** 2)
    return total


class ParsevalState(NamedTuple):
    """``parseval`` keeps no statistics."""


def parseval(strength: float, scale: float = 1.0) -> optax.GradientTransformation:
    """Parseval regularization: ``g + lambda grad sum_W ||W W^T - s I||_F^2``.

    Keeps each layer's rows (units) near-orthogonal with squared norm ``s``. Place before the
    optimizer.

    References: Cisse et al. (2017), "Parseval networks"; Chung, Cheung, Mirchandani et al.
    (2024), "Parseval regularization for continual reinforcement learning".
    """
    _check_non_negative(strength=strength, scale=scale)

    def init_fn(params):
        del params
        return ParsevalState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("parseval needs params: call update(grads, state, params)")
        grads = jax.grad(parseval_penalty)(params, scale)
        return jax.tree.map(lambda u, g: u + strength * g, updates, grads), state

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------------------
# Shrink & Perturb


class ShrinkPerturbState(NamedTuple):
    """A PRNG key for the noise and, when shrinking toward them, the initial parameters."""

    key: jax.Array
    anchor: PyTree


def shrink_perturb(shrink: float, noise_std: float, *, toward: str = "zero",
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
    """Shrink & Perturb every step: ``u - shrink * (theta - anchor) + noise_std * eps``.

    ``anchor`` is 0 (``toward="zero"``: weight decay plus Gaussian noise, Dohare et al.'s
    per-step form) or the initial parameters (``toward="init"``: interpolation toward them).
    Place LAST in the chain (it is a parameter step). The noise key is split from the state's
    key every step; pass the extra argument ``key=`` to drive it from a per-seed key instead
    (as trainers vmapped over seeds do).

    References: Ash & Adams (2020), "On warm-starting neural network training"; Dohare et al.
    (2024), "Loss of plasticity in deep continual learning", Nature.
    """
    _check_non_negative(shrink=shrink, noise_std=noise_std)
    if toward not in ("zero", "init"):
        raise ValueError(f"toward must be 'zero' or 'init', got {toward!r}")
    if isinstance(shrink, int | float) and shrink > 1:
        raise ValueError(f"shrink must lie in [0, 1], got {shrink}")

    def init_fn(params):
        anchor = params if toward == "init" else None
        return ShrinkPerturbState(key=jax.random.key(seed), anchor=anchor)

    def update_fn(updates, state, params=None, *, key: jax.Array | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("shrink_perturb needs params: call update(grads, state, params)")
        next_key, noise_key = jax.random.split(state.key)
        noise_key = noise_key if key is None else key
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.tree.unflatten(treedef, list(jax.random.split(noise_key, len(leaves))))
        anchor = state.anchor if toward == "init" else jax.tree.map(jnp.zeros_like, params)
        updates = jax.tree.map(
            lambda u, p, a, k: u - shrink * (p - a)
            + noise_std * jax.random.normal(k, p.shape, p.dtype),
            updates, params, anchor, keys)
        return updates, ShrinkPerturbState(key=next_key, anchor=state.anchor)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
