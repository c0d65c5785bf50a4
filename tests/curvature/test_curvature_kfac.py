"""KFAC factors against dense Jacobian/Hessian references, a direct im2col and kfac-jax."""

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from spectral_plasticity.curvature import (
    KroneckerFactors,
    block_ranks,
    compare_spectra,
    conv_patches,
    kfac_diagnostics,
    kfac_factors,
    kfac_matrix,
    kfac_operator,
    kronecker_spectrum,
    layer_matrix,
    layer_operator,
    numerical_rank,
    output_cotangents,
    relative_epsilon_rank,
    sample_categorical,
    sample_gaussian,
    spectrum_effective_rank,
    wasserstein_distance,
)
from spectral_plasticity.models import MLP, ResNet18

# One compilation per model, loss, options and shapes, shared by the tests.
jit_kfac = jax.jit(kfac_factors, static_argnums=(0, 3), static_argnames=(
    "mode", "sample_fn", "num_samples", "layers", "chunk_size"))
MLP_LAYERS = ("head", "hidden_0", "hidden_1")


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def half_squared_error(outputs, targets):
    return 0.5 * jnp.sum((outputs - targets) ** 2, axis=-1)


def applier(model):
    return lambda p, x: model.apply({"params": p}, x)


def init(model, seed, inputs):
    """Variables with ``model.init``'s structure, drawn with numpy (nothing to compile): kernels
    ``N(0, 1 / fan_in)``, BatchNorm scales and variances ``U(0.5, 1.5)``, the rest
    ``N(0, 0.1^2)``."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            values = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
        elif name in ("scale", "var"):
            values = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            values = rng.normal(0.0, 0.1, leaf.shape)
        return jnp.asarray(values, leaf.dtype)

    shapes = jax.eval_shape(model.init, jax.random.key(0), inputs)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class StridedConvNet(nn.Module):
    """conv 3x3 stride 2 SAME -> tanh -> conv 2x2 VALID -> tanh -> head."""

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), strides=2, padding="SAME", name="conv_0")(x))
        h = jnp.tanh(nn.Conv(2, (2, 2), padding="VALID", name="conv_1")(h))
        return nn.Dense(3, name="head")(h.reshape((x.shape[0], -1))), {}


def _mlp_data(n, seed=0, d_in=5, classes=3):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n, d_in)), jnp.float32),
            jnp.asarray(rng.integers(0, classes, n), jnp.int32))


class MLPProblem(NamedTuple):
    model: MLP
    params: dict
    apply_fn: object
    eight: tuple
    one: tuple


@pytest.fixture(scope="module")
def mlp():
    """A 5 -> 6 -> 4 -> 3 ReLU MLP (layers hidden_0, hidden_1, head) whose hidden_0 unit 2 is
    dead (bias -100), its apply_fn, eight examples and one of them alone (one whose nonzero
    curvature eigenvalues are within 10x of each other, as Lanczos resolves them in float32)."""
    model = MLP(hidden_sizes=(6, 4), num_outputs=3, activation="relu")
    params = init(model, 1, jnp.ones((1, 5)))["params"]
    params["hidden_0"]["bias"] = params["hidden_0"]["bias"].at[2].set(-100.0)
    inputs, labels = _mlp_data(8, seed=8)
    return MLPProblem(model, params, applier(model), (inputs, labels),
                      (inputs[:1], labels[:1]))


def _exact_ggn_blocks(apply_fn, params, inputs, loss_per_example, targets, layers):
    """Dense references per layer for the mean loss, on ``[kernel; bias]`` of each layer:
    the GGN block ``J^T H_out J`` and the gradient ``J^T grad_out``."""
    matrices = {layer: layer_matrix(params[layer]) for layer in layers}

    def outputs_of(ms):
        p = {**params, **{k: {"kernel": m[:-1], "bias": m[-1]} for k, m in ms.items()}}
        return apply_fn(p, inputs)[0].reshape(-1)

    mean_loss = lambda f: jnp.mean(loss_per_example(f.reshape(inputs.shape[0], -1), targets))
    outputs, jacobians, h_out, grad_out = jax.jit(lambda ms: (
        outputs_of(ms), jax.jacobian(outputs_of)(ms), jax.hessian(mean_loss)(outputs_of(ms)),
        jax.grad(mean_loss)(outputs_of(ms))))(matrices)
    h_out, grad_out = np.asarray(h_out, np.float64), np.asarray(grad_out, np.float64)
    blocks = {}
    for layer, jac in jacobians.items():
        jac = np.asarray(jac, np.float64).reshape(outputs.size, -1)
        blocks[layer] = (jac.T @ h_out @ jac, jac.T @ grad_out)
    return blocks


def test_single_example_kfac_block_equals_exact_ggn_block(mlp):
    exact = _exact_ggn_blocks(mlp.apply_fn, mlp.params, mlp.one[0], cross_entropy, mlp.one[1],
                              MLP_LAYERS)
    factors = jit_kfac(mlp.apply_fn, mlp.params, mlp.one, cross_entropy)
    # The empirical Fisher of one example is the outer product of its gradient.
    empirical = jit_kfac(mlp.apply_fn, mlp.params, mlp.one, cross_entropy, mode="empirical")
    assert set(factors) == set(MLP_LAYERS)
    for layer, (ggn, gradient) in exact.items():
        got = np.asarray(kfac_matrix(factors[layer]), np.float64)
        np.testing.assert_allclose(got, ggn, atol=1e-5 * np.abs(ggn).max(), err_msg=layer)
        np.testing.assert_allclose(np.asarray(kfac_matrix(empirical[layer]), np.float64),
                                   np.outer(gradient, gradient),
                                   atol=1e-5 * np.abs(gradient).max() ** 2, err_msg=layer)


def test_batch_factors_are_means_of_single_example_factors(mlp):
    """A and G are averages over examples; chunks (8 = 3 + 3 + 2, padded) change nothing."""
    inputs, labels = mlp.eight
    chunked = jit_kfac(mlp.apply_fn, mlp.params, mlp.eight, cross_entropy, chunk_size=3)
    singles = [jit_kfac(mlp.apply_fn, mlp.params, (inputs[i:i + 1], labels[i:i + 1]),
                        cross_entropy) for i in range(8)]
    for layer in MLP_LAYERS:
        for field in ("a", "g"):
            mean = np.mean([getattr(single[layer], field) for single in singles], axis=0)
            np.testing.assert_allclose(getattr(chunked[layer], field), mean, rtol=1e-5,
                                       atol=1e-7, err_msg=f"{layer}.{field}")
    # A of the first layer is the raw input second moment, of the second the hidden features'.
    features = np.asarray(jax.jit(mlp.apply_fn)(mlp.params, inputs)[1]["hidden_0"], np.float64)
    for layer, x in (("hidden_0", np.asarray(inputs, np.float64)), ("hidden_1", features)):
        augmented = np.concatenate([x, np.ones((8, 1))], axis=1)
        np.testing.assert_allclose(chunked[layer].a, augmented.T @ augmented / 8, rtol=1e-5,
                                   atol=1e-7)


def test_sampled_fisher_averages_to_exact_ggn_factor(mlp):
    ggn = jit_kfac(mlp.apply_fn, mlp.params, mlp.eight, cross_entropy, chunk_size=3)
    fisher = lambda key: jit_kfac(mlp.apply_fn, mlp.params, mlp.eight, cross_entropy,
                                  mode="fisher", key=key, sample_fn=sample_categorical,
                                  num_samples=4000, chunk_size=3)
    first, again, other = fisher(jax.random.key(5)), fisher(jax.random.key(5)), fisher(
        jax.random.key(6))
    for layer in MLP_LAYERS:
        np.testing.assert_array_equal(first[layer].g, again[layer].g)
        assert not np.array_equal(first[layer].g, other[layer].g)
        np.testing.assert_allclose(first[layer].a, ggn[layer].a, rtol=1e-5)
        error = np.linalg.norm(first[layer].g - ggn[layer].g) / np.linalg.norm(ggn[layer].g)
        assert error < 0.06, (layer, error)


def test_sampled_gaussian_fisher_averages_to_exact_ggn_factor():
    model = MLP(hidden_sizes=(4,), num_outputs=2, activation="tanh")
    inputs, targets = normal(0, 6, 3), normal(1, 6, 2)
    params = init(model, 2, inputs)["params"]
    ggn = jit_kfac(applier(model), params, (inputs, targets), half_squared_error)
    fisher = jit_kfac(applier(model), params, (inputs, targets), half_squared_error,
                      mode="fisher", key=jax.random.key(5), sample_fn=sample_gaussian,
                      num_samples=4000)
    for layer in ("hidden_0", "head"):
        np.testing.assert_allclose(fisher[layer].a, ggn[layer].a, rtol=1e-5)
        error = np.linalg.norm(fisher[layer].g - ggn[layer].g) / np.linalg.norm(ggn[layer].g)
        assert error < 0.06, (layer, error)


def test_ggn_cotangents_reconstruct_output_hessian():
    logits = normal(0, 4, 5)
    labels = jnp.array([0, 3, 4, 1])
    u, c = jax.jit(output_cotangents, static_argnums=(2, 3))(logits, labels, cross_entropy,
                                                              "ggn")
    assert u.shape == (5, 4, 5) and c.shape == (5, 4)
    rebuilt = np.einsum("kni,knj,kn->nij", u, u, c)
    p = np.asarray(jax.nn.softmax(logits), np.float64)  # H = diag(p) - p p^T per example.
    expected = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    np.testing.assert_allclose(rebuilt, expected, atol=1e-6)


def _im2col(x, kh, kw, stride, pad, dilation):
    """Direct, loop-based patches of an NHWC batch: (B, H', W', kh*kw*C), kernel order."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
    span_h, span_w = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
    out_h = (x.shape[1] - span_h) // stride + 1
    out_w = (x.shape[2] - span_w) // stride + 1
    patches = np.zeros((x.shape[0], out_h, out_w, kh * kw * x.shape[3]))
    for i in range(out_h):
        for j in range(out_w):
            rows = [i * stride + dilation * r for r in range(kh)]
            cols = [j * stride + dilation * c for c in range(kw)]
            patches[:, i, j] = x[:, rows][:, :, cols].reshape(x.shape[0], -1)
    return patches


