"""Kronecker-factored (KFAC) curvature blocks of Dense and Conv layers, and their spectra.

For a layer with weights ``W`` (inputs ``a``, pre-activations ``s = W^T a``) the curvature block
of a loss averaged over examples is approximated by a Kronecker product (Martens & Grosse 2015):

    C_layer ~ scale * A (x) G,   A = E[a a^T],   G = E[g g^T],

with ``a`` the layer's input with a constant 1 appended when it has a bias, and ``g`` a
back-propagated output vector. Every eigenvalue of the block is a product
``scale * lambda_i(A) * lambda_j(G)``, its rank is ``rank(A) * rank(G)`` and its effective rank
(Roy & Vetterli 2007) is ``erank(A) * erank(G)`` (the entropy of a product distribution is the
sum of the entropies): a collapsing feature spectrum removes curvature directions
multiplicatively.

**Parameter order.** ``A (x) G`` acts on the row-major flattening of the ``(d_in [+1], d_out)``
matrix ``[kernel.reshape(-1, d_out); bias]`` (``layer_matrix``): rows index inputs (the bias row
last), columns outputs — flax's kernel layout.

**G from a batch** (``mode``), per example ``n`` with outputs ``f_n`` and per-example loss
``l_n = loss_fn(f_n, y_n)``; ``J_n = d f_n / d s_n``:

- ``"ggn"``: exact per output, ``G = E_n[J_n^T H_n J_n]`` with ``H_n = d^2 l_n / d f_n^2``,
  computed as ``sum_c mu_c (J_n^T u_c)(J_n^T u_c)^T`` over the eigenpairs ``(mu_c, u_c)`` of
  ``H_n`` (C backward passes). This is the GGN of ``ggn_vp`` / ``dataset_operator(kind='ggn')``
  (Botev, Ritter & Barber 2017); for one example the KFAC block of a Dense layer *equals* the
  exact GGN block.
- ``"fisher"``: the true Fisher, ``g_n = J_n^T grad_f l(f_n, y~)`` with targets ``y~`` sampled
  from the model (``sample_fn``; ``num_samples`` per example), key-driven. Equals ``"ggn"`` in
  expectation for losses that are negative log-likelihoods of exponential families in the
  outputs (softmax cross-entropy with ``sample_categorical``, ``0.5 ||f - y||^2`` with
  ``sample_gaussian``).
- ``"empirical"``: the empirical Fisher, ``g_n = J_n^T grad_f l(f_n, y_n)`` with the data targets.

**Conv layers** (Grosse & Martens 2016, KFC): ``a_{n,t}`` is the input patch at output location
``t`` (flattened in the kernel's ``(kh, kw, c_in)`` order, bias 1 appended), ``g_{n,t}`` the
output gradient there. Both factors are averaged over examples *and* the ``T`` locations,
``A = E_n[(1/T) sum_t a a^T]``, ``G = E_n[(1/T) sum_t g g^T]``, and the block is
``scale * A (x) G`` with ``scale = T``: KFC's ``Omega (x) Gamma`` with ``Omega = E[sum_t a a^T]``
and ``Gamma = E[(1/T) sum_t g g^T]``, and kfac-jax's convention exactly
(``Conv2DTwoKroneckerFactored`` normalizes both factors by ``batch * num_locations`` and has
``fixed_scale() = num_locations``). Dense layers have ``scale = 1``. kfac-jax's
``"ggn_exact"`` / ``"fisher_gradients"`` estimation modes give our ``"ggn"`` / ``"fisher"``
factors (its ``"fisher_empirical"`` divides G by an extra batch size).

**Capture.** Any ``apply_fn(params, inputs)`` that runs flax modules can be measured: a flax
method interceptor (``nn.intercept_methods``) on ``nn.Dense.__call__`` and ``nn.Conv.__call__``
records each layer's (patched, bias-augmented) input and adds a zero perturbation to its output,
whose vector-Jacobian product is ``g`` — no change to the model code, one forward pass and one
linearization per chunk. Layers are named by their module path joined with ``/``
(``'hidden_0'``, ``'block_0_0/conv_0'``), which is their path in ``params``. Models with
BatchNorm (ResNet-18) are measured in evaluation mode (running statistics, closed over by
``apply_fn``), where BatchNorm is a fixed per-channel affine map and examples are independent;
its scale and offset are not Dense/Conv parameters and have no KFAC block.

References: Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored
approximate curvature"; Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix
for convolution layers"; Botev, Ritter & Barber (2017), "Practical Gauss-Newton optimisation for
deep learning"; Roy & Vetterli (2007), "The effective rank"; He et al. (2025) for the
epsilon-rank; kfac-jax (github.com/google-deepmind/kfac-jax),
``curvature_blocks/kronecker_factored.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.linen.linear import canonicalize_padding

from spectral_plasticity.curvature.lanczos import lanczos, ritz_pairs
from spectral_plasticity.curvature.operators import (
    CurvatureOperator,
    chunk_dataset,
    dataset_operator,
    model_outputs,
)
from spectral_plasticity.curvature.spectrum import epsilon_count

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], Any]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
SampleFn = Callable[[jax.Array, jax.Array], jax.Array]
Layers = str | Collection[str] | None

MODES = ("ggn", "fisher", "empirical")
HIGHEST = jax.lax.Precision.HIGHEST
# Eigenvalues below RESOLVED * eps * lambda_max are not compared: Lanczos stops resolving
# directions at ~10 sqrt(m) eps ||A|| (lanczos.BREAKDOWN_FACTOR), 1e-4 relative in float32.
RESOLVED = 1e3


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


# --------------------------------------------------------------------------------------------
# Capturing layer inputs and output gradients


def layer_name(module: nn.Module) -> str:
    """A bound module's path joined with ``/`` (``'hidden_0'``, ``'block_0_0/conv_0'``)."""
    return "/".join(module.scope.path)


