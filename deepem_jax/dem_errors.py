"""Uncertainties of DEMs: Monte Carlo over the AIA noise model (any method) and the Laplace
(curvature) estimate of a :mod:`deepem_jax.fit` result, with demregpy's temperature
resolution.

Reported per pixel (:class:`DEMErrors`): the 1-sigma error of the EM in each bin ("vertical",
cm^-5), of the total EM (cm^-5) and of the EM-weighted mean log T, and for the Laplace estimate
the temperature resolution ("horizontal", log T) as demregpy (Hannah & Kontar 2012) reports it:
half the width at half maximum of each column of the resolution matrix ``R = (d em / d y) K``,
never less than the bin width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .basis import EM_SCALE, Basis
from .fit import FitResult, Fitter, _em_units, _pixel_terms
from .status import DEMStatus

__all__ = ["DEMErrors", "laplace", "monte_carlo"]


@dataclasses.dataclass(frozen=True)
class DEMErrors:
    """1-sigma uncertainties of DEMs (numpy arrays, leading axes of the pixels).

    Attributes
    ----------
    em : (..., n_T) error of the EM per bin, cm^-5 (vertical error).
    total_em : (...) error of the total EM, cm^-5.
    logt : (...) error of the EM-weighted mean log10(T / K).
    logt_resolution : (..., n_T) temperature resolution per bin in log T (horizontal error):
        half the width at half maximum of the bin's column of the resolution matrix, at least
        the bin width (the value demregpy's ``demmap`` computes, which floors at the bin width
        only where no point reaches half maximum; its ``dn2dem`` returns that divided by
        2 sqrt(2 ln 2)); None (Monte Carlo).
    n : (...) replicates with an EM (Monte Carlo) or 1 (Laplace); errors are NaN where < 2
        replicates had an EM (the mean log T's: where < 2 had a positive total EM).
    total_em_mean, logt_mean : (...) Monte Carlo only (None for Laplace): the mean over the
        replicates of the total EM (cm^-5) and of the mean log T, the centres of the intervals
        Monte Carlo states: ``total_em_mean +- total_em`` and ``logt_mean +- logt``. (The
        Laplace intervals are centred on the fitted estimate.)
    """

    em: np.ndarray
    total_em: np.ndarray
    logt: np.ndarray
    logt_resolution: np.ndarray | None
    n: np.ndarray
    total_em_mean: np.ndarray | None = None
    logt_mean: np.ndarray | None = None


def _summaries(em: np.ndarray, logt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Total EM and EM-weighted mean log T of EMs (..., n_T)."""
    tot = em.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return tot, (em * logt).sum(-1) / tot


def monte_carlo(
    solve: Callable[[np.ndarray], np.ndarray],
    intensities: np.ndarray,
    sigma: np.ndarray,
    logt: np.ndarray,
    n: int,
    rng: np.random.Generator,
    *,
    batched: bool = False,
) -> DEMErrors:
    """Standard deviations (ddof 1) over ``n`` replicates ``intensities + sigma * N(0, 1)``
    (both (..., C) in DN s^-1 pix^-1) of the EM that ``solve`` returns (a function of
    intensities (..., C) giving EM (..., n_T) in cm^-5, NaN where it has none, e.g. BP,
    the network or the fit), of its total and of its mean log T. Statistics are taken over
    each pixel's replicates with a finite EM; one pass, numerically stable (Welford).
    ``batched``: ``solve`` is called once on all replicates stacked, (n, ..., C) -> (n, ...,
    n_T) (same draws from ``rng``, so the same result for a pixel-wise ``solve``).

    Also returns the replicate means of the total EM and of the mean log T (the method's
    answer averaged over the noise; equal to the answer for a linear method): the intervals
    Monte Carlo states are those means +- the standard deviations. They are intervals of the
    method's answer under the noise: a method biased by more than its spread (BP's minimum
    EM, biased low) does not cover the truth. Measured coverage of the truth: README,
    "Fitting and uncertainties".
    """
    if n < 2:
        raise ValueError(f"Monte Carlo needs n >= 2 replicates, got {n}")
    y = np.asarray(intensities, np.float64)
    s = np.broadcast_to(np.asarray(sigma, np.float64), y.shape)
    lt = np.asarray(logt, np.float64)
    if batched:
        ems = np.asarray(solve(y + s * rng.standard_normal((n, *y.shape))), np.float64)
        replicates = iter(ems)
    else:
        replicates = (
            np.asarray(solve(y + s * rng.standard_normal(y.shape)), np.float64) for _ in range(n)
        )
    stats = None
    for em in replicates:
        x = np.concatenate([em, np.stack(_summaries(em, lt), -1)], -1)
        # a replicate counts where its EM is finite; its mean log T only where also defined
        # (a zero EM has none): per-column counts
        ok = np.isfinite(x) & np.all(np.isfinite(em), -1, keepdims=True)
        if stats is None:
            stats = [np.zeros(x.shape), np.zeros(x.shape), np.zeros(x.shape)]
        k, mean, m2 = stats
        k += ok
        d = np.where(ok, x - mean, 0.0)
        mean += d / np.maximum(k, 1)
        m2 += d * np.where(ok, x - mean, 0.0)
    k, mean, m2 = stats
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.where(k >= 2, np.sqrt(m2 / (k - 1)), np.nan)
    mean = np.where(k >= 2, mean, np.nan)
    return DEMErrors(
        sd[..., :-2],
        sd[..., -2],
        sd[..., -1],
        None,
        k[..., -2].astype(np.int32),
        mean[..., -2],
        mean[..., -1],
    )


def _half_width(R: jax.Array, logt: jax.Array) -> jax.Array:
    """Horizontal error as demregpy's ``demmap`` computes it: per column of ``R`` (n_T, n_T),
    half the extent of log T (on 51 points spanning the grid, linear interpolation) where the
    column is at least half its maximum; here at least the bin width (:class:`DEMErrors`)."""
    fine = logt[0] + 1e-8 + (logt[-1] - logt[0]) * jnp.arange(51, dtype=logt.dtype) / 51.0
    dlogt = jnp.gradient(logt)

    def one(col, dl):
        rr = jnp.interp(fine, logt, col)
        hm = rr >= jnp.max(col) / 2.0
        lo = jnp.min(jnp.where(hm, fine, jnp.inf))
        hi = jnp.max(jnp.where(hm, fine, -jnp.inf))
        return jnp.where(jnp.any(hm), jnp.maximum((hi - lo) / 2.0, dl), dl)

    return jax.vmap(one, in_axes=(1, 0))(R, dlogt)


def laplace(
    result: FitResult,
    intensities: jax.Array,
    sigma: jax.Array,
    K: jax.Array,
    fitter: Fitter,
    logt: np.ndarray,
    basis: Basis | None = None,
) -> DEMErrors:
    """Laplace estimate for a :func:`deepem_jax.fit.fit` result without spatial coupling:
    the parameter covariance is ``H^+`` (``H`` the Hessian of the pixel's ``F = chi^2/2 + ...``
    at the fit; directions of negligible curvature dropped), pushed to the EM with its
    Jacobian ``J``: ``Cov(em) = J H^+ J^T``; total EM and mean log T by the delta method. The
    horizontal error comes from the resolution matrix ``R = (d em/d y) K`` with
    ``d theta/d y = -H^+ d^2F/(d theta d y)``. Inputs as given to ``fit``; computed in float64
    whatever their dtype (the Hessian's eigenvalues span more than float32 resolves, so
    float32 would drop directions that carry much of the error); float64 arrays out."""
    if fitter.spatial:
        raise ValueError("the Laplace estimate is per pixel: fit without spatial coupling")
    with jax.enable_x64(True):
        return _laplace(result, intensities, sigma, K, fitter, logt, basis)


def _laplace(result, intensities, sigma, K, fitter, logt, basis) -> DEMErrors:
    dt = jnp.float64
    y = jnp.asarray(np.asarray(intensities, np.float64))
    s = jnp.broadcast_to(jnp.asarray(np.asarray(sigma, np.float64)), y.shape)
    Ks = jnp.asarray(np.asarray(K, np.float64)) * EM_SCALE
    B = None if basis is None else jnp.asarray(np.asarray(basis.B, np.float64))
    lt = jnp.asarray(np.asarray(logt, np.float64))
    theta = jnp.nan_to_num(jnp.asarray(np.asarray(result.params, np.float64)))
    C, p = y.shape[-1], theta.shape[-1]

    def pixel(th, yy, ss):
        f = lambda t, d: _pixel_terms(fitter, t, d, ss, Ks, B)[0]  # noqa: E731
        w, V = jnp.linalg.eigh(jax.hessian(f)(th, yy))
        cut = jnp.max(jnp.abs(w)) * p * jnp.finfo(dt).eps * 10
        winv = jnp.where(w > cut, 1.0 / jnp.where(w > cut, w, 1.0), 0.0)
        cov_th = (V * winv) @ V.T
        # EM in units of EM_SCALE until the square roots: Cov(em) in cm^-10 (~1e52)
        # is beyond float32
        J = jax.jacfwd(lambda t: _em_units(fitter, t, B))(th)  # (n_T, p)
        cov = J @ cov_th @ J.T
        em = _em_units(fitter, th, B)
        tot = jnp.sum(em)
        g_lt = (lt - jnp.sum(em * lt) / tot) / tot
        mixed = jax.jacfwd(jax.grad(f), argnums=1)(th, yy)  # (p, C)
        R = (J @ (-cov_th @ mixed)) @ Ks
        return (
            EM_SCALE * jnp.sqrt(jnp.maximum(jnp.diag(cov), 0.0)),
            EM_SCALE * jnp.sqrt(jnp.maximum(jnp.sum(cov), 0.0)),
            jnp.sqrt(jnp.maximum(g_lt @ cov @ g_lt, 0.0)),
            _half_width(R, lt),
        )

    lead = y.shape[:-1]
    out = jax.jit(jax.vmap(pixel))(theta.reshape(-1, p), y.reshape(-1, C), s.reshape(-1, C))
    has = DEMStatus.with_em(np.asarray(result.status)).reshape(-1)
    e, t, m, r = (
        np.where(has.reshape(-1, *([1] * (a.ndim - 1))), np.asarray(a), np.nan) for a in out
    )
    return DEMErrors(
        e.reshape(*lead, -1),
        t.reshape(lead),
        m.reshape(lead),
        r.reshape(*lead, -1),
        np.ones(lead, np.int32),
    )
