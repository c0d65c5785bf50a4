"""Curvature products against dense jax.hessian / Jacobian references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature import (
    dataset_operator,
    ggn_operator,
    ggn_vp,
    hessian_operator,
    hvp,
    selection_mask,
)

from .conftest import cross_entropy


def _random_like(params, seed):
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(jax.random.key(seed), flat.shape))


@pytest.mark.parametrize("problem_name", ["mlp_problem", "conv_problem"])
def test_hvp_equals_dense_hessian_times_v(problem_name, request):
    problem = request.getfixturevalue(problem_name)
    v = _random_like(problem.params, 1)
    got = ravel_pytree(hvp(problem.loss, problem.params, v))[0]
    expected = problem.dense_hessian() @ np.asarray(ravel_pytree(v)[0], np.float64)
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * np.abs(expected).max())


def test_ggn_equals_dense_jt_h_j(mlp_problem):
    p = mlp_problem
    flat, unravel = ravel_pytree(p.params)
    predict = lambda params: p.apply(params, p.inputs)[0]
    out_loss = lambda logits: jnp.mean(cross_entropy(logits, p.labels))
    jac = np.asarray(jax.jacobian(lambda f: predict(unravel(f)).reshape(-1))(flat), np.float64)
    logits = predict(p.params)
    h_out = np.asarray(jax.hessian(lambda z: out_loss(z.reshape(logits.shape)))(
        logits.reshape(-1)), np.float64)
    v = _random_like(p.params, 2)
    expected = jac.T @ h_out @ jac @ np.asarray(ravel_pytree(v)[0], np.float64)
    got = ravel_pytree(ggn_vp(predict, out_loss, p.params, v))[0]
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=1e-5 * np.abs(expected).max())


def test_ggn_equals_hessian_for_linear_model_with_squared_loss():
    x = jax.random.normal(jax.random.key(0), (20, 5))
    y = jax.random.normal(jax.random.key(1), (20, 3))
    params = {"w": jax.random.normal(jax.random.key(2), (5, 3)), "b": jnp.zeros(3)}
    predict = lambda p: x @ p["w"] + p["b"]
    out_loss = lambda out: 0.5 * jnp.mean(jnp.sum((out - y) ** 2, axis=-1))
    loss = lambda p: out_loss(predict(p))
    v = _random_like(params, 3)
    np.testing.assert_allclose(ravel_pytree(ggn_vp(predict, out_loss, params, v))[0],
                               ravel_pytree(hvp(loss, params, v))[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [64, 10, 7])
def test_chunked_dataset_operator_equals_full_batch(mlp_problem, chunk_size):
    """Chunks of 10 and 7 leave a partial last chunk (64 = 6*10 + 4 = 9*7 + 1)."""
    p = mlp_problem
    for kind in ("hessian", "ggn"):
        op = dataset_operator(p.apply, cross_entropy, p.params, (p.inputs, p.labels), kind=kind,
                              chunk_size=chunk_size)
        v = jax.random.normal(jax.random.key(4), (op.dim,))
        if kind == "hessian":
            expected = p.dense_hessian() @ np.asarray(v, np.float64)
        else:
            predict = lambda params: p.apply(params, p.inputs)[0]
            out_loss = lambda logits: jnp.mean(cross_entropy(logits, p.labels))
            ref = ggn_operator(predict, out_loss, p.params)
            expected = np.asarray(ref.matvec(v), np.float64)
        np.testing.assert_allclose(jax.jit(op.matvec)(v), expected, rtol=5e-4,
                                   atol=5e-5 * np.abs(expected).max())


def test_layer_restriction_is_the_dense_hessian_block(conv_problem):
    p = conv_problem
    full = p.dense_hessian()
    # Indices of each leaf in the flat vector (ravel_pytree follows tree_leaves order).
    leaves = jax.tree_util.tree_leaves_with_path(p.params)
    offsets, start = {}, 0
    for path, leaf in leaves:
        offsets[jax.tree_util.keystr(path)] = np.arange(start, start + leaf.size)
        start += leaf.size
    for layers in ("conv_0", ["hidden_0", "head"]):
        names = [layers] if isinstance(layers, str) else layers
        idx = np.concatenate([o for k, o in offsets.items() if any(f"'{n}'" in k for n in names)])
        op = hessian_operator(p.loss, p.params, layers=layers)
        assert op.dim == len(idx)
        block = np.asarray(jax.jit(jax.vmap(op.matvec))(jnp.eye(op.dim)))
        np.testing.assert_allclose(block, full[np.ix_(idx, idx)], rtol=1e-3,
                                   atol=1e-4 * np.abs(full).max())


def test_predicate_selection_of_kernels_only(mlp_problem):
    p = mlp_problem
    mask = selection_mask(p.params, lambda path, leaf: path[-1] == "kernel")
    assert jax.tree.leaves(mask) == [k == "kernel" for k in
                                     [path[-1].key for path, _ in
                                      jax.tree_util.tree_leaves_with_path(p.params)]]
    op = hessian_operator(p.loss, p.params, layers=lambda path, leaf: path[-1] == "kernel")
    assert op.dim == sum(x.size for x in jax.tree.leaves(p.params) if x.ndim == 2)


def test_operators_vmap_over_seeds(mlp_problem):
    p = mlp_problem
    stacked = jax.vmap(lambda k: p.model.init(k, p.inputs)["params"])(
        jax.random.split(jax.random.key(0), 3))
    v = jax.random.normal(jax.random.key(1), (ravel_pytree(p.params)[0].size,))

    def one(params):
        return hessian_operator(p.loss, params).matvec(v)

    batched = jax.jit(jax.vmap(one))(stacked)
    for i in range(3):
        single = one(jax.tree.map(lambda x, i=i: x[i], stacked))
        np.testing.assert_allclose(batched[i], single, rtol=1e-4, atol=1e-6)


def test_bad_inputs_are_named(mlp_problem):
    p = mlp_problem
    v = _random_like(p.params, 0)
    with pytest.raises(ValueError, match="pytree structure"):
        hvp(p.loss, p.params, {"hidden_0": v["hidden_0"]})
    bad = jax.tree.map(lambda x: x, v)
    bad["head"]["bias"] = jnp.zeros(7)
    with pytest.raises(ValueError, match=r"v\['head'\]\['bias'\] has shape \(7,\)"):
        hvp(p.loss, p.params, bad)
    with pytest.raises(ValueError, match="must return a scalar"):
        hvp(lambda q: cross_entropy(p.apply(q, p.inputs)[0], p.labels), p.params, v)
    with pytest.raises(ValueError, match=r"unknown layers \['hidden_9'\]"):
        hessian_operator(p.loss, p.params, layers="hidden_9")
    with pytest.raises(ValueError, match="kind must be"):
        dataset_operator(p.apply, cross_entropy, p.params, (p.inputs, p.labels), kind="fisher")
    with pytest.raises(ValueError, match="same number of examples"):
        dataset_operator(p.apply, cross_entropy, p.params, (p.inputs, p.labels[:5]))


def test_partial_chunk_padding_never_reaches_the_loss():
    """A model undefined at zero inputs: zero padding would put 0 * inf = NaN into the sum."""
    x = jax.random.uniform(jax.random.key(0), (10, 3), minval=0.5, maxval=2.0)
    y = jax.random.normal(jax.random.key(1), (10,))
    params = {"w": jnp.array([0.3, -0.2, 0.5])}
    apply = lambda p, inputs: jnp.log(inputs) @ p["w"]
    per_example = lambda out, t: (jnp.sin(out) - t) ** 2
    op = dataset_operator(apply, per_example, params, (x, y), chunk_size=4)
    dense = jax.hessian(lambda w: jnp.mean(per_example(apply({"w": w}, x), y)))(params["w"])
    np.testing.assert_allclose(jax.vmap(op.matvec)(jnp.eye(3)), dense, rtol=1e-5, atol=1e-6)


def test_more_bad_inputs_are_named(mlp_problem):
    p = mlp_problem
    data = (p.inputs, p.labels)
    mean_loss = lambda out, y: jnp.mean(cross_entropy(out, y))
    with pytest.raises(ValueError, match="one loss per example, shape \\(10,\\), got \\(\\)"):
        dataset_operator(p.apply, mean_loss, p.params, data, chunk_size=10)
    op = dataset_operator(p.apply, cross_entropy, p.params, data, chunk_size=10)
    with pytest.raises(ValueError, match=f"vectors of shape \\({op.dim},\\)"):
        op.matvec(jnp.ones(op.dim + 1))
    predict = lambda params: p.apply(params, p.inputs)[0]
    with pytest.raises(ValueError, match="must return a scalar"):
        ggn_vp(predict, lambda out: cross_entropy(out, p.labels), p.params, p.params)
    with pytest.raises(ValueError, match="pytree structure"):
        ggn_vp(predict, lambda out: jnp.mean(cross_entropy(out, p.labels)), p.params,
               {"head": p.params["head"]})
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        dataset_operator(p.apply, cross_entropy, p.params, data, chunk_size=0)
