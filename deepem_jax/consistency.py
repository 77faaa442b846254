"""Data consistency: the smallest change of an EM estimate that puts its resynthesised
intensities inside Basis Pursuit's tolerance band.

A network's EM ``x0`` (e.g. DeepEM's) is close to BP's but its resynthesis ``K @ x0`` often
leaves BP's band ``lower <= K @ x <= upper`` (:func:`deepem_jax.bp.bounds`) in some channel.
:func:`project_to_band` moves it to the band with the chi^2-closest non-negative EM:

    minimise  sum_j (x_j - x0_j)**2 / (2 x0_j)   subject to   K @ x = t,   x >= 0,

with the target ``t = clip(K @ x0, lower + m w, upper - m w)`` (``w = upper - lower``, margin
``m``): channels already inside the band keep their resynthesis, the others are pulled just
inside its nearer edge. The solution has the form ``x = x0 * max(1 + K.T @ nu, 0)``; the C
multipliers ``nu`` are found by a fixed number of damped semi-smooth Newton steps on the dual
(C x C Cholesky solves, unrolled, pixels in the batch axis), so the projection is jit-able,
vmap-free and differentiable (unrolled). Bins where ``x0 = 0`` stay 0.

The target is one point of the band, and not every point of a band is reachable with a
non-negative EM, so some pixels do not reach the band: ``in_band`` says which did. It is
checked on the returned EM against the full band, never assumed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ._linalg import cholesky_solve_rows, pair_products

__all__ = ["ConsistencyResult", "project_to_band"]

#: EM unit of the internal arithmetic (cm^-5), keeping float32 intermediates near 1.
_EM_UNIT = 1e26


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
    margin: float = 0.02,
    n_iter: int = 10,
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
        Targets lie this fraction of the band width inside its edges (0 <= margin < 0.5).
    n_iter : int
        Newton steps (static); each costs a few (N, n_T) x (n_T, C^2) matrix products.
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
        0, n_iter, lambda _, nu: _newton_step(p, nu, max_step), jnp.zeros_like(p.t)
    )
    x = p.x0 * jnp.maximum(1.0 + (nu * p.inv) @ p.Ks, 0.0)
    changed = p.ok & jnp.any((p.r0 < p.lo_m) | (p.r0 > p.hi_m), -1)
    r = x @ p.Ks.T
    in_band = p.ok & jnp.all((r >= p.lo) & (r <= p.hi), -1)
    out = jnp.where(changed[:, None], x * _EM_UNIT, em.reshape(-1, n_t))  # exact if unmoved
    out = jnp.where(p.ok[:, None], out, jnp.nan)
    return ConsistencyResult(out.reshape(*lead, n_t), in_band.reshape(lead), changed.reshape(lead))


class _Problem(NamedTuple):
    """The projection of N pixels in scaled units: EM in ``_EM_UNIT`` cm^-5, each channel's
    intensities divided by its band's upper edge (``inv`` = 1 / upper)."""

    x0: jax.Array  # (N, n_T) starting EM, 0 where the pixel is not ``ok``
    Ks: jax.Array  # (C, n_T) response times _EM_UNIT
    KK: jax.Array  # (n_T, C*C) products K_i K_j of channel pairs, per bin
    inv: jax.Array  # (N, C) channel scales, 1 where the pixel is not ``ok``
    t: jax.Array  # (N, C) scaled targets
    lo: jax.Array  # (N, C) the band, DN s^-1 pix^-1
    hi: jax.Array
    lo_m: jax.Array  # (N, C) the margin-shrunk band the targets lie in, DN s^-1 pix^-1
    hi_m: jax.Array
    r0: jax.Array  # (N, C) resynthesis of x0, DN s^-1 pix^-1 (scaled EM times Ks)
    ok: jax.Array  # (N,) finite inputs and a valid band (0 < upper, lower <= upper)


def _scaled_problem(x0: jax.Array, K: jax.Array, lower, upper, margin: float) -> _Problem:
    """The scaled projection problem of EM ``x0`` (N, n_T) cm^-5 per bin into the band
    ``lower``, ``upper`` (..., C) DN s^-1 pix^-1, in the dtype of ``x0``."""
    dtype = x0.dtype
    C = K.shape[0]
    lo = jnp.asarray(lower, dtype).reshape(-1, C)
    hi = jnp.asarray(upper, dtype).reshape(-1, C)
    ok = jnp.all(jnp.isfinite(x0), -1) & jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi), -1)
    ok &= jnp.all((hi > 0) & (hi >= lo), -1)
    x0 = jnp.where(ok[:, None], jnp.maximum(x0, 0.0), 0.0) / _EM_UNIT
    inv = jnp.where(ok[:, None], 1.0 / jnp.where(hi > 0, hi, 1.0), 1.0)
    Ks = jnp.asarray(K, dtype) * _EM_UNIT
    KK = pair_products(Ks)
    lo_m, hi_m = lo + margin * (hi - lo), hi - margin * (hi - lo)
    r0 = x0 @ Ks.T
    t = jnp.clip(r0, lo_m, hi_m) * inv
    return _Problem(x0, Ks, KK, inv, t, lo, hi, lo_m, hi_m, r0, ok)


def _newton_step(p: _Problem, nu: jax.Array, max_step: float) -> jax.Array:
    """One damped semi-smooth Newton step on the dual multipliers ``nu`` (N, C): the change
    of ``K.T @ nu`` is capped at ``max_step`` per pixel."""
    C = p.Ks.shape[0]
    tiny = jnp.finfo(nu.dtype).tiny
    z = 1.0 + (nu * p.inv) @ p.Ks
    x = p.x0 * jnp.maximum(z, 0.0)
    g = (x @ p.Ks.T) * p.inv - p.t
    M = (jnp.where(z > 0, p.x0, 0.0) @ p.KK).reshape(-1, C, C)
    M = M * p.inv[:, :, None] * p.inv[:, None, :]
    ridge = 1e-6 * jnp.trace(M, axis1=1, axis2=2) + tiny
    M = M + ridge[:, None, None] * jnp.eye(C, dtype=nu.dtype)
    d = cholesky_solve_rows(M, g)
    dz = jnp.max(jnp.abs((d * p.inv) @ p.Ks), -1)
    s = jnp.minimum(1.0, max_step / jnp.maximum(dz, tiny))
    return nu - s[:, None] * d
