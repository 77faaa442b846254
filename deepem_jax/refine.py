"""Learned Gauss-Newton refinement of a network's EM against the data it was given.

A per-pixel network returns one EM per intensity vector whatever the noise; its resynthesis
``K @ EM`` often misses the data by more than the errors. ``refine`` follows the network with
``k`` damped Gauss-Newton steps on ``u = log EM`` (so the EM stays positive), trained end to
end with the network (``ModelConfig.refine_steps``). With the normalised residual
``r = (K @ EM - y) / sigma`` and its Jacobian ``J = diag(1/sigma) K diag(EM)`` (C x n_T):

    du = -eta_k J.T (J J.T + lambda_k tr(J J.T) / C I)^-1 r,   each entry bounded by 3 tanh(du / 3),

with ``eta_k = softplus(a_k)`` and ``lambda_k = softplus(b_k)`` learned per step. A network
may also predict where in the band its data should land: with ``offset`` the residual is
taken against ``y + offset * sigma`` (``ModelConfig.band_target``). The steps run with pixels
in the last axis: the lower triangle of ``J J.T`` is one (C(C+1)/2, n_T) x (n_T, N) product and
the C x C systems are solved by the unrolled Cholesky of :mod:`deepem_jax._linalg` on
contiguous (N,) rows, so a step costs a few hundred multiply-adds per pixel (the original MLP:
~97k) in vector operations over pixels. Bins where the network's EM is below
``FLOOR`` cm^-5 start at ``FLOOR``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ._linalg import cholesky_solve, pair_products, symmetric
from ._units import SCALED_EM as _EM_UNIT

__all__ = ["FLOOR", "init_refine_params", "refine"]

#: Smallest EM per bin (cm^-5) the refinement starts from (its intensities are ~1e-4 DN/s).
FLOOR = 1e20
#: Bound on each entry of a step in log EM (a factor of e^3).
_MAX_STEP = 3.0


def _inverse_softplus(v: float) -> float:
    return math.log(math.expm1(v))


def init_refine_params(steps: int) -> dict[str, jax.Array]:
    """Parameters of ``steps`` refinement steps: ``eta`` and ``lam`` (steps,), raw values whose
    softplus is the step size (initially 1) and the relative damping (initially 0.1)."""
    return {
        "eta": jnp.full((steps,), _inverse_softplus(1.0), jnp.float32),
        "lam": jnp.full((steps,), _inverse_softplus(0.1), jnp.float32),
    }


def refine(
    params: dict[str, jax.Array],
    em: jax.Array,
    y: jax.Array,
    sigma: jax.Array,
    K: jax.Array,
    offset: jax.Array | None = None,
) -> jax.Array:
    """EM (N, n_T) in cm^-5 per bin after the learned Gauss-Newton steps (module docstring).

    ``em`` (N, n_T) is the network's EM in cm^-5, ``y`` and ``sigma`` (N, C) the intensities
    and their 1-sigma errors in DN s^-1 pix^-1 (``sigma > 0``), ``K`` (C, n_T) the response in
    DN cm^5 s^-1 pix^-1. With ``offset`` (N, C) the steps aim at ``y + offset * sigma``
    instead of ``y``. Pure jnp in the dtype of ``em``: jit-able and differentiable with
    respect to ``params``, ``em`` and ``offset``."""
    dtype = em.dtype
    C = K.shape[0]
    Ks = jnp.asarray(K, dtype) * _EM_UNIT  # (C, n_T)
    KK = pair_products(Ks)  # (C(C+1)/2, n_T)
    inv = 1.0 / sigma.astype(dtype).T  # (C, N): pixels last from here on
    ys = y.astype(dtype).T * inv
    if offset is not None:
        ys = ys + offset.astype(dtype).T
    x = jnp.maximum(em, FLOOR).T / _EM_UNIT  # exp(u), carried from step to step
    tiny = jnp.finfo(dtype).tiny
    for eta, lam in zip(
        jax.nn.softplus(params["eta"]).astype(dtype),
        jax.nn.softplus(params["lam"]).astype(dtype),
        strict=True,
    ):
        r = (Ks @ x) * inv - ys
        M = symmetric(KK @ (x * x), inv)
        damp = (lam / C) * sum(M[i][i] for i in range(C)) + tiny
        for i in range(C):
            M[i][i] = M[i][i] + damp
        v = jnp.stack(cholesky_solve(M, list(r)))
        du = -eta * x * (Ks.T @ (v * inv))
        x = x * jnp.exp(_MAX_STEP * jnp.tanh(du / _MAX_STEP))
    return (x * _EM_UNIT).T
