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

from ._linalg import cholesky_solve

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
    dtype = em.dtype
    C, n_t = K.shape
    lead = em.shape[:-1]
    x0 = em.reshape(-1, n_t)
    lo = jnp.asarray(lower, dtype).reshape(-1, C)
    hi = jnp.asarray(upper, dtype).reshape(-1, C)
    ok = jnp.all(jnp.isfinite(x0), -1) & jnp.all(jnp.isfinite(lo) & jnp.isfinite(hi), -1)
    ok &= jnp.all((hi > 0) & (hi >= lo), -1)
    x0 = jnp.where(ok[:, None], jnp.maximum(x0, 0.0), 0.0) / _EM_UNIT
    inv = jnp.where(ok[:, None], 1.0 / jnp.where(hi > 0, hi, 1.0), 1.0)  # channel scales
    Ks = jnp.asarray(K, dtype) * _EM_UNIT
    KK = (Ks[:, None, :] * Ks[None, :, :]).reshape(C * C, n_t).T  # (n_T, C*C)
    lo_m, hi_m = lo + margin * (hi - lo), hi - margin * (hi - lo)  # the targets' band
    r0 = x0 @ Ks.T
    t = jnp.clip(r0, lo_m, hi_m) * inv
    eye = jnp.eye(C, dtype=dtype)

    def step(_, nu):
        z = 1.0 + (nu * inv) @ Ks
        x = x0 * jnp.maximum(z, 0.0)
        g = (x @ Ks.T) * inv - t
        M = ((x0 * (z > 0)) @ KK).reshape(-1, C, C) * inv[:, :, None] * inv[:, None, :]
        M = M + (1e-6 * jnp.trace(M, axis1=1, axis2=2) + jnp.finfo(dtype).tiny)[:, None, None] * eye
        d = jnp.stack(
            cholesky_solve(
                [[M[:, i, j] for j in range(C)] for i in range(C)], [g[:, i] for i in range(C)]
            ),
            -1,
        )
        dz = jnp.max(jnp.abs((d * inv) @ Ks), -1)
        s = jnp.minimum(1.0, max_step / jnp.maximum(dz, jnp.finfo(dtype).tiny))
        return nu - s[:, None] * d

    nu = jax.lax.fori_loop(0, n_iter, step, jnp.zeros_like(t))
    x = x0 * jnp.maximum(1.0 + (nu * inv) @ Ks, 0.0)
    changed = ok & jnp.any((r0 < lo_m) | (r0 > hi_m), -1)
    r = x @ Ks.T
    in_band = ok & jnp.all((r >= lo) & (r <= hi), -1)
    out = jnp.where(changed[:, None], x * _EM_UNIT, em.reshape(-1, n_t))  # exact if unmoved
    out = jnp.where(ok[:, None], out, jnp.nan)
    return ConsistencyResult(out.reshape(*lead, n_t), in_band.reshape(lead), changed.reshape(lead))
