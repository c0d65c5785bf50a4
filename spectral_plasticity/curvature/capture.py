"""The inputs of every Dense and Conv layer of an unchanged flax model (linen or nnx).

The input of a layer is the post-activation feature of the layer before it, so intercepting
each ``nn.Dense``/``nn.Conv`` (linen) or ``nnx.Linear``/``nnx.Conv`` (nnx) call gives both
what the effective-rank regularizer and the feature metrics measure (``layer_inputs``) and
what KFAC's factor ``A`` averages (``layer_statistics``), with no ``sow`` and no change to the
model: one interceptor, ``_Capture``, serves both.

- **linen**: ``nn.intercept_methods`` on the layers' ``__call__``; a layer is named by its
  module path joined with ``/`` (``'hidden_0'``, ``'block_0_0/conv_0'``), its path in
  ``params``.
- **nnx**: ``nnx_functional(model)`` splits a module into ``(apply_fn, params)`` with ``params``
  a plain nested dict of the ``nnx.Param`` values (``nnx.split`` then ``nnx.to_pure_dict``), so
  every function of this library that takes ``apply_fn(params, inputs)`` and ``params`` takes
  it, and ``optax`` and orbax see an ordinary pytree. A layer is named by its attribute path
  (``'hidden_0'``, ``'layers/0'``). ``nnx.Linear``/``nnx.Conv`` store their kernel and bias
  in linen's layout, so the same network gives the same numbers in both APIs. While a capture
  is active the two nnx classes' ``__call__`` is wrapped (and restored on exit): nnx has no
  method interceptor, and nnx modules are plain Python objects.

Conv layers: ``layer_inputs`` flattens the input over locations, ``(batch * H * W, channels)``,
the samples of the previous layer's channel units (as ``metrics.feature_matrix``); KFAC takes
the input *patches* at each output location (``conv_patches``, im2col).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.linen.linear import canonicalize_padding

from spectral_plasticity.curvature.operators import model_outputs

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], Any]
Layers = str | Collection[str] | None
Transform = Callable[[Any, jax.Array, str], jax.Array]

HIGHEST = jax.lax.Precision.HIGHEST
LINEN_LAYERS = (nn.Dense, nn.Conv)
NNX_LAYERS = (nnx.Linear, nnx.Conv)
SEARCHED = "nn.Dense, nn.Conv (linen) and nnx.Linear, nnx.Conv (nnx)"

# id(layer) -> name of the nnx layers of the model that ``nnx_functional``'s apply_fn runs.
_NNX_NAMES: contextvars.ContextVar[dict[int, str] | None] = contextvars.ContextVar(
    "nnx_layer_names", default=None)


def layer_name(module: nn.Module) -> str:
    """A bound linen module's path joined with ``/`` (``'hidden_0'``, ``'block_0_0/conv_0'``)."""
    return "/".join(module.scope.path)


def layer_names(layers: Layers) -> tuple[str, ...] | None:
    """``layers`` as a tuple of names (a single name is one layer, not a set of characters)."""
    if layers is None:
        return None
    return (layers,) if isinstance(layers, str) else tuple(layers)


# --------------------------------------------------------------------------------------------
# nnx models as (apply_fn, params)


def _changed_variables(before: nnx.State, after: nnx.State) -> list[str]:
    """Paths of the variables whose value was assigned between two states (by identity: an
    assignment, even of equal values, makes a new array)."""
    old = dict(jax.tree_util.tree_leaves_with_path(before))
    name = lambda path: "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path
                                 if getattr(k, "name", None) != "value")
    return [name(path) for path, leaf in jax.tree_util.tree_leaves_with_path(after)
            if old.get(path) is not leaf]