def conv_patches(module: nn.Conv, inputs: jax.Array) -> jax.Array:
    """Input patches of a flax ``nn.Conv`` at each output location (im2col).

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
    if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
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


def _with_bias_feature(features: jax.Array, use_bias: bool) -> jax.Array:
    if not use_bias:
        return features
    return jnp.concatenate([features, jnp.ones((*features.shape[:-1], 1), features.dtype)], -1)


class _Capture:
    """Flax method interceptor: records each Dense/Conv layer's (patched, bias-augmented) input
    and output; adds ``perturbations[layer]`` to the output when perturbations are given."""

    def __init__(self, layers: tuple[str, ...] | None,
                 perturbations: Mapping[str, jax.Array] | None = None) -> None:
        self.layers = layers
        self.perturbations = perturbations
        self.inputs: dict[str, jax.Array] = {}
        self.outputs: dict[str, jax.Array] = {}

    def __call__(self, next_fun: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], context: Any) -> Any:
        module = context.module
        if context.method_name != "__call__" or type(module) not in (nn.Dense, nn.Conv):
            return next_fun(*args, **kwargs)
        name = layer_name(module)
        if self.layers is not None and name not in self.layers:
            return next_fun(*args, **kwargs)
        if name in self.inputs:
            raise ValueError(f"layer {name!r} is applied more than once; KFAC needs each layer "
                             "applied once per forward pass")
        inputs = args[0] if args else kwargs["inputs"]
        if isinstance(module, nn.Dense):
            if inputs.ndim != 2:
                raise ValueError(f"KFAC needs Dense inputs of shape (batch, features); layer "
                                 f"{name!r} got {inputs.shape}")
            features = inputs
        else:
            features = conv_patches(module, inputs)
        self.inputs[name] = _with_bias_feature(features, module.use_bias)
        outputs = next_fun(*args, **kwargs)
        self.outputs[name] = outputs
        if self.perturbations is None:
            return outputs
        return outputs + self.perturbations[name]


def _layer_names(layers: Layers) -> tuple[str, ...] | None:
    """``layers`` as a tuple of names (a single name is one layer, not a set of characters)."""
    if layers is None:
        return None
    return (layers,) if isinstance(layers, str) else tuple(layers)


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

    Args:
      apply_fn: ``apply_fn(params, inputs)`` running a flax model, returning ``(batch, C)``
        outputs or ``(outputs, features)``; other variables (BatchNorm statistics) closed over.
      params: its params.
      inputs: a batch ``(batch, ...)``.
      layers: a layer name or names to capture (default: every ``nn.Dense`` and ``nn.Conv``).

    Returns:
      A ``LayerStatistics``.
    """
    layers = _layer_names(layers)

    def shapes() -> dict[str, jax.Array]:
        capture = _Capture(layers)
        with nn.intercept_methods(capture):
            model_outputs(apply_fn, params, inputs)
        return capture.outputs

    out_shapes = jax.eval_shape(shapes)
    if not out_shapes:
        raise ValueError(f"no nn.Dense or nn.Conv layer matched layers={layers!r}")
    if layers is not None and set(layers) - set(out_shapes):
        raise ValueError(f"unknown layers {sorted(set(layers) - set(out_shapes))}; the model's "
                         f"Dense and Conv layers are {sorted(out_shapes)}")

    def forward(perturbations: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        capture = _Capture(layers, perturbations)
        with nn.intercept_methods(capture):
            outputs = model_outputs(apply_fn, params, inputs)
        return outputs, capture.inputs

    zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in out_shapes.items()}
    outputs, vjp_fn, captured = jax.vjp(forward, zeros, has_aux=True)
    chex.assert_rank(outputs, 2)
    chex.assert_equal_shape_prefix([outputs, *captured.values()], 1)
    return LayerStatistics(outputs, captured, lambda u: vjp_fn(u)[0])


