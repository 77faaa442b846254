"""deepem_jax._linalg against numpy.linalg.solve on random well-conditioned float64 systems."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax._linalg import cholesky_solve, pair_products, small_solve, symmetric


def _well_conditioned(rng, N, C):
    """(N, C, C) matrices with singular values in [1, 4], rows randomly permuted (so partial
    pivoting has to swap) and scaled over three decades."""
    U = np.linalg.qr(rng.normal(size=(N, C, C)))[0]
    V = np.linalg.qr(rng.normal(size=(N, C, C)))[0]
    A = U * rng.uniform(1.0, 4.0, (N, 1, C)) @ V
    A = np.take_along_axis(A, rng.permuted(np.tile(np.arange(C), (N, 1)), axis=1)[..., None], 1)
    return A * 10.0 ** rng.uniform(-1.5, 1.5, (N, 1, 1))


@pytest.mark.parametrize("C", [1, 2, 6])
def test_small_solve_matches_numpy(x64, C):
    rng = np.random.default_rng(C)
    A = _well_conditioned(rng, 200, C)
    b = rng.normal(size=(200, C))
    B = rng.normal(size=(200, C, 3))
    x = np.asarray(jax.jit(jax.vmap(small_solve))(jnp.asarray(A), jnp.asarray(b)))
    X = np.asarray(jax.jit(jax.vmap(small_solve))(jnp.asarray(A), jnp.asarray(B)))
    assert x.dtype == np.float64 and x.shape == (200, C) and X.shape == (200, C, 3)
    np.testing.assert_allclose(x, np.linalg.solve(A, b[..., None])[..., 0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(X, np.linalg.solve(A, B), rtol=1e-10, atol=1e-12)


def test_small_solve_needs_pivoting(x64):
    A = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    b = np.array([4.0, 5.0, 6.0])
    np.testing.assert_allclose(small_solve(jnp.asarray(A), jnp.asarray(b)), np.linalg.solve(A, b))


def test_small_solve_singular_is_not_a_plausible_answer(x64):
    x = np.asarray(small_solve(jnp.zeros((3, 3)), jnp.ones(3)))
    assert not np.all(np.isfinite(x) & (np.abs(x) < 1e100))


@pytest.mark.parametrize("C", [1, 3, 6])
def test_cholesky_solve_matches_numpy(x64, C):
    rng = np.random.default_rng(10 + C)
    A = _well_conditioned(rng, 300, C)
    M = A @ np.swapaxes(A, 1, 2)  # SPD
    b = rng.normal(size=(300, C))
    rows = [[jnp.asarray(M[:, i, j]) for j in range(C)] for i in range(C)]
    x = jax.jit(cholesky_solve)(rows, [jnp.asarray(b[:, i]) for i in range(C)])
    x = np.stack([np.asarray(xi) for xi in x], -1)
    assert x.dtype == np.float64
    np.testing.assert_allclose(x, np.linalg.solve(M, b[..., None])[..., 0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("C", [1, 3, 6])
def test_pair_products_unpack_to_weighted_gram(x64, C):
    """``symmetric(pair_products(K) @ w, s)`` is ``diag(s) K diag(w) K.T diag(s)`` per pixel."""
    rng = np.random.default_rng(20 + C)
    K, w, s = rng.uniform(0.1, 2, (C, 18)), rng.uniform(0, 3, (18, 50)), rng.uniform(1, 4, (C, 50))
    M = symmetric(pair_products(jnp.asarray(K)) @ jnp.asarray(w), jnp.asarray(s))
    got = np.stack([np.stack([np.asarray(M[i][j]) for j in range(C)]) for i in range(C)])
    want = np.einsum("it,tn,jt->ijn", K, w, K) * s[:, None, :] * s[None, :, :]
    np.testing.assert_allclose(got, want, rtol=1e-12)