class ConvProblem(NamedTuple):
    model: StridedConvNet
    params: dict
    apply_fn: object
    data: tuple


@pytest.fixture(scope="module")
def conv():
    """``StridedConvNet`` on five 7x7x2 images, shared by im2col and kfac-jax (undilated:
    kfac-jax 0.0.8's A of a dilated conv disagrees with the direct im2col)."""
    model = StridedConvNet()
    inputs = normal(0, 5, 7, 7, 2)
    params = init(model, 1, inputs)["params"]
    return ConvProblem(model, params, applier(model), (inputs, jnp.array([0, 2, 1, 1, 0])))


def test_conv_patches_of_a_dilated_strided_conv_match_direct_im2col():
    """Stride 2, SAME, dilation 2 on 7 pixels: 4 outputs; the dilated span is 5, so
    3 * 2 + 5 - 7 = 4 pixels of padding, 2 on each side."""
    layer = nn.Conv(3, (3, 3), strides=2, padding="SAME", kernel_dilation=2)
    inputs = normal(0, 2, 7, 7, 2)
    variables = init(layer, 1, inputs)
    patches, outputs = jax.jit(lambda v, x: (conv_patches(layer.bind(v), x),
                                             layer.apply(v, x)))(variables, inputs)
    expected = _im2col(inputs, 3, 3, 2, ((2, 2), (2, 2)), 2)
    np.testing.assert_allclose(patches, expected, atol=1e-6)
    # Flattened in the kernel's order: patches @ kernel (+ bias) is the convolution.
    kernel = np.asarray(variables["params"]["kernel"]).reshape(-1, 3)
    np.testing.assert_allclose(expected @ kernel + np.asarray(variables["params"]["bias"]),
                               outputs, atol=1e-5)


