"""Lanczos on operators with known spectra: diagonal, rank-deficient, and against numpy; the
compiled program's size against the steps and the data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from spectral_plasticity.curvature import dataset_operator, lanczos, ritz_pairs, tridiagonal

from .conftest import cross_entropy


def _orthogonal(n, seed):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))[0]


def test_diagonal_operator_full_run_recovers_every_eigenvalue():
    d = jnp.arange(1.0, 101.0)
    result = lanczos(lambda v: d * v, jnp.ones(100), 100, return_basis=True)
    ritz = ritz_pairs(result)
    np.testing.assert_allclose(np.sort(ritz.values), np.arange(1, 101), atol=1e-5 * 100)
    # The basis is orthonormal and T = V^T A V.
    basis = np.asarray(result.basis, np.float64)
    np.testing.assert_allclose(basis @ basis.T, np.eye(100), atol=1e-5)
    np.testing.assert_allclose(tridiagonal(result), basis @ np.diag(np.arange(1.0, 101)) @ basis.T,
                               atol=1e-3)
    # Start vector of ones: the spectral measure is uniform over the eigenvalues.
    np.testing.assert_allclose(ritz.weights[np.argsort(ritz.values)], np.full(100, 0.01),
                               rtol=1e-3)


def test_extreme_ritz_values_converge_first():
    a = _orthogonal(300, 0)
    eigenvalues = np.concatenate([[50.0, 30.0, 20.0], np.random.default_rng(1).uniform(-1, 1, 297)])
    matrix = jnp.asarray(a @ np.diag(eigenvalues) @ a.T, jnp.float32)
    ritz = ritz_pairs(lanczos(lambda v: matrix @ v, jnp.ones(300), 40))
    top = np.sort(np.asarray(ritz.values))[::-1][:3]
    np.testing.assert_allclose(top, [50.0, 30.0, 20.0], rtol=1e-4)


@pytest.mark.parametrize("rank", [5, 20])
def test_rank_deficient_operator_breaks_down_without_nan(rank):
    n = 120
    a = _orthogonal(n, rank)
    s = np.zeros(n)
    s[:rank] = np.linspace(1.0, 10.0, rank)
    matrix = jnp.asarray(a @ np.diag(s) @ a.T, jnp.float32)
    v0 = jnp.asarray(np.random.default_rng(3).normal(size=n), jnp.float32)
    result = lanczos(lambda v: matrix @ v, v0, 60, return_basis=True)
    ritz = ritz_pairs(result)
    assert not np.isnan(np.asarray(ritz.values)).any()
    assert not np.isnan(np.asarray(result.basis)).any()
    # The Krylov space of v0 has dimension rank + 1 (the null-space component of v0).
    assert rank + 1 <= int(result.num_valid) <= rank + 2
    valid = np.sort(np.asarray(ritz.values)[np.asarray(ritz.valid)])
    np.testing.assert_allclose(valid[-rank:], s[:rank], rtol=1e-4)
    # Quadrature weights equal the squared components of v0 along the eigenvectors.
    u = np.asarray(v0, np.float64) / np.linalg.norm(v0)
    expected = (a[:, :rank].T @ u) ** 2
    got = np.asarray(ritz.weights)[np.asarray(ritz.valid)][np.argsort(valid)][-rank:]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(ritz.weights.sum()), 1.0, rtol=1e-6)


def test_lanczos_is_one_compiled_loop_and_vmaps():
    d = jnp.linspace(-2.0, 5.0, 50)
    matvec = lambda v: d * v
    run = jax.jit(jax.vmap(lambda v0: ritz_pairs(lanczos(matvec, v0, 50)).values))
    starts = jax.random.normal(jax.random.key(0), (4, 50))
    values = run(starts)
    for row in np.asarray(values):
        np.testing.assert_allclose(np.sort(row), np.asarray(d), atol=1e-4)
    traces = []

    def counting_matvec(v):
        traces.append(1)
        return d * v

    jaxpr = str(jax.make_jaxpr(lambda v0: lanczos(counting_matvec, v0, 50).alphas)(starts[0]))
    assert len(traces) == 1  # the operator is traced once: no Python loop over the 50 steps
    assert "scan" in jaxpr or "while" in jaxpr


def _compiled_op_counts(problem, num_iters: int, chunk_size: int) -> dict[str, int]:
    """Matrix products, fused kernels and loops in XLA's optimized program of Lanczos over the
    chunked data operator (what compile time grows with: each kernel is code generated)."""

    def program(params, v0):
        op = dataset_operator(problem.apply, cross_entropy, params,
                              (problem.inputs, problem.labels), chunk_size=chunk_size)
        return lanczos(op.matvec, v0, num_iters).alphas

    v0 = jnp.ones(ravel_pytree(problem.params)[0].size)
    hlo = jax.jit(program).lower(problem.params, v0).compile().as_text()
    return {op: hlo.count(f" {op}(") for op in ("dot", "fusion", "while")}


def test_compiled_program_does_not_grow_with_steps_or_chunks(mlp_problem):
    # 4 steps over 4 chunks of 16 examples and 40 steps over 8 chunks of 8 compile to the same
    # program: neither loop is unrolled and the HVP is emitted once, so compile time is a fixed
    # cost, whatever num_iters and the data size (benchmarks/curvature.py --compile).
    small = _compiled_op_counts(mlp_problem, 4, 16)
    assert small == _compiled_op_counts(mlp_problem, 40, 8)
    assert small["while"] == 2 and small["dot"] > 0  # the Lanczos loop and the chunk loop


def test_bad_num_iters():
    with pytest.raises(ValueError, match="num_iters must be between 1 and the dimension 10"):
        lanczos(lambda v: v, jnp.ones(10), 11)


def test_v0_must_be_a_flat_vector():
    with pytest.raises(ValueError, match="v0 must be a flat vector, got shape \\(2, 5\\)"):
        lanczos(lambda v: v, jnp.ones((2, 5)), 3)
