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

**Capture** (``capture``: the same interceptor as ``layer_inputs``). Any ``apply_fn(params,
inputs)`` that runs flax linen modules, or an nnx module through ``nnx_functional``, can be
measured: each Dense/Conv layer's (patched, bias-augmented) input is recorded and a zero
perturbation added to its output, whose vector-Jacobian product is ``g`` — no change to the
model code, one forward pass and one linearization per chunk. Layers are named by their path
in ``params`` joined with ``/`` (``'hidden_0'``, ``'block_0_0/conv_0'``, nnx ``'layers/0'``). Models
with BatchNorm (ResNet-18) are measured in evaluation mode (running statistics, closed over by
``apply_fn``; nnx: ``model.eval()``), where BatchNorm is a fixed per-channel affine map and
examples are independent; its scale and offset are not Dense/Conv parameters and have no KFAC block.

References: Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored
approximate curvature"; Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix
for convolution layers"; Botev, Ritter & Barber (2017), "Practical Gauss-Newton optimisation for
deep learning"; Roy & Vetterli (2007), "The effective rank"; He et al. (2025) for the
epsilon-rank; kfac-jax (github.com/google-deepmind/kfac-jax),
``curvature_blocks/kronecker_factored.py``.

The pieces, one concept per module: ``capture`` (layer inputs, output Jacobians),
``cotangents`` (``G``'s output vectors per mode), ``factors`` (``A``, ``G``), ``kronecker``
(spectra and ranks), ``layer_blocks`` (exact and KFAC layer operators), ``comparison``
(spectrum agreement, Wasserstein distance); this module: ``kfac_diagnostics``, one call for the
trainers.
"""

from __future__ import annotations

from collections.abc import Collection

import chex
import jax
import jax.numpy as jnp

from spectral_plasticity.curvature.capture import ApplyFn, Layers, PyTree, layer_names
from spectral_plasticity.curvature.comparison import compare_spectra
from spectral_plasticity.curvature.cotangents import LossFn, SampleFn
from spectral_plasticity.curvature.factors import KroneckerFactors, kfac_factors
from spectral_plasticity.curvature.kronecker import block_ranks, kronecker_spectrum
from spectral_plasticity.curvature.layer_blocks import layer_operator


def _top(values: jax.Array, k: int) -> jax.Array:
    """The first ``k`` of descending ``values``, NaN-padded to length ``k``."""
    return jnp.concatenate([values[:k], jnp.full((max(k - values.size, 0),), jnp.nan,
                                                  values.dtype)])


def _factor_metrics(layer: str, factors: KroneckerFactors, eps: float, relative_eps: float,
                    num_top: int) -> dict[str, jax.Array]:
    """``kfac_diagnostics``' rank and spectrum entries of one layer."""
    spectrum = kronecker_spectrum(factors)
    ranks = block_ranks(spectrum, eps, relative_eps)
    dtype = spectrum.eigenvalues.dtype
    return {f"kfac_erank_a/{layer}": ranks.effective_rank_a,
            f"kfac_erank_g/{layer}": ranks.effective_rank_g,
            f"kfac_eps_rank_a/{layer}": ranks.epsilon_rank_a,
            f"kfac_eps_rank_g/{layer}": ranks.epsilon_rank_g,
            f"kfac_rank_a/{layer}": ranks.rank_a.astype(dtype),
            f"kfac_rank_g/{layer}": ranks.rank_g.astype(dtype),
            f"kfac_eps_rank/{layer}": ranks.epsilon_rank_fraction,
            f"kfac_top_a/{layer}": _top(spectrum.a_eigenvalues, num_top),
            f"kfac_top_g/{layer}": _top(spectrum.g_eigenvalues, num_top)}


def _compare_layer(apply_fn: ApplyFn, params: PyTree, data: tuple[jax.Array, jax.Array],
                   loss_fn: LossFn, layer: str, factors: KroneckerFactors, *, key: jax.Array,
                   num_iters: int, num_probes: int, num_top: int, eps: float, chunk_size: int
                   ) -> dict[str, jax.Array]:
    """``kfac_diagnostics``' entries of one layer's KFAC spectrum against its exact GGN block."""
    exact = layer_operator(apply_fn, params, data, loss_fn, layer, chunk_size=chunk_size)
    comparison = compare_spectra(factors, exact, layer, key=key, num_iters=num_iters,
                                 num_probes=num_probes, k=min(num_top, num_iters, exact.dim),
                                 eps=eps)
    return {f"kfac_wasserstein/{layer}": comparison.wasserstein,
            f"kfac_log_ratio/{layer}": comparison.log_ratio,
            f"kfac_exact_eps_rank/{layer}": comparison.exact_epsilon_rank}


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
      apply_fn: ``apply_fn(params, inputs)`` of a flax model (linen, or nnx through
        ``nnx_functional``), returning outputs or ``(outputs, features)``; BatchNorm models in
        evaluation mode (see the module docstring).
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
    compared = set(factors) if compare is True else set(layer_names(compare or ()))
    if compared - set(factors):
        raise ValueError(f"compare names layers {sorted(compared - set(factors))} that are not "
                         f"measured; measured: {sorted(factors)}")
    out = {}
    for index, (layer, layer_factors) in enumerate(sorted(factors.items())):
        out |= _factor_metrics(layer, layer_factors, eps, relative_eps, num_top)
        if layer in compared:
            out |= _compare_layer(apply_fn, params, data, loss_fn, layer, layer_factors,
                                  key=jax.random.fold_in(probe_key, index), num_iters=num_iters,
                                  num_probes=num_probes, num_top=num_top, eps=eps,
                                  chunk_size=chunk_size)
    return out