def test_conv_factors_match_direct_im2col(conv):
    """conv_0: stride 2, SAME; conv_1: stride 1, VALID; A and G against loop-based im2col."""
    (inputs, labels), params = conv.data, conv.params
    factors = jit_kfac(conv.apply_fn, params, conv.data, cross_entropy, mode="empirical")
    # SAME, stride 2 on 7 pixels: 4 outputs, 3 * 2 + 3 - 7 = 2 pixels of padding.
    patches_0 = _im2col(inputs, 3, 3, 2, ((1, 1), (1, 1)), 1)
    kernel, bias = params["conv_0"]["kernel"], params["conv_0"]["bias"]
    conv_0 = np.einsum("nhwi,io->nhwo", patches_0, np.asarray(kernel, np.float64).reshape(-1, 3))
    hidden = np.tanh(np.asarray(conv_0, np.float64) + np.asarray(bias))
    patches_1 = _im2col(hidden, 2, 2, 1, ((0, 0), (0, 0)), 1)
    for name, patches in (("conv_0", patches_0), ("conv_1", patches_1)):
        locations = patches.shape[1] * patches.shape[2]
        flat = np.concatenate([patches.reshape(-1, patches.shape[-1]),
                               np.ones((patches[..., 0].size, 1))], axis=1)
        np.testing.assert_allclose(factors[name].a, flat.T @ flat / (5 * locations),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
        assert float(factors[name].scale) == locations

    # G: the gradient of each example's loss w.r.t. the conv output, from the network written
    # as a function of that output.
    def loss_of_conv_output(z):
        h = jnp.tanh(z + bias)
        h = jnp.tanh(nn.Conv(2, (2, 2), padding="VALID").apply({"params": params["conv_1"]}, h))
        logits = nn.Dense(3).apply({"params": params["head"]}, h.reshape((5, -1)))
        return jnp.sum(cross_entropy(logits, labels))

    g = jax.jit(jax.grad(loss_of_conv_output))(jnp.asarray(conv_0, jnp.float32))
    g = np.asarray(g, np.float64).reshape(-1, 3)
    np.testing.assert_allclose(factors["conv_0"].g, g.T @ g / (5 * patches_0[..., 0][0].size),
                               rtol=1e-5, atol=1e-7)


def test_batchnorm_resnet_factors_in_evaluation_mode():
    """ResNet-18 with two one-block stages (a strided block with a 1x1 shortcut), BatchNorm with
    running statistics: every bias-free conv and the head are captured by their nested names;
    the stem's A against a direct im2col of the padded input."""
    model = ResNet18(num_outputs=3, stage_channels=(2, 4), blocks_per_stage=1)
    inputs = normal(0, 2, 4, 4, 3)
    variables = init(model, 1, inputs)
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
    factors = jit_kfac(apply_fn, variables["params"], (inputs, jnp.array([2, 0])),
                       cross_entropy)
    shapes = {name: (f.a.shape[0], f.g.shape[0], int(f.scale)) for name, f in factors.items()}
    assert shapes == {"stem": (27, 2, 16), "block_0_0/conv_0": (18, 2, 16),
                      "block_0_0/conv_1": (18, 2, 16), "block_1_0/conv_0": (18, 4, 4),
                      "block_1_0/conv_1": (36, 4, 4), "block_1_0/shortcut": (2, 4, 4),
                      "head": (5, 3, 1)}
    patches = _im2col(inputs, 3, 3, 1, ((1, 1), (1, 1)), 1).reshape(-1, 27)
    np.testing.assert_allclose(factors["stem"].a, patches.T @ patches / 32, rtol=1e-5,
                               atol=1e-6)
    for name, f in factors.items():
        assert np.all(np.isfinite(f.g)) and np.linalg.eigvalsh(f.g).min() > -1e-6, name


# --------------------------------------------------------------------------------------------
# kfac-jax as a second implementation


@pytest.fixture
def kfac_jax(monkeypatch):
    """kfac-jax 0.0.8, with its jaxpr evaluator adapted to jax >= 0.8's ``get_bind_params``."""
    kfac_jax = pytest.importorskip("kfac_jax")
    from kfac_jax._src import tag_graph_matcher

    def eval_jaxpr_eqn(eqn, in_values):
        params = eqn.primitive.get_bind_params(eqn.params)
        if isinstance(params, tuple):  # jax < 0.8 returned (subfuns, params)
            subfuns, params = params
            in_values = [*subfuns, *in_values]
        with jex.source_info_util.user_context(eqn.source_info.traceback):
            output = eqn.primitive.bind(*in_values, **params)
        return output if isinstance(output, list) else [output]

    monkeypatch.setattr(tag_graph_matcher, "eval_jaxpr_eqn", eval_jaxpr_eqn)
    return kfac_jax


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_factors_match_kfac_jax(kfac_jax, conv):
    model, params, (inputs, labels) = conv.model, conv.params, conv.data

    def loss(p, batch):
        logits = model.apply({"params": p}, batch[0])[0]
        kfac_jax.register_softmax_cross_entropy_loss(logits, batch[1])
        return jnp.mean(cross_entropy(logits, batch[1]))

    estimator = kfac_jax.BlockDiagonalCurvature(loss)
    args = (params, (inputs, labels))
    state = jax.jit(lambda key: estimator.init(key, args, exact_powers_to_cache=None,
                                               approx_powers_to_cache=None,
                                               cache_eigenvalues=False))(jax.random.key(2))
    update = jax.jit(lambda mode: estimator.update_curvature_matrix_estimate(
        state, ema_old=0.0, ema_new=1.0, identity_weight=0.0, batch_size=5,
        rng=jax.random.key(3), func_args=args, estimation_mode=mode), static_argnums=0)

    def their_factors(mode):
        updated = update(mode)
        out = {}
        for block, block_state in zip(estimator.blocks, updated.blocks_states, strict=True):
            kernel_shape = block.parameters_shapes[0]
            name = next(k for k, v in params.items() if v["kernel"].shape == kernel_shape)
            out[name] = (block_state.factors[0].value, block_state.factors[1].value,
                         block.fixed_scale())
        return out

    ours = jit_kfac(conv.apply_fn, params, conv.data, cross_entropy)
    theirs = their_factors("ggn_exact")
    assert set(theirs) == set(ours) == {"conv_0", "conv_1", "head"}
    for name, (a, g, scale) in theirs.items():
        np.testing.assert_allclose(ours[name].a, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[name].g, g, rtol=1e-4, atol=1e-7 * np.abs(g).max())
        assert float(ours[name].scale) == scale
    # kfac-jax's empirical Fisher divides G by the batch size once more.
    ours = jit_kfac(conv.apply_fn, params, conv.data, cross_entropy, mode="empirical")
    for name, (_, g, _) in their_factors("fisher_empirical").items():
        np.testing.assert_allclose(ours[name].g / 5, g, rtol=1e-4, atol=1e-7 * np.abs(g).max())


# --------------------------------------------------------------------------------------------
# Spectra, ranks and the comparison with Lanczos


def _random_factors(seed, d_a, rank_a, d_g, rank_g, scale=1.0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(d_a, rank_a)), dtype)
    y = jnp.asarray(rng.normal(size=(d_g, rank_g)), dtype)
    return KroneckerFactors(a=x @ x.T, g=y @ y.T, scale=jnp.asarray(scale, dtype))