def nnx_functional(model: nnx.Module) -> tuple[ApplyFn, dict[str, Any]]:
    """``(apply_fn, params)`` of an nnx module: the functional view every function here takes.

    ``params`` is the plain nested dict of the model's ``nnx.Param`` values; ``apply_fn(params,
    x)`` merges them with the rest of the model's state (``nnx.merge``) and calls it. Nothing of
    ``model`` is changed. The rest of the state (BatchNorm statistics, RNG counts) is closed
    over as a constant: a forward pass that changes it (BatchNorm or Dropout in training mode)
    raises, since a pure function of ``params`` cannot carry the change.

    Args:
      model: an ``nnx.Module`` (in evaluation mode if it holds BatchNorm or Dropout:
        ``model.eval()``).

    Returns:
      ``(apply_fn, params)``. To write trained ``params`` back into the model:
      ``state = nnx.state(model, nnx.Param); nnx.replace_by_pure_dict(state, params);
      nnx.update(model, state)``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"nnx_functional takes an nnx.Module, got {type(model).__name__}")
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(state)

    def apply_fn(params: Mapping[str, Any], inputs: jax.Array) -> Any:
        # Fresh Variables (merge shares them, and the forward pass may assign to them).
        param_state, rest_state = jax.tree.map(lambda x: x, (state, rest))
        nnx.replace_by_pure_dict(param_state, params)
        module = nnx.merge(graphdef, param_state, rest_state)
        names = {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(module)
                 if isinstance(node, NNX_LAYERS)}
        token = _NNX_NAMES.set(names)
        try:
            outputs = module(inputs)
        finally:
            _NNX_NAMES.reset(token)
        changed = _changed_variables(rest, nnx.state(module, nnx.Not(nnx.Param)))
        if changed:
            raise ValueError(
                f"the nnx model changed its non-parameter variables {changed} in the forward "
                "pass (BatchNorm or Dropout in training mode). Call model.eval() (or pass "
                "use_running_average=True / deterministic=True) before nnx_functional(model): "
                "the curvature, the features and spectral_reg are taken with those variables "
                "fixed")
        return outputs

    return apply_fn, params


# --------------------------------------------------------------------------------------------
# The interceptor


def conv_patches(module: nn.Conv | nnx.Conv, inputs: jax.Array) -> jax.Array:
    """Input patches of a flax convolution (linen ``nn.Conv`` or ``nnx.Conv``) per location.

    Args:
      module: the convolution (its kernel size, strides, padding and dilations are used).
      inputs: ``(batch, *spatial, c_in)`` channel-last inputs.

    Returns:
      ``(batch, *out_spatial, prod(kernel_size) * c_in)``, each patch flattened in the kernel's
      ``(*kernel_size, c_in)`` order, so ``patches @ kernel.reshape(-1, c_out) (+ bias)`` is the
      layer's output. Extracted with ``HIGHEST`` precision (an identity convolution must not
      round on accelerators).
    """
    kernel_size = ((module.kernel_size,) if isinstance(module.kernel_size, int)
                   else tuple(module.kernel_size))
    rank = len(kernel_size)
    if inputs.ndim != rank + 2:
        raise ValueError(f"KFAC needs conv inputs (batch, *spatial, channels) with one batch axis, "
                         f"got shape {inputs.shape} for a {rank}-d kernel")
    if module.feature_group_count != 1 or module.mask is not None:
        raise ValueError("KFAC supports ungrouped, unmasked convolutions only "
                         f"(feature_group_count={module.feature_group_count})")
    custom = (getattr(module, "conv_general_dilated", None),
              getattr(module, "conv_general_dilated_cls", None))
    if any(fn not in (None, jax.lax.conv_general_dilated) for fn in custom):
        raise ValueError("KFAC does not support a custom conv_general_dilated")
    padding = canonicalize_padding(module.padding, rank)
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
        raise ValueError(f"KFAC supports SAME, VALID or explicit padding, got {padding!r}")
    broadcast = lambda v: (1,) * rank if v is None else (v,) * rank if isinstance(v, int) else v
    spatial = "".join("HWDXYZ"[i] for i in range(rank))
    spec = f"N{spatial}C"
    patches = jax.lax.conv_general_dilated_patches(
        inputs, kernel_size, broadcast(module.strides), padding,
        lhs_dilation=broadcast(module.input_dilation),
        rhs_dilation=broadcast(module.kernel_dilation),
        dimension_numbers=(spec, f"{spatial}IO", spec),
        precision=HIGHEST,
    )
    # lax orders the patch features (c_in, *kernel_size); the kernel is (*kernel_size, c_in).
    c_in = inputs.shape[-1]
    patches = patches.reshape((*patches.shape[:-1], c_in, int(np.prod(kernel_size))))
    return jnp.swapaxes(patches, -1, -2).reshape((*patches.shape[:-2], -1))


def is_conv(module: Any) -> bool:
    """True for a linen or nnx convolution."""
    return isinstance(module, nn.Conv | nnx.Conv)


class _Capture:
    """Records ``transform(module, input, name)`` of each selected Dense/Conv layer and its
    output; adds ``perturbations[layer]`` to the output when perturbations are given."""

    def __init__(self, layers: tuple[str, ...] | None, transform: Transform,
                 perturbations: Mapping[str, jax.Array] | None = None) -> None:
        self.layers = layers
        self.transform = transform
        self.perturbations = perturbations
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.Array] = {}
        self.seen: list[str] = []

    def record(self, module: Any, name: str, call: Callable[[], jax.Array],
               inputs: jax.Array) -> jax.Array:
        self.seen.append(name)
        if self.layers is not None and name not in self.layers:
            return call()
        if name in self.inputs:
            raise ValueError(f"layer {name!r} is applied more than once; the capture needs each "
                             "layer applied once per forward pass")
        self.inputs[name] = self.transform(module, inputs, name)
        outputs = call()
        self.outputs[name] = outputs
        if self.perturbations is None:
            return outputs
        return outputs + self.perturbations[name]

    def __call__(self, next_fun: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], context: Any) -> Any:
        """The linen interceptor (``nn.intercept_methods``)."""
        module = context.module
        if context.method_name != "__call__" or type(module) not in LINEN_LAYERS:
            return next_fun(*args, **kwargs)
        inputs = args[0] if args else kwargs["inputs"]
        return self.record(module, layer_name(module), lambda: next_fun(*args, **kwargs), inputs)


def _nnx_wrapper(capture: _Capture, original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def call(self: Any, inputs: jax.Array, *args: Any, **kwargs: Any) -> Any:
        names = _NNX_NAMES.get()
        if names is None or id(self) not in names:
            raise ValueError(
                f"an nnx.{type(self).__name__} ran under a layer capture outside an apply_fn of "
                "nnx_functional: build (apply_fn, params) = nnx_functional(model) so its layers "
                "have names")
        return capture.record(self, names[id(self)],
                              lambda: original(self, inputs, *args, **kwargs), inputs)

    return call


@contextlib.contextmanager
def intercept(capture: _Capture) -> Iterator[None]:
    """Routes every linen Dense/Conv and nnx Linear/Conv call through ``capture``."""
    originals = {cls: cls.__call__ for cls in NNX_LAYERS}
    try:
        for cls, original in originals.items():
            cls.__call__ = _nnx_wrapper(capture, original)
        with nn.intercept_methods(capture):
            yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _check_found(capture: _Capture) -> None:
    if not capture.seen:
        raise ValueError(f"the model has no Dense or Conv layer: searched for {SEARCHED} "
                         "calls in one forward pass of apply_fn")
    missing = sorted(set(capture.layers or ()) - set(capture.inputs))
    if missing or not capture.inputs:
        raise ValueError(f"unknown layers {missing or list(capture.layers or ())}; the model's "
                         f"Dense and Conv layers are {sorted(set(capture.seen))}")


def captured(apply_fn: ApplyFn, params: PyTree, inputs: jax.Array, layers: Layers,
             transform: Transform, perturbations: Mapping[str, jax.Array] | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """One forward pass: ``(outputs, {layer: transform(input)}, {layer: layer output})``."""
    capture = _Capture(layer_names(layers), transform, perturbations)
    with intercept(capture):
        outputs = model_outputs(apply_fn, params, inputs)
    _check_found(capture)
    return outputs, capture.inputs, capture.outputs


# --------------------------------------------------------------------------------------------
# Features: the inputs of the layers


def _flat_input(module: Any, inputs: jax.Array, name: str) -> jax.Array:
    """A layer's input as ``(samples, units)``: flattened over everything but its last axis
    (Conv locations, tokens of a Dense applied to a sequence)."""
    del module, name
    return inputs.reshape((-1, inputs.shape[-1]))


def layer_inputs(apply_fn: ApplyFn, params: PyTree, inputs: jax.Array,
                 layers: Layers = None) -> dict[str, jax.Array]:
    """The input of every (or each selected) Dense/Conv layer: the hidden features of a model.

    The input of layer ``L`` is the post-activation output of the layer before it, so
    ``layer_inputs(...)['hidden_1']`` of our MLP is its ``features['hidden_0']``. A one-line
    ``features_fn`` for ``spectral_reg``, ``erank_ascent`` or ``metrics.feature_metrics``::

        features_fn = lambda p: layer_inputs(apply_fn, p, x)

    Differentiable in ``params``, ``jit``- and ``vmap``-able. Works for any
    ``apply_fn(params, inputs)`` that runs flax linen modules, and for nnx modules through
    ``nnx_functional``.

    Args:
      apply_fn: ``apply_fn(params, inputs)``, returning outputs (or ``(outputs, ...)``).
      params: its params.
      inputs: a batch ``(batch, ...)``.
      layers: None: every Dense/Conv layer except the first one applied (its input is the
        data, which no parameter changes); or a layer name or names, whose inputs are returned.

    Returns:
      ``{layer: (batch, d_in)}`` for Dense layers and ``(batch * H * W, c_in)`` for Conv
      layers (flattened over locations; any input ``(batch, ..., d_in)`` becomes
      ``(-1, d_in)``).
    """
    _, found, _ = captured(apply_fn, params, inputs, layers, _flat_input)
    if layers is None:
        first = next(iter(found))
        found = {name: x for name, x in found.items() if name != first}
        if not found:
            raise ValueError(f"the model has one Dense/Conv layer ({first!r}), whose input is the "
                             "data: no hidden features to capture")
    return found


# --------------------------------------------------------------------------------------------
# KFAC's view: bias-augmented inputs (patches) and the output Jacobian


def _with_bias_feature(features: jax.Array, use_bias: bool) -> jax.Array:
    if not use_bias:
        return features
    return jnp.concatenate([features, jnp.ones((*features.shape[:-1], 1), features.dtype)], -1)


def kfac_input(module: Any, inputs: jax.Array, name: str) -> jax.Array:
    """KFAC's ``a``: the (patched, for Conv) input with a constant 1 appended for a bias."""
    if is_conv(module):
        features = conv_patches(module, inputs)
    elif inputs.ndim != 2:
        raise ValueError(f"KFAC needs Dense inputs of shape (batch, features); layer "
                         f"{name!r} got {inputs.shape}")
    else:
        features = inputs
    return _with_bias_feature(features, module.use_bias)


