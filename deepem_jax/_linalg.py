"""Small dense linear solves (C x C, C about 6), unrolled over C in plain XLA operations.

Both solvers run in the dtype of their inputs and are jit-able and differentiable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["cholesky_solve", "pair_products", "small_solve", "symmetric"]


def small_solve(A: jax.Array, b: jax.Array) -> jax.Array:
    """Solve ``A x = b`` for one small square ``A`` (C, C) with ``b`` (C,) or (C, k), by
    Gaussian elimination with partial pivoting, unrolled over C; batch it with ``vmap``.

    Used instead of ``jnp.linalg.solve``: on CPU (jax 0.10.2) the batched LAPACK custom call
    deadlocked -- the process waited at 0% CPU -- on some 300k-pixel batches of the BP simplex,
    while this plain-XLA version has no such path and is as fast for C = 6. A zero pivot is
    replaced by the smallest normal number, so singular systems give huge or non-finite values
    that the callers' checks reject."""
    C = A.shape[0]
    vec = b.ndim == 1
    M = jnp.concatenate([A, b[:, None] if vec else b], axis=1)
    for k in range(C):
        p = k + jnp.argmax(jnp.abs(M[k:, k]))
        row_k, row_p = M[k], M[p]
        M = M.at[k].set(row_p).at[p].set(row_k)
        piv = M[k, k]
        M = M.at[k].set(M[k] / jnp.where(piv == 0, jnp.finfo(M.dtype).tiny, piv))
        M = M - M[:, k].at[k].set(0.0)[:, None] * M[k][None, :]
    x = M[:, C:]
    return x[:, 0] if vec else x


def cholesky_solve(M: list[list[jax.Array]], b: list[jax.Array]) -> list[jax.Array]:
    """Solve ``M x = b`` for a batch of symmetric positive definite C x C systems by an
    unrolled Cholesky factorisation.

    The systems are given entry-wise with the batch (pixels) in the leading axis: ``M[i][j]``
    and ``b[i]`` are (N,) arrays, and ``x`` is returned as a list of C (N,) arrays. This layout
    keeps every operation an elementwise op over all pixels, which was faster than a (N, C, C)
    batched factorisation. Non-positive diagonal terms of the factor are clamped to the smallest
    normal number."""
    C = len(b)
    tiny = jnp.finfo(b[0].dtype).tiny
    zero = jnp.zeros_like(b[0])
    L: list[list[jax.Array]] = [[zero] * C for _ in range(C)]
    for j in range(C):
        d = M[j][j] - sum((L[j][k] ** 2 for k in range(j)), zero)
        L[j][j] = jnp.sqrt(jnp.maximum(d, tiny))
        for i in range(j + 1, C):
            s = M[i][j] - sum((L[i][k] * L[j][k] for k in range(j)), zero)
            L[i][j] = s / L[j][j]
    z: list[jax.Array] = []
    for i in range(C):
        z.append((b[i] - sum((L[i][k] * z[k] for k in range(i)), zero)) / L[i][i])
    x: list[jax.Array] = [zero] * C
    for i in reversed(range(C)):
        s = sum((L[k][i] * x[k] for k in range(i + 1, C)), zero)
        x[i] = (z[i] - s) / L[i][i]
    return x


def pair_products(K: jax.Array) -> jax.Array:
    """(C(C+1)/2, n) products ``K[i, t] * K[j, t]`` of the row pairs ``j <= i`` of ``K`` (C, n),
    per column ``t``, in the order ``(0, 0), (1, 0), (1, 1), (2, 0), ...``: ``pair_products(K)
    @ w`` holds the lower triangle of ``K diag(w) K.T`` for each column of weights ``w`` (n, N);
    :func:`symmetric` unpacks it."""
    C = K.shape[0]
    return jnp.stack([K[i] * K[j] for i in range(C) for j in range(i + 1)])


def symmetric(rows: jax.Array, scale: jax.Array) -> list[list[jax.Array]]:
    """The symmetric C x C matrices ``M[i][j] = rows[p(i, j)] * scale[i] * scale[j]`` entry-wise
    (each a (N,) array, as :func:`cholesky_solve` takes them) from the (C(C+1)/2, N) lower
    triangles ``rows`` in :func:`pair_products`' order and the (C, N) row scales ``scale``."""
    C = scale.shape[0]
    M: list[list[jax.Array]] = [[None] * C for _ in range(C)]  # type: ignore[list-item]
    p = 0
    for i in range(C):
        for j in range(i + 1):
            M[i][j] = M[j][i] = rows[p] * (scale[i] * scale[j])
            p += 1
    return M