def _effective_rank(values):
    p = np.abs(values) / np.abs(values).sum()
    return np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))


def test_kronecker_spectrum_and_ranks_match_dense_block():
    with jax.enable_x64(True):
        factors = _random_factors(0, 6, 3, 4, 2, scale=2.5, dtype=jnp.float64)
        spectrum, ranks = jax.jit(lambda f: (spectrum := kronecker_spectrum(f), block_ranks(
            spectrum, eps=1e-3, relative_eps=0.05)))(factors)
    dense = np.kron(np.asarray(factors.a), np.asarray(factors.g)) * 2.5
    expected = np.sort(np.linalg.eigvalsh(dense))[::-1]
    np.testing.assert_allclose(spectrum.eigenvalues, expected, atol=1e-10 * expected[0])
    assert (int(ranks.rank_a), int(ranks.rank_g)) == (3, 2)
    assert int(ranks.rank) == np.linalg.matrix_rank(dense) == 6
    assert int(ranks.epsilon_rank) == np.sum(np.abs(expected) > 1e-3)
    assert float(ranks.epsilon_rank_fraction) == pytest.approx(int(ranks.epsilon_rank) / 24)
    for factor, got in ((factors.a, ranks.epsilon_rank_a), (factors.g, ranks.epsilon_rank_g)):
        values = np.linalg.eigvalsh(np.asarray(factor))
        assert float(got) == pytest.approx(np.mean(values > 0.05 * values.max()))
    assert float(ranks.effective_rank) == pytest.approx(_effective_rank(expected), rel=1e-8)
    assert float(ranks.effective_rank) == pytest.approx(
        float(ranks.effective_rank_a) * float(ranks.effective_rank_g), rel=1e-8)
    # A layer whose units are all dead: zero factors have effective and numerical rank 0.
    zero = jax.jit(lambda v: (spectrum_effective_rank(v), numerical_rank(v),
                              relative_epsilon_rank(v, 1e-3)))(jnp.zeros(4))
    assert [float(z) for z in zero] == [0.0, 0.0, 0.0]