# --------------------------------------------------------------------------------------------
# Output cotangents per mode


def sample_categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """Integer labels sampled from ``softmax(logits)``: the Fisher of softmax cross-entropy."""
    return jax.random.categorical(key, logits)


def sample_gaussian(key: jax.Array, outputs: jax.Array) -> jax.Array:
    """Targets ``outputs + N(0, I)``: the Fisher of the loss ``0.5 ||f - y||^2``."""
    return outputs + jax.random.normal(key, outputs.shape, outputs.dtype)


def _check_mode(mode: str, num_samples: int, key: jax.Array | None,
                sample_fn: SampleFn | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    if mode == "fisher" and (key is None or sample_fn is None):
        raise ValueError("mode 'fisher' needs a PRNG key and sample_fn (e.g. sample_categorical "
                         "for softmax cross-entropy)")


def output_cotangents(outputs: jax.Array, targets: jax.Array, loss_fn: LossFn, mode: str,
                      key: jax.Array | None = None, sample_fn: SampleFn | None = None,
                      num_samples: int = 1) -> tuple[jax.Array, jax.Array]:
    """Output-space vectors ``u_k`` and coefficients ``c_k`` with ``G = E_n sum_k c_k g g^T``.

    Args:
      outputs: ``(batch, C)`` model outputs.
      targets: the batch's targets.
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (batch,)``.
      mode: ``"ggn"`` (``u`` = eigenvectors of each ``H_n``, ``c`` = eigenvalues), ``"fisher"``
        (``u`` = loss gradients at sampled targets, ``c = 1 / num_samples``) or ``"empirical"``
        (``u`` = loss gradients at the data targets, ``c = 1``).
      key, sample_fn, num_samples: for ``"fisher"``.

    Returns:
      ``(u, c)`` of shapes ``(K, batch, C)`` and ``(K, batch)``.
    """
    _check_mode(mode, num_samples, key, sample_fn)
    chex.assert_rank(outputs, 2)
    batch, num_outputs = outputs.shape
    losses = jax.eval_shape(loss_fn, outputs, targets)
    if getattr(losses, "shape", None) != (batch,):
        raise ValueError(f"loss_fn must return per-example losses of shape ({batch},), got "
                         f"{getattr(losses, 'shape', type(losses).__name__)}")
    grad_at = lambda t: jax.grad(lambda f: jnp.sum(loss_fn(f, t)))(outputs)
    if mode == "ggn":
        one = lambda f, t: loss_fn(f[None], jax.tree.map(lambda x: x[None], t))[0]
        hessians = jax.vmap(jax.hessian(one))(outputs, targets)
        chex.assert_shape(hessians, (batch, num_outputs, num_outputs))
        values, vectors = jnp.linalg.eigh(hessians)
        return jnp.transpose(vectors, (2, 0, 1)), values.T
    if mode == "empirical":
        return grad_at(targets)[None], jnp.ones((1, batch), outputs.dtype)
    samples = jax.vmap(lambda k: sample_fn(k, outputs))(jax.random.split(key, num_samples))
    return jax.vmap(grad_at)(samples), jnp.full((num_samples, batch), 1.0 / num_samples,
                                                outputs.dtype)


# --------------------------------------------------------------------------------------------
# Factors


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
    _check_mode(mode, num_samples, key, sample_fn)
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


# --------------------------------------------------------------------------------------------
# Spectra and ranks


class KroneckerSpectrum(NamedTuple):
    """Eigenvalues of a KFAC block.

    Attributes:
      eigenvalues: ``(d_a * d_g,)`` all products ``scale * lambda_i(A) * lambda_j(G)``, descending.
      a_eigenvalues: ``(d_a,)`` eigenvalues of ``A``, descending.
      g_eigenvalues: ``(d_g,)`` eigenvalues of ``G``, descending.
    """

    eigenvalues: jax.Array
    a_eigenvalues: jax.Array
    g_eigenvalues: jax.Array


def kronecker_spectrum(factors: KroneckerFactors) -> KroneckerSpectrum:
    """Every eigenvalue of ``scale * A (x) G`` from the eigenvalues of its two factors."""
    chex.assert_rank([factors.a, factors.g], 2)
    chex.assert_rank(factors.scale, 0)
    a_values = jnp.linalg.eigvalsh(factors.a)[::-1]
    g_values = jnp.linalg.eigvalsh(factors.g)[::-1]
    products = factors.scale * jnp.outer(a_values, g_values).reshape(-1)
    return KroneckerSpectrum(jnp.sort(products)[::-1], a_values, g_values)


def spectrum_effective_rank(eigenvalues: jax.Array) -> jax.Array:
    """Roy & Vetterli effective rank ``exp(-sum_i p_i log p_i)``, ``p = |lambda| / sum |lambda|``.

    For a second moment ``A = Phi^T Phi / N`` the eigenvalues are squared singular values of
    ``Phi``, so ``erank(A) <= metrics.effective_rank(Phi)`` (which uses the singular values).
    A zero spectrum (a layer whose units are all dead) has effective rank 0.
    """
    magnitudes = jnp.abs(eigenvalues.reshape(-1))
    total = jnp.sum(magnitudes)
    p = magnitudes / jnp.maximum(total, jnp.finfo(magnitudes.dtype).tiny)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
    return jnp.where(total > 0, jnp.exp(entropy), 0.0)


def numerical_rank(eigenvalues: jax.Array) -> jax.Array:
    """``#{|lambda| > n * eps * max |lambda|}``: numpy's ``matrix_rank`` rule (n x n matrix)."""
    magnitudes = jnp.abs(eigenvalues)
    tolerance = magnitudes.size * jnp.finfo(magnitudes.dtype).eps * jnp.max(magnitudes)
    return jnp.sum(magnitudes > tolerance)


def relative_epsilon_rank(eigenvalues: jax.Array, relative_eps: float) -> jax.Array:
    """Fraction of eigenvalues with ``|lambda| > relative_eps * max |lambda|``.

    The factors' scales are arbitrary (``A`` scales with the squared activations, ``G`` with the
    loss curvature), so their epsilon-ranks use a threshold relative to the largest eigenvalue:
    they measure the shape of each factor's spectrum, comparable across layers and tasks.
    """
    magnitudes = jnp.abs(eigenvalues)
    return jnp.mean(magnitudes > relative_eps * jnp.max(magnitudes))


class BlockRanks(NamedTuple):
    """Rank summaries of a KFAC block (all arrays, so they ``vmap``).

    Attributes:
      epsilon_rank: ``#{|scale * lambda_i(A) lambda_j(G)| > eps}`` (He et al.'s epsilon-rank of
        the block, as a count).
      epsilon_rank_fraction: ``epsilon_rank / (d_a * d_g)``.
      effective_rank: effective rank of all products (``= effective_rank_a * effective_rank_g``).
      effective_rank_a, effective_rank_g: effective ranks of the factors.
      epsilon_rank_a, epsilon_rank_g: ``relative_epsilon_rank`` of the factors.
      rank_a, rank_g: numerical ranks of the factors.
      rank: ``rank_a * rank_g``, the numerical rank of the block.
    """

    epsilon_rank: jax.Array
    epsilon_rank_fraction: jax.Array
    effective_rank: jax.Array
    effective_rank_a: jax.Array
    effective_rank_g: jax.Array
    epsilon_rank_a: jax.Array
    epsilon_rank_g: jax.Array
    rank_a: jax.Array
    rank_g: jax.Array
    rank: jax.Array


def block_ranks(spectrum: KroneckerSpectrum, eps: float, relative_eps: float = 1e-3
                ) -> BlockRanks:
    """Epsilon-ranks, effective ranks and the decomposition ``rank(A) x rank(G)`` of a block.

    Args:
      spectrum: from ``kronecker_spectrum``.
      eps: absolute threshold of the block's epsilon-rank (He et al. use 0.01-0.08).
      relative_eps: relative threshold of the factors' epsilon-ranks.
    """
    count = epsilon_count(spectrum.eigenvalues, eps)
    rank_a = numerical_rank(spectrum.a_eigenvalues)
    rank_g = numerical_rank(spectrum.g_eigenvalues)
    return BlockRanks(
        epsilon_rank=count,
        epsilon_rank_fraction=count / spectrum.eigenvalues.size,
        effective_rank=spectrum_effective_rank(spectrum.eigenvalues),
        effective_rank_a=spectrum_effective_rank(spectrum.a_eigenvalues),
        effective_rank_g=spectrum_effective_rank(spectrum.g_eigenvalues),
        epsilon_rank_a=relative_epsilon_rank(spectrum.a_eigenvalues, relative_eps),
        epsilon_rank_g=relative_epsilon_rank(spectrum.g_eigenvalues, relative_eps),
        rank_a=rank_a,
        rank_g=rank_g,
        rank=rank_a * rank_g,
    )


# --------------------------------------------------------------------------------------------
# Comparison with the exact per-layer curvature


def _layer_path(params: PyTree, layer: str) -> tuple[str, ...]:
    """Key path of ``layer`` (``'block_0_0/conv_0'``) in ``params`` (or ``{'params': ...}``)."""
    path = tuple(layer.split("/"))
    if isinstance(params, Mapping) and set(params) == {"params"}:
        path = ("params", *path)
    node = params
    for i, key in enumerate(path):
        if not isinstance(node, Mapping) or key not in node:
            known = sorted(node) if isinstance(node, Mapping) else type(node).__name__
            raise ValueError(f"unknown layer {layer!r}: no {key!r} under "
                             f"{'/'.join(path[:i]) or 'params'} (has {known})")
        node = node[key]
    return path


def _get(tree: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _replace(tree: Mapping[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
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
                            layers=lambda p, _: p[: len(path)] == path)


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


def wasserstein_distance(x: jax.Array, x_weights: jax.Array, y: jax.Array, y_weights: jax.Array
                         ) -> jax.Array:
    """Wasserstein-1 distance ``int |F_x(t) - F_y(t)| dt`` of two weighted point sets on the line.

    Weights are normalized to sum to 1 per set (zero weights are allowed).
    """
    chex.assert_rank([x, x_weights, y, y_weights], 1)
    chex.assert_equal_shape([x, x_weights])
    chex.assert_equal_shape([y, y_weights])
    points = jnp.concatenate([x, y])
    signed = jnp.concatenate([x_weights / jnp.sum(x_weights), -y_weights / jnp.sum(y_weights)])
    order = jnp.argsort(points)
    points, cdf_gap = points[order], jnp.cumsum(signed[order])
    return jnp.sum(jnp.abs(cdf_gap[:-1]) * jnp.diff(points))


class SpectrumComparison(NamedTuple):
    """KFAC vs exact spectrum of one layer (``compare_spectra``).

    Attributes:
      kfac_top: ``(k,)`` largest KFAC eigenvalues (exact products).
      exact_top: ``(k,)`` largest exact eigenvalues (Ritz values of the first probe; NaN where
        Lanczos found fewer).
      log_ratio: mean ``|log10(kfac_top / exact_top)|`` over pairs that both exceed
        ``RESOLVED * eps * kfac_top[0]`` (``eps`` of the dtype: smaller eigenvalues are rounding
        noise to Lanczos); 0: the top eigenvalues agree, 1: off by 10x on average.
      wasserstein: Wasserstein-1 distance between the SLQ spectral measures of the KFAC block
        and of the exact block (same probes, same steps), divided by the larger of the two
        measures' mean ``|lambda|``: scale-free, in ``[0, 2]``, 0 for equal blocks (two zero
        blocks included); ``c * exact`` vs ``exact`` gives ``|c - 1| / max(c, 1)``.
      exact_epsilon_rank: SLQ mass of the exact block outside ``[-eps, eps]`` (the paper's
        epsilon-rank of the layer, to set against the KFAC block's fraction).
    """

    kfac_top: jax.Array
    exact_top: jax.Array
    log_ratio: jax.Array
    wasserstein: jax.Array
    exact_epsilon_rank: jax.Array


def _slq_measure(matvec: Callable[[jax.Array], jax.Array], probes: jax.Array, num_iters: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Ritz values, quadrature weights and validity of one Lanczos run per probe (vmapped)."""

    def one(probe: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        ritz = ritz_pairs(lanczos(matvec, probe, num_iters))
        return ritz.values, ritz.weights, ritz.valid

    return jax.vmap(one)(probes)


def compare_spectra(factors: KroneckerFactors, exact: CurvatureOperator, layer: str, *,
                    key: jax.Array, num_iters: int = 30, num_probes: int = 1, k: int = 5,
                    eps: float = 0.01) -> SpectrumComparison:
    """Agreement of a layer's KFAC spectrum with its exact curvature spectrum.

    Stochastic Lanczos quadrature (Golub & Meurant 1997; Ghorbani et al. 2019) with the same
    Gaussian probes on both blocks gives two spectral measures ``mu = mean_probes sum_i w_i
    delta(theta_i)``; their Wasserstein-1 distance ``int |F_kfac - F_exact|``, relative to the
    larger mean ``|lambda|``, is the agreement on the whole density (the bulk near zero that
    epsilon-ranks count), 0 when the blocks are equal whatever SLQ's resolution.
    ``log_ratio`` summarizes the top of the spectrum. (A correlation of sorted log eigenvalues
    is not used: two decreasing sequences correlate whatever their values.)

    Args:
      factors: the layer's KFAC factors.
      exact: the exact block, ``layer_operator(..., layer)``.
      layer: the layer's name.
      key: PRNG key for the probes.
      num_iters: Lanczos steps per probe (capped at the dimension).
      num_probes: SLQ probes (vmapped; each holds a ``(num_iters, dim)`` basis).
      k: top eigenvalues compared; at most ``num_iters``.
      eps: threshold of ``exact_epsilon_rank``.
    """
    spectrum = kronecker_spectrum(factors)
    dim = spectrum.eigenvalues.size
    if dim != exact.dim:
        raise ValueError(f"the KFAC block has dimension {dim} but the operator has dimension "
                         f"{exact.dim}")
    num_iters = min(num_iters, dim)
    if not 1 <= k <= num_iters or num_probes < 1:
        raise ValueError(f"need 1 <= k <= num_iters={num_iters} and num_probes >= 1, got k={k}, "
                         f"num_probes={num_probes}")
    probes = jax.random.normal(key, (num_probes, dim), spectrum.eigenvalues.dtype)
    nodes, weights, valid = _slq_measure(exact.matvec, probes, num_iters)
    kfac_nodes, kfac_weights, _ = _slq_measure(kfac_operator(factors, exact, layer).matvec,
                                               probes, num_iters)
    ranked = jnp.sort(jnp.where(valid[0], nodes[0], -jnp.inf))[::-1][:k]
    exact_top = jnp.where(jnp.isfinite(ranked), ranked, jnp.nan)
    kfac_top = spectrum.eigenvalues[:k]
    # Pairs above rounding level: Lanczos in finite precision resolves eigenvalues down to
    # about sqrt(m) eps ||A|| (its breakdown threshold), so smaller ones are noise on both sides.
    floor = RESOLVED * jnp.finfo(kfac_top.dtype).eps * kfac_top[0]
    both = (kfac_top > floor) & (exact_top > floor)
    logs = jnp.abs(jnp.log10(jnp.where(both, kfac_top, 1.0) / jnp.where(both, exact_top, 1.0)))
    log_ratio = jnp.sum(jnp.where(both, logs, 0.0)) / jnp.maximum(jnp.sum(both), 1)
    distance = wasserstein_distance(kfac_nodes.reshape(-1), kfac_weights.reshape(-1),
                                    nodes.reshape(-1), weights.reshape(-1))
    scale = jnp.maximum(jnp.sum(weights * jnp.abs(nodes)),
                        jnp.sum(kfac_weights * jnp.abs(kfac_nodes))) / num_probes
    outside = jnp.sum(jnp.where(jnp.abs(nodes) > eps, weights, 0.0)) / num_probes
    return SpectrumComparison(
        kfac_top=kfac_top, exact_top=exact_top, log_ratio=log_ratio,
        wasserstein=distance / jnp.maximum(scale, jnp.finfo(scale.dtype).tiny),
        exact_epsilon_rank=outside)


# --------------------------------------------------------------------------------------------
# One call for the trainers


def _top(values: jax.Array, k: int) -> jax.Array:
    """The first ``k`` of descending ``values``, NaN-padded to length ``k``."""
    return jnp.concatenate([values[:k], jnp.full((max(k - values.size, 0),), jnp.nan,
                                                  values.dtype)])


def kfac_diagnostics(apply_fn: ApplyFn, params: PyTree, inputs: jax.Array, targets: jax.Array,
                     *, loss_fn: LossFn, key: jax.Array, layers: Layers = None,
                     mode: str = "ggn", sample_fn: SampleFn | None = None, num_samples: int = 1,
                     eps: float = 0.01, relative_eps: float = 1e-3, num_top: int = 10,
                     compare: bool | Collection[str] = True, num_iters: int = 30,
                     num_probes: int = 1, chunk_size: int = 100) -> dict[str, jax.Array]:
    """KFAC factor spectra of every Dense/Conv layer, and their agreement with the exact GGN.

    Pure, ``jit``-able and ``vmap``-able over ``params`` and ``key`` (e.g. over seeds): every
    shape depends only on the model, the data's shapes and the static arguments.

    Per layer ``L`` (names as ``layer_statistics``), with ``A``, ``G`` from ``kfac_factors``:

    - ``kfac_erank_a/L``, ``kfac_erank_g/L``: effective ranks of ``A`` and ``G`` (the block's is
      their product);
    - ``kfac_eps_rank_a/L``, ``kfac_eps_rank_g/L``: fraction of the factor's eigenvalues above
      ``relative_eps`` times its largest (``relative_epsilon_rank``);
    - ``kfac_rank_a/L``, ``kfac_rank_g/L``: numerical ranks; the block's rank is their product;
    - ``kfac_eps_rank/L``: fraction of the block's eigenvalues ``scale * lambda_i(A)
      lambda_j(G)`` with magnitude above ``eps`` (He et al.'s epsilon-rank);
    - ``kfac_top_a/L``, ``kfac_top_g/L``: ``(num_top,)`` largest eigenvalues of ``A`` and
      ``G`` (NaN-padded when a factor is smaller);
    - for the layers ``compare`` selects: ``kfac_wasserstein/L`` and ``kfac_log_ratio/L``
      (``compare_spectra`` against Lanczos on the exact ``"ggn"`` block of ``L`` on the same
      data) and ``kfac_exact_eps_rank/L``, the exact block's SLQ epsilon-rank. The reference
      is the GGN whatever ``mode``: with ``"empirical"`` the distance includes the empirical
      Fisher's own departure from the GGN (Kunstner et al. 2019).

    ``A`` is uncentered (it is what the curvature block holds): with ReLU features its top
    eigenvector is close to the mean activation and can dominate ``kfac_erank_a``; the
    normalized ``kfac_top_a`` spectrum shows the rest.

    Args:
      apply_fn: ``apply_fn(params, inputs)`` of a flax model, returning outputs or
        ``(outputs, features)``; BatchNorm models in evaluation mode (see the module docstring).
      params: the parameters measured.
      inputs, targets: the data set (e.g. the held-out examples of the new task).
      loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)`` (convex in the outputs
        for ``"ggn"``).
      key: PRNG key (Fisher samples and Lanczos probes).
      layers: layer names to measure (default: every Dense and Conv layer).
      mode: ``"ggn"`` (exact G, ``C`` backward passes per chunk), ``"fisher"`` (needs
        ``sample_fn``; ``num_samples`` backward passes) or ``"empirical"`` (one).
      sample_fn, num_samples: for ``"fisher"``.
      eps: absolute epsilon-rank threshold of the blocks.
      relative_eps: relative epsilon-rank threshold of the factors.
      num_top: factor eigenvalues returned per layer.
      compare: the layers compared with their exact block: True (all measured layers), False
        (none) or a collection of names. Each costs ``num_probes * num_iters`` exact
        GGN-vector products over the data: the expensive part.
      num_iters, num_probes: Lanczos steps and SLQ probes of the comparison.
      chunk_size: examples per forward pass.

    Returns:
      ``{'kfac_<metric>/<layer>': array}`` of the factors' floating dtype (ranks too, so a
      NaN-filled copy can stand for unmeasured rows): scalars, and ``(num_top,)`` for
      ``kfac_top_*``.
    """
    chex.assert_equal_shape_prefix([inputs, targets], 1)
    if num_top < 1:
        raise ValueError(f"num_top must be at least 1, got {num_top}")
    sample_key, probe_key = jax.random.split(key)
    data = (inputs, targets)
    factors = kfac_factors(apply_fn, params, data, loss_fn, mode=mode, key=sample_key,
                           sample_fn=sample_fn, num_samples=num_samples, layers=layers,
                           chunk_size=chunk_size)
    compared = set(factors) if compare is True else set(_layer_names(compare or ()))
    if compared - set(factors):
        raise ValueError(f"compare names layers {sorted(compared - set(factors))} that are not "
                         f"measured; measured: {sorted(factors)}")
    out = {}
    for index, (layer, layer_factors) in enumerate(sorted(factors.items())):
        spectrum = kronecker_spectrum(layer_factors)
        ranks = block_ranks(spectrum, eps, relative_eps)
        out |= {f"kfac_erank_a/{layer}": ranks.effective_rank_a,
                f"kfac_erank_g/{layer}": ranks.effective_rank_g,
                f"kfac_eps_rank_a/{layer}": ranks.epsilon_rank_a,
                f"kfac_eps_rank_g/{layer}": ranks.epsilon_rank_g,
                f"kfac_rank_a/{layer}": ranks.rank_a.astype(spectrum.eigenvalues.dtype),
                f"kfac_rank_g/{layer}": ranks.rank_g.astype(spectrum.eigenvalues.dtype),
                f"kfac_eps_rank/{layer}": ranks.epsilon_rank_fraction,
                f"kfac_top_a/{layer}": _top(spectrum.a_eigenvalues, num_top),
                f"kfac_top_g/{layer}": _top(spectrum.g_eigenvalues, num_top)}
        if layer in compared:
            exact = layer_operator(apply_fn, params, data, loss_fn, layer, chunk_size=chunk_size)
            comparison = compare_spectra(
                layer_factors, exact, layer, key=jax.random.fold_in(probe_key, index),
                num_iters=num_iters, num_probes=num_probes, k=min(num_top, num_iters, exact.dim),
                eps=eps)
            out |= {f"kfac_wasserstein/{layer}": comparison.wasserstein,
                    f"kfac_log_ratio/{layer}": comparison.log_ratio,
                    f"kfac_exact_eps_rank/{layer}": comparison.exact_epsilon_rank}
    return out