class LayerStatistics(NamedTuple):
    """One forward pass's view of the Dense/Conv layers (``layer_statistics``).

    Attributes:
      outputs: ``(batch, C)`` model outputs.
      inputs: ``{layer: (batch, [*locations,] d_in [+1])}`` layer inputs (conv: patches).
      vjp: ``vjp(u)`` maps a ``(batch, C)`` output cotangent ``u`` to
        ``{layer: J_s^T u}`` of shape ``(batch, [*locations,] d_out)``.
    """

    outputs: jax.Array
    inputs: dict[str, jax.Array]
    vjp: Callable[[jax.Array], dict[str, jax.Array]]


def layer_statistics(apply_fn: ApplyFn, params: PyTree, inputs: jax.Array,
                     layers: Layers = None) -> LayerStatistics:
    """One forward pass that exposes every Dense/Conv layer's inputs and output Jacobian.

    A zero perturbation is added to each layer's output; the vector-Jacobian product with
    respect to it is ``J_s^T u``, the back-propagated output vector of KFAC's factor ``G``.

    Args:
      apply_fn: ``apply_fn(params, inputs)`` running a flax model (linen, or nnx through
        ``nnx_functional``), returning ``(batch, C)`` outputs or ``(outputs, features)``; other
        variables (BatchNorm statistics) closed over.
      params: its params.
      inputs: a batch ``(batch, ...)``.
      layers: a layer name or names to capture (default: every Dense and Conv layer).

    Returns:
      A ``LayerStatistics``.
    """
    out_shapes = jax.eval_shape(
        lambda: captured(apply_fn, params, inputs, layers, kfac_input)[2])

    def forward(perturbations: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        outputs, found, _ = captured(apply_fn, params, inputs, layers, kfac_input, perturbations)
        return outputs, found

    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in out_shapes.items()}
    outputs, vjp_fn, found = jax.vjp(forward, zeros, has_aux=True)
    chex.assert_rank(outputs, 2)
    chex.assert_equal_shape_prefix([outputs, *found.values()], 1)
    return LayerStatistics(outputs, found, lambda u: vjp_fn(u)[0])
