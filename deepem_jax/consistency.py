"""Data consistency: the smallest change of an EM estimate that puts its resynthesised
intensities inside Basis Pursuit's tolerance band.

A network's EM ``x0`` (e.g. DeepEM's) is close to BP's but its resynthesis ``K @ x0`` often
leaves BP's band ``lower <= K @ x <= upper`` (:func:`deepem_jax.bp.bounds`) in some channel.
:func:`project_to_band` moves it into the band with the chi^2-closest non-negative EM:

    minimise  sum_j (x_j - x0_j)**2 / (2 x0_j)
    subject to  lower + m w <= K @ x <= upper - m w,   x >= 0,

a projection onto the band itself, shrunk by a margin ``m`` of its width ``w = upper - lower``
so that rounding of the result cannot put it on the wrong side of an edge: channels whose
resynthesis is inside keep it unless the others' move shifts them, the others land on the
nearer edge. The solution has the form ``x = x0 * max(1 + K.T @ nu, 0)``; the C multipliers
``nu`` (positive on the lower edge, negative on the upper, 0 inside) solve
``K x(nu) = clip(K x(nu) - c w nu, lower', upper')`` for any ``c > 0``, found by a fixed number
of damped semi-smooth Newton steps (a C x C Cholesky solve on the channels at an edge, unrolled,
pixels in the last axis), so the projection is jit-able, vmap-free and differentiable
(unrolled). Bins where ``x0 = 0`` stay 0.

A band that no non-negative EM reaches has no projection, a reachable one far from ``x0`` may
need more steps than given, and the semi-smooth steps can stall at an in-band point that is not
the closest: ``in_band`` says which pixels ended inside the (unshrunk) band. It is checked on
the returned EM, never assumed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._linalg import cholesky_solve, pair_products, symmetric
from ._units import SCALED_EM as _EM_UNIT

__all__ = ["ConsistencyResult", "project_to_band"]

#: ``c`` of the Newton steps' active-set guess ``clip(t - c w nu, lower', upper')`` (``w`` the
#: shrunk band's width): smaller values trust the resynthesis more than the multipliers' signs.
_CLIP_SCALE = 0.03


class ConsistencyResult(NamedTuple):
    """Output of :func:`project_to_band`.

    Attributes
    ----------
    em : jax.Array
        (..., n_T) EM in cm^-5 per bin; NaN where the input was not finite.
    in_band : jax.Array
        (...,) bool: ``lower <= K @ em <= upper`` in every channel.
    changed : jax.Array
        (...,) bool: the input was outside the margin-shrunk band and was moved.
    """

    em: jax.Array
    in_band: jax.Array
    changed: jax.Array


def project_to_band(
    em: jax.Array,
    K: jax.Array,
    lower: jax.Array,
    upper: jax.Array,
    *,
    margin: float = 1e-3,
    n_iter: int = 20,
    max_step: float = 10.0,
) -> ConsistencyResult:
    """Move EM estimates into the tolerance band with the chi^2-smallest change (module doc).

    Parameters
    ----------
    em : array (..., n_T)
        Non-negative EM in cm^-5 per bin (e.g. a network's prediction).
    K : array (C, n_T)
        Temperature response in DN cm^5 s^-1 pix^-1 (:attr:`TemperatureResponse.K`).
    lower, upper : array (..., C)
        The band in DN s^-1 pix^-1 (:func:`deepem_jax.bp.bounds`); ``upper > 0``.
    margin : float
        The band is shrunk by this fraction of its width at each edge (0 <= margin < 0.5).
    n_iter : int
        Newton steps (static); each costs a few (C^2, n_T) x (n_T, N) matrix products.
    max_step : float
        Largest change of ``K.T @ nu`` per step (damping of the Newton steps).

    Returns
    -------
    ConsistencyResult
        The moved EM, per-pixel ``in_band`` and ``changed`` flags. Pure jnp: works under
        ``jit`` and ``grad`` in the dtype of ``em``.
    """
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    em = jnp.asarray(em)
    n_t = K.shape[1]
    lead = em.shape[:-1]
    p = _scaled_problem(em.reshape(-1, n_t), K, lower, upper, margin)
    nu = jax.lax.fori_loop(
        0, n_iter, lambda _, nu: _newton_step(p, nu, max_step), jnp.zeros_like(p.lo_m)
    )
    x = p.x0 * jnp.maximum(1.0 + p.Ks.T @ (nu * p.inv), 0.0)
    t0, r = (p.Ks @ p.x0) * p.inv, p.Ks @ x
    changed = p.ok & jnp.any((t0 < p.lo_m) | (t0 > p.hi_m), 0)
    in_band = p.ok & jnp.all((r >= p.lo) & (r <= p.hi), 0)
    out = jnp.where(changed[:, None], x.T * _EM_UNIT, em.reshape(-1, n_t))  # exact if unmoved
    out = jnp.where(p.ok[:, None], out, jnp.nan)
    return ConsistencyResult(out.reshape(*lead, n_t), in_band.reshape(lead), changed.reshape(lead))


class _Problem(NamedTuple):
    """The projection of N pixels with pixels in the last axis, in scaled units: EM in
    ``_EM_UNIT`` cm^-5, each channel's intensities divided by its band's upper edge
    (``inv`` = 1 / upper)."""

    x0: jax.Array  # (n_T, N) starting EM, 0 where the pixel is not ``ok``
    Ks: jax.Array  # (C, n_T) response times _EM_UNIT
    KK: jax.Array  # (C(C+1)/2, n_T) products K_i K_j of channel pairs j <= i, per bin
    inv: jax.Array  # (C, N) channel scales, 1 where the pixel is not ``ok``
    lo: jax.Array  # (C, N) the band, DN s^-1 pix^-1
    hi: jax.Array
    lo_m: jax.Array  # (C, N) the margin-shrunk band, scaled
    hi_m: jax.Array
    ok: jax.Array  # (N,) finite inputs and a valid band (0 < upper, lower <= upper)


def _scaled_problem(x0: jax.Array, K: jax.Array, lower, upper, margin: float) -> _Problem:
    """The scaled projection problem of EM ``x0`` (N, n_T) cm^-5 per bin into the band
    ``lower``, ``upper`` (..., C) DN s^-1 pix^-1, in the dtype of ``x0``."""
    dtype = x0.dtype
    C = K.shape[0]
    lo = jnp.asarray(lower, dtype).reshape(-1, C).T
    hi = jnp.asarray(upper, dtype).reshape(-1, C).T
    ok = jnp.all(jnp.isfinite(x0), -1) & jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi), 0)
    ok &= jnp.all((hi > 0) & (hi >= lo), 0)
    x0 = jnp.where(ok[:, None], jnp.maximum(x0, 0.0), 0.0).T / _EM_UNIT
    inv = jnp.where(ok, 1.0 / jnp.where(hi > 0, hi, 1.0), 1.0)
    Ks = jnp.asarray(K, dtype) * _EM_UNIT
    lo_m, hi_m = lo + margin * (hi - lo), hi - margin * (hi - lo)
    return _Problem(x0, Ks, pair_products(Ks), inv, lo, hi, lo_m * inv, hi_m * inv, ok)


def _newton_step(p: _Problem, nu: jax.Array, max_step: float) -> jax.Array:
    """One damped semi-smooth Newton step on the multipliers ``nu`` (C, N) of
    ``F(nu) = t - clip(t - c w nu, lower', upper') = 0``, ``t`` the scaled resynthesis: channels
    inside the band get ``nu = 0``, those at an edge a Newton step on ``t = edge``. The change of
    ``K.T @ nu`` is capped at ``max_step`` per pixel."""
    C = p.Ks.shape[0]
    tiny = jnp.finfo(nu.dtype).tiny
    z = 1.0 + p.Ks.T @ (nu * p.inv)
    t = (p.Ks @ (p.x0 * jnp.maximum(z, 0.0))) * p.inv
    q = t - _CLIP_SCALE * (p.hi_m - p.lo_m) * nu
    edge = ((q < p.lo_m) | (q > p.hi_m)).astype(nu.dtype)
    F = t - jnp.clip(q, p.lo_m, p.hi_m)
    A = p.KK @ jnp.where(z > 0, p.x0, 0.0)
    M = symmetric(A, p.inv)
    ridge = 1e-6 * sum(M[i][i] for i in range(C)) + tiny
    free = nu * (1.0 - edge)
    # edge rows: M_EE d_E = -F_E + M_EI nu_I; inside rows: d_I = -nu_I (a symmetric system)
    rhs = [edge[i] * (sum(M[i][j] * free[j] for j in range(C)) - F[i]) - free[i] for i in range(C)]
    S = [
        [
            edge[i] * edge[j] * M[i][j] + (1.0 - edge[i] + edge[i] * ridge if i == j else 0.0)
            for j in range(C)
        ]
        for i in range(C)
    ]
    d = jnp.stack(cholesky_solve(S, rhs))
    dz = jnp.max(jnp.abs(p.Ks.T @ (d * p.inv)), 0)
    big = dz > max_step  # the double where keeps the gradient finite where d = 0
    s = jnp.where(big, max_step / jnp.where(big, dz, 1.0), 1.0)
    return nu + s * d