def test_wasserstein_distance_matches_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=7), rng.normal(1.0, 2.0, size=11)
    wx, wy = rng.uniform(size=7), rng.uniform(size=11)
    wy[3] = 0.0
    got = wasserstein_distance(jnp.asarray(x), jnp.asarray(wx), jnp.asarray(y), jnp.asarray(wy))
    expected = scipy.stats.wasserstein_distance(x, y, wx, wy)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def _dense(operator):
    return np.asarray(jax.jit(jax.vmap(operator.matvec))(jnp.eye(operator.dim)), np.float64)


def test_compare_spectra_with_exact_layer_ggn(mlp):
    """Eight copies of one example: the KFAC block *is* the exact block, so the two SLQ
    measures coincide. Eight examples: the comparison reports the distance of two spectra."""
    copies = jax.tree.map(lambda a: jnp.repeat(a, 8, axis=0), mlp.one)
    compare = jax.jit(lambda f, x, y, key: compare_spectra(
        f, layer_operator(mlp.apply_fn, mlp.params, (x, y), cross_entropy, "hidden_1",
                          chunk_size=3),
        "hidden_1", key=key, num_iters=28, num_probes=64, k=2, eps=1e-3))
    factors = jit_kfac(mlp.apply_fn, mlp.params, copies, cross_entropy,
                       chunk_size=3)["hidden_1"]
    assert kronecker_spectrum(factors).eigenvalues.size == 28
    same = compare(factors, *copies, jax.random.key(0))
    # A one-example GGN block has rank rank(a a^T) * rank(G) <= 1 * 2 (softmax drops one).
    np.testing.assert_allclose(same.exact_top, same.kfac_top, rtol=1e-3)
    assert float(same.log_ratio) < 1e-3 and float(same.wasserstein) < 1e-3
    wrong = compare(factors._replace(scale=jnp.asarray(3.0)), *copies, jax.random.key(0))
    assert float(wrong.log_ratio) == pytest.approx(np.log10(3.0), rel=1e-3)
    # Same probes, so the measures are the same quadrature scaled by 3: W1 = 2 mean |lambda|.
    assert float(wrong.wasserstein) == pytest.approx(2 / 3, rel=1e-3)

    factors = jit_kfac(mlp.apply_fn, mlp.params, mlp.eight, cross_entropy,
                       chunk_size=3)["hidden_1"]
    got = compare(factors, *mlp.eight, jax.random.key(1))
    # The exact block from the Jacobian (independent of the operators).
    ggn, _ = _exact_ggn_blocks(mlp.apply_fn, mlp.params, mlp.eight[0], cross_entropy,
                               mlp.eight[1], ["hidden_1"])["hidden_1"]
    exact = np.sort(np.linalg.eigvalsh(ggn))[::-1]
    kfac = np.sort(np.linalg.eigvalsh(np.asarray(kfac_matrix(factors), np.float64)))[::-1]
    np.testing.assert_allclose(got.exact_top, exact[:2], rtol=1e-3)
    assert float(got.log_ratio) == pytest.approx(np.mean(np.abs(np.log10(kfac[:2] / exact[:2]))),
                                                 rel=1e-2, abs=1e-4)
    # Exhaustive Lanczos (28 steps in dimension 28) is exact Gauss quadrature: each measure puts
    # the probes' squared components on the eigenvalues, 1/28 each on average.
    reference = (scipy.stats.wasserstein_distance(kfac, exact)
                 / max(np.abs(exact).mean(), np.abs(kfac).mean()))
    assert reference > 0.1
    assert float(got.wasserstein) == pytest.approx(reference, rel=0.35)
    fraction = np.mean(np.abs(exact) > 1e-3)  # Beta-distributed mass per probe
    standard_error = np.sqrt(fraction * (1 - fraction) / (28 / 2 + 1) / 64)
    assert abs(float(got.exact_epsilon_rank) - fraction) < 4 * standard_error


def test_layer_operator_uses_nested_names_and_fixed_batch_stats():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=True, name="norm")(x)
            return jnp.tanh(nn.Dense(4, name="dense")(h))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(Block(name="block")(x))

    model, data = Net(), _mlp_data(1, seed=5)
    variables = init(model, 0, data[0])
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])
    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
    factors = jit_kfac(apply_fn, variables["params"], data, cross_entropy)
    assert set(factors) == {"block/dense", "head"}
    operator = layer_operator(apply_fn, variables["params"], data, cross_entropy, "block/dense")
    # KFAC is exact on one example, in the operator's coordinates.
    np.testing.assert_allclose(_dense(kfac_operator(factors["block/dense"], operator,
                                                    "block/dense")),
                               _dense(operator), atol=1e-5 * np.abs(_dense(operator)).max())


# --------------------------------------------------------------------------------------------
# The trainers' entry point


def _diagnostics_reference(apply_fn, params, inputs):
    """Eigenvalues of A (hidden_1, head) from the returned features, of G (head) from the
    softmax: G of the head is E[diag(p) - p p^T]."""
    outputs, features = jax.jit(apply_fn)(params, inputs)
    moments = {}
    for layer, x in (("hidden_1", features["hidden_0"]), ("head", features["hidden_1"])):
        h = np.concatenate([np.asarray(x, np.float64), np.ones((len(x), 1))], axis=1)
        moments[layer] = np.linalg.eigvalsh(h.T @ h / len(x))[::-1]
    p = np.asarray(jax.nn.softmax(outputs), np.float64)
    g = np.linalg.eigvalsh(np.mean([np.diag(q) - np.outer(q, q) for q in p], axis=0))[::-1]
    return moments, g


def _check_diagnostics(out, apply_fn, params, inputs):
    a, g = _diagnostics_reference(apply_fn, params, inputs)
    np.testing.assert_allclose(out["kfac_top_a/hidden_1"], a["hidden_1"][:4], rtol=1e-4,
                               atol=1e-6 * a["hidden_1"][0])
    np.testing.assert_allclose(out["kfac_top_g/head"][:2], g[:2], rtol=1e-4, atol=1e-6 * g[0])
    assert np.isnan(out["kfac_top_g/head"][3])  # G of the head is 3 x 3
    assert float(out["kfac_erank_a/hidden_1"]) == pytest.approx(_effective_rank(a["hidden_1"]),
                                                                rel=1e-4)
    assert float(out["kfac_erank_g/head"]) == pytest.approx(_effective_rank(g), rel=1e-4)
    assert float(out["kfac_eps_rank_a/hidden_1"]) == pytest.approx(
        np.mean(a["hidden_1"] > 1e-3 * a["hidden_1"][0]))
    products = np.outer(a["head"], g)  # the head's block: scale 1
    assert float(out["kfac_eps_rank/head"]) == pytest.approx(np.mean(np.abs(products) > 0.01))
    # Softmax's Hessian has the null vector 1: rank(G) = C - 1 for the head.
    assert int(out["kfac_rank_g/head"]) == 3 - 1


def test_kfac_diagnostics_vmapped_over_seeds(mlp):
    """Two runs at once (as the sweep vmaps seeds): the MLP with its dead unit on eight
    examples, and other params on eight copies of one example (where KFAC is exact)."""
    diagnostics = jax.jit(jax.vmap(lambda p, x, y, key: kfac_diagnostics(
        mlp.apply_fn, p, x, y, loss_fn=cross_entropy, key=key, num_top=4, num_iters=10,
        chunk_size=3, compare=("hidden_1",))))
    other = init(mlp.model, 2, mlp.eight[0])["params"]
    copies = jax.tree.map(lambda a: jnp.repeat(a, 8, axis=0), mlp.one)
    stack = lambda *trees: jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)
    out = diagnostics(stack(mlp.params, other), *stack(mlp.eight, copies),
                      jax.random.split(jax.random.key(4), 2))
    names = {"erank_a", "erank_g", "eps_rank_a", "eps_rank_g", "rank_a", "rank_g", "eps_rank",
             "top_a", "top_g"}
    compared = {"wasserstein", "log_ratio", "exact_eps_rank"}
    assert set(out) == ({f"kfac_{n}/{layer}" for n in names for layer in MLP_LAYERS}
                        | {f"kfac_{n}/hidden_1" for n in compared})
    first, second = ({k: v[i] for k, v in out.items()} for i in range(2))
    _check_diagnostics(first, mlp.apply_fn, mlp.params, mlp.eight[0])
    _check_diagnostics(second, mlp.apply_fn, other, copies[0])
    # The dead unit: a zero feature of hidden_1's input (7 = 6 units + bias) and a zero
    # gradient of hidden_0's output.
    assert int(first["kfac_rank_a/hidden_1"]) == 7 - 1
    assert int(first["kfac_rank_g/hidden_0"]) == 6 - 1
    assert float(first["kfac_wasserstein/hidden_1"]) > 0.01
    assert 0.0 <= float(first["kfac_exact_eps_rank/hidden_1"]) <= 1.0 + 1e-6
    # One distinct example: rank(A) = 1, and the comparison finds the blocks equal.
    assert int(second["kfac_rank_a/hidden_1"]) == 1
    assert float(second["kfac_wasserstein/hidden_1"]) < 1e-3
    assert float(second["kfac_log_ratio/hidden_1"]) < 1e-3


def test_single_example_diagnostics_agree_exactly_on_a_batchnorm_resnet():
    """ResNet-18 (one stage) in evaluation mode: on one example the head's KFAC block is exact,
    so its SLQ measures coincide with the exact block's."""
    model = ResNet18(num_outputs=3, stage_channels=(2,), blocks_per_stage=1)
    inputs = normal(0, 1, 4, 4, 3)
    variables = init(model, 1, inputs)
    stats = jax.tree.map(lambda v: v + 0.3, variables["batch_stats"])
    apply_fn = lambda p, x: model.apply({"params": p, "batch_stats": stats}, x)
    out = jax.jit(lambda p: kfac_diagnostics(
        apply_fn, p, inputs, jnp.array([2]), loss_fn=cross_entropy, key=jax.random.key(2),
        num_iters=8, layers=("stem", "block_0_0/conv_1", "head"), compare=("head",)))(
            variables["params"])
    assert {k.split("/", 1)[1] for k in out} == {"stem", "block_0_0/conv_1", "head"}
    assert float(out["kfac_wasserstein/head"]) < 1e-3
    assert float(out["kfac_log_ratio/head"]) < 1e-3
    # No bias: A of a 3x3 conv on 2 channels is 18 x 18 (rank <= 16 locations of one example).
    assert int(out["kfac_rank_a/block_0_0/conv_1"]) <= 16
    assert int(out["kfac_rank_g/block_0_0/conv_1"]) <= 2


# --------------------------------------------------------------------------------------------
# Bad input


def _trace(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` evaluated abstractly: its errors, without compiling anything."""
    return jax.eval_shape(lambda: fn(*args, **kwargs))


def test_bad_inputs_raise_clear_errors(mlp):
    params, apply_fn = mlp.params, mlp.apply_fn
    data = mlp.eight
    for kwargs, message in [({"mode": "hessian"}, "mode must be one of"),
                            ({"mode": "fisher"}, "needs a PRNG key and sample_fn"),
                            ({"num_samples": 0}, "num_samples"),
                            ({"layers": ["hidden_0", "hidden_9"]}, "unknown layers")]:
        with pytest.raises(ValueError, match=message):
            _trace(kfac_factors, apply_fn, params, data, cross_entropy, **kwargs)
    with pytest.raises(ValueError, match="per-example losses"):
        _trace(kfac_factors, apply_fn, params, data, lambda f, y: jnp.mean(cross_entropy(f, y)))
    with pytest.raises(ValueError, match="same number of examples"):
        _trace(kfac_factors, apply_fn, params, (data[0], data[1][:3]), cross_entropy)
    with pytest.raises(ValueError, match="has no Dense or Conv layer: searched for nn.Dense"):
        _trace(kfac_factors, lambda p, x: (x @ p["w"], {}), {"w": jnp.ones((5, 3))}, data,
               cross_entropy)
    with pytest.raises(ValueError, match="unknown layer"):
        layer_operator(apply_fn, params, data, cross_entropy, "hidden_7")
    factors = _random_factors(0, 5, 5, 3, 3)
    operator = layer_operator(apply_fn, params, data, cross_entropy, "hidden_1")
    with pytest.raises(ValueError, match="dimension"):
        _trace(compare_spectra, factors, operator, "hidden_1", key=jax.random.key(0))
    with pytest.raises(ValueError, match="parameter matrix"):
        kfac_operator(factors, operator, "hidden_1")
    with pytest.raises(ValueError, match="'kernel'"):
        layer_matrix({"scale": jnp.ones(3)})
    with pytest.raises(ValueError, match="not measured"):
        _trace(kfac_diagnostics, apply_fn, params, *data, loss_fn=cross_entropy,
               key=jax.random.key(0), layers="head", compare=["hidden_0"])

    class Sequence3d(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x).sum(axis=1)

    class Shared(nn.Module):
        @nn.compact
        def __call__(self, x):
            dense = nn.Dense(5)
            return dense(dense(x))

    def odd_conv(**kwargs):
        class Odd(nn.Module):
            @nn.compact
            def __call__(self, x):
                return nn.Conv(2, (2, 2), **kwargs)(x).reshape((x.shape[0], -1)), {}

        return Odd()

    labels = jnp.array([0, 1])
    for model, inputs, message in [
            (Sequence3d(), jnp.ones((2, 3, 4)), r"Dense inputs of shape \(batch, features\)"),
            (Shared(), jnp.ones((2, 5)), "applied more than once"),
            (odd_conv(padding="CIRCULAR"), jnp.ones((2, 3, 3, 2)), "SAME, VALID or explicit"),
            (odd_conv(feature_group_count=2), jnp.ones((2, 3, 3, 2)), "ungrouped")]:
        abstract = jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]
        with pytest.raises(ValueError, match=message):
            jax.eval_shape(lambda p, model=model, inputs=inputs: kfac_factors(
                applier(model), p, (inputs, labels), cross_entropy), abstract)
