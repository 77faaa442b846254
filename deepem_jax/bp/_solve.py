"""Host-level Basis Pursuit driver (SolarSoft ``aia_sparse_em_solve`` semantics) and the
jit-able, differentiable per-pixel entry :func:`solve_jax`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from .._units import INTENSITY_UNIT, to_value
from ..basis import Basis, dictionary
from ..response import TemperatureResponse
from ._highs import highs_lp
from ._simplex import MAX_PIVOTS, certify_infeasible, certify_optimal, solve_lp
from ._types import BPResult, BPStatus, LPResult

__all__ = ["bounds", "solve", "solve_jax"]

#: Pixels per float64 certificate call. With jax 0.10.2 on CPU the vmapped certificate hung
#: (no progress in minutes) at 10^4 pixels per call while 8000 took 0.6 s; 4096 is safe.
_CERT_CHUNK = 4096
#: Pixels per host-side block of :func:`solve` (bounds the float64 temporaries).
_BLOCK = 1 << 20


def bounds(
    intensities: jax.Array, sigma: jax.Array, tolfac: float = 1.4, symmbuff: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """SolarSoft BP bounds on ``D x`` (DN s^-1 pix^-1): with ``y = max(intensities, 0)`` and
    ``tol = tolfac * sigma``, ``lower = max(y - symmbuff * tol, 0)`` and ``upper = y + tol``.
    Pure jnp; differentiable in ``intensities`` and ``sigma``."""
    y = jnp.maximum(intensities, 0.0)
    tol = tolfac * sigma
    return jnp.maximum(y - symmbuff * tol, 0.0), y + tol


def solve_jax(
    intensities: jax.Array,
    sigma: jax.Array,
    D: jax.Array,
    *,
    tolfac: float = 1.4,
    symmbuff: float = 1.0,
    min_signal: float = 0.01,
    max_pivots: int = MAX_PIVOTS,
) -> LPResult:
    """Jit-able, differentiable BP at one tolerance: coefficients (..., n_basis) of
    intensities (..., C) with 1-sigma errors ``sigma`` (both DN s^-1 pix^-1) and dictionary
    ``D`` (C, n_basis) from :func:`deepem_jax.basis.dictionary`.

    Status codes as :func:`solve` (LOW_SIGNAL, INVALID_INPUT flagged per pixel, INFEASIBLE
    without retries). ``jax.grad``/``jax.vjp`` of functions of ``.x`` w.r.t. intensities, sigma
    and ``D`` differentiate through the optimal basis (zero for pixels that are not SOLVED).
    Runs in the dtype of the inputs; use the host driver :func:`solve` for retries, chunking and
    the float64 safety net.
    """
    y = jnp.asarray(intensities)
    sig = jnp.asarray(sigma, y.dtype)
    invalid = ~(jnp.all(jnp.isfinite(y), -1) & jnp.all(jnp.isfinite(sig) & (sig > 0), -1))
    y = jnp.where(invalid[..., None], 0.0, y)
    sig = jnp.where(invalid[..., None], 1.0, sig)
    low = ~invalid & (jnp.sum(jnp.maximum(y, 0.0), -1) < min_signal)
    lower, upper = bounds(y, sig, tolfac, symmbuff)
    skip = (invalid | low)[..., None]
    res = solve_lp(
        D, jnp.where(skip, 0.0, lower), jnp.where(skip, 0.0, upper), max_pivots=max_pivots
    )
    status = jnp.where(
        invalid, int(BPStatus.INVALID_INPUT), jnp.where(low, int(BPStatus.LOW_SIGNAL), res.status)
    )
    x = jnp.where(invalid[..., None], jnp.nan, res.x)
    return LPResult(x, jnp.sum(x, -1), status, res.iterations, res.basis, res.at_upper)


def _as_intensity(a, name: str) -> np.ndarray:
    if isinstance(a, u.Quantity):
        return to_value(a, INTENSITY_UNIT, name)
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array or Quantity, got dtype {arr.dtype}")
    return arr.astype(np.float64)


_certify_optimal = jax.jit(jax.vmap(certify_optimal, (None, 0, 0, 0, 0)))
_certify_infeasible = jax.jit(jax.vmap(certify_infeasible, (None, 0, 0, 0, 0)))


def _head(tree, m: int):
    """The first ``m`` rows of every leaf, as numpy."""
    return jax.tree.map(lambda a: np.asarray(a)[:m], tree)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


def _bucket(n: int, chunk_size: int) -> int:
    """Padded batch size: a power of two >= 256 (or ``chunk_size``), so few shapes compile."""
    return min(chunk_size, max(256, 1 << math.ceil(math.log2(max(n, 1)))))


def _lp_chunks(D, lower, upper, dtype, chunk_size, max_pivots, bar=None):
    """:func:`solve_lp` over (N, C) bounds in padded chunks; returns numpy leaves."""
    N = lower.shape[0]
    size = _bucket(N, chunk_size)
    parts = []
    with jax.enable_x64(dtype == np.float64):
        for start in range(0, N, size):
            sl = slice(start, min(start + size, N))
            res = solve_lp(
                D,
                _pad(lower[sl], size),
                _pad(upper[sl], size),
                max_pivots=max_pivots,
                dtype=dtype,
            )
            parts.append(_head(res, sl.stop - sl.start))
            if bar is not None:
                bar.update(sl.stop - sl.start)
    return jax.tree.map(lambda *a: np.concatenate(a), *parts)


def _jax_backend(D, lower, upper, precision, chunk_size, max_pivots, bar):
    """Exact LP for (N, C) bounds with the JAX dual simplex in fixed-size padded chunks.

    float32: pivots in float32, then every final basis is re-evaluated and checked in float64
    (primal and dual feasibility, or a proof of infeasibility); pixels without that
    certificate (and MAX_ITER) are re-solved in float64. float64: pivots in float64 directly.
    """
    if precision == "float64":
        res = _lp_chunks(D, lower, upper, np.float64, chunk_size, max_pivots, bar)
        return res.x, res.status, res.iterations
    res = _lp_chunks(D, lower, upper, np.float32, chunk_size, max_pivots, bar)
    x, status, its = res.x.astype(np.float64), res.status.copy(), res.iterations.copy()
    with jax.enable_x64(True):
        for check, code in ((_certify_optimal, 0), (_certify_infeasible, 1)):
            idx = np.flatnonzero(status == code)
            size = _bucket(idx.size, _CERT_CHUNK)
            for start in range(0, idx.size, size):
                sel = idx[start : start + size]
                args = (lower[sel], upper[sel], res.basis[sel], res.at_upper[sel])
                out = _head(check(D, *(_pad(a, size) for a in args)), sel.size)
                if code == 0:
                    x[sel] = out[0]
                    out = out[1]
                status[sel[~out]] = -1  # no float64 certificate: re-solve below
    redo = np.flatnonzero((status < 0) | (status == int(BPStatus.MAX_ITER)))
    if redo.size:
        r64 = _lp_chunks(D, lower[redo], upper[redo], np.float64, chunk_size, max_pivots)
        x[redo], status[redo] = r64.x, r64.status
        its[redo] += r64.iterations
    return x, status, its


def solve(
    intensities: np.ndarray | jax.Array | u.Quantity,
    sigma: np.ndarray | jax.Array | u.Quantity | str,
    response: TemperatureResponse,
    basis: Basis,
    *,
    tolfac: float = 1.4,
    symmbuff: float = 1.0,
    retry_factors: Sequence[float] = (1.5, 2.25),
    min_signal: float = 0.01,
    method: str = "jax",
    precision: str = "float32",
    chunk_size: int = 10_000,
    max_pivots: int = MAX_PIVOTS,
    progress: bool = False,
) -> BPResult:
    """Basis Pursuit DEM of every pixel (SolarSoft ``aia_sparse_em_solve`` semantics).

    Per pixel, with ``y = max(intensities, 0)`` (negative values are clipped, as SolarSoft
    does) and ``tol = tolfac * sigma``: minimise ``sum(x)`` subject to ``x >= 0`` and
    ``max(y - symmbuff * tol, 0) <= D x <= y + tol``. Infeasible pixels are retried with
    ``tolfac * f`` for each ``f`` in ``retry_factors``; ``result.tolfac`` records the factor used.

    Parameters
    ----------
    intensities : (..., C) DN s^-1 pix^-1 (plain array in those units, or a Quantity).
    sigma : (..., C) 1-sigma uncertainties, DN s^-1 pix^-1 (array or Quantity, broadcast to
        ``intensities``), or ``"sqrt"`` for SolarSoft's default ``sqrt(y)`` (zero allowed).
    response : channels in the order of the last axis of ``intensities``, on ``basis.logt``.
    basis : :func:`deepem_jax.basis.cheung_basis`. A dictionary column that is all zero (a basis
        function no channel sees) is kept and gets coefficient 0 (it can only add cost).
    min_signal : pixels with ``sum(y) < min_signal`` (DN s^-1 pix^-1) are LOW_SIGNAL, not solved.
    method : ``"jax"`` (batched dual simplex) or ``"highs"`` (``scipy.optimize.linprog``, one
        call per pixel; the reference, ~450 pixels/s on the 2-core CPU here).
    precision : ``"float32"`` (float32 pivots, every result certified in float64 and the
        uncertified re-solved in float64) or ``"float64"``. Only used by ``method="jax"``;
        the outputs have this dtype.
    chunk_size : pixels per jitted call (all chunks are padded to it, so it compiles once).
        Peak XLA scratch per chunk (``memory_analysis``, 54 basis functions, 6 channels,
        10^4 pixels): 40 MB in float32, 77 MB in float64; it scales linearly with chunk_size.
    progress : show a tqdm bar over pixels (per chunk for ``"jax"``).

    Returns
    -------
    BPResult with leading axes of ``intensities``. INVALID_INPUT pixels (NaN/Inf intensity or
    sigma, sigma <= 0) have NaN coefficients, EM and synthetic intensities; LOW_SIGNAL,
    INFEASIBLE and MAX_ITER pixels have zeros.

    Raises
    ------
    ValueError on mismatched shapes, grids or channel counts, or bad options;
    ``astropy.units.UnitConversionError`` on Quantities in the wrong units.
    """
    if method not in ("jax", "highs"):
        raise ValueError(f"method must be 'jax' or 'highs', got {method!r}")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be 'float32' or 'float64', got {precision!r}")
    if not (tolfac > 0 and symmbuff >= 0 and chunk_size >= 1 and min_signal >= 0):
        raise ValueError("need tolfac > 0, symmbuff >= 0, min_signal >= 0 and chunk_size >= 1")
    if any(not f > 0 for f in retry_factors):
        raise ValueError(f"retry_factors must be positive, got {retry_factors}")
    y = _as_intensity(intensities, "intensities")
    if y.ndim < 1 or y.shape[-1] != response.n_channels:
        raise ValueError(
            f"intensities have shape {y.shape}; the last axis must hold the "
            f"{response.n_channels} channels {list(response.channels)} of the response"
        )
    sqrt_sigma = isinstance(sigma, str)
    if sqrt_sigma:
        if sigma != "sqrt":
            raise ValueError(f"sigma must be an array, a Quantity or 'sqrt', got {sigma!r}")
        sig = np.sqrt(np.maximum(y, 0.0))
    else:
        sig = _as_intensity(sigma, "sigma")
        try:
            sig = np.broadcast_to(sig, y.shape)
        except ValueError:
            raise ValueError(
                f"sigma shape {sig.shape} does not broadcast to intensities {y.shape}"
            ) from None
    with jax.enable_x64(True):
        D = np.asarray(dictionary(response, basis), dtype=np.float64)
    shape, C = y.shape[:-1], y.shape[-1]
    yf = y.reshape(-1, C)
    sf = sig.reshape(-1, C)
    N, n = yf.shape[0], D.shape[1]
    out_dt = np.float32 if (method == "jax" and precision == "float32") else np.float64
    B = np.asarray(basis.B, np.float64)
    coeffs = np.empty((N, n), out_dt)
    em = np.empty((N, B.shape[1]), out_dt)
    synth = np.empty((N, C), out_dt)
    status = np.empty(N, np.int8)
    used = np.empty(N)
    its = np.empty(N, np.int32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=N, unit="px", desc="BP")
    opts = dict(
        tolfac=tolfac,
        symmbuff=symmbuff,
        retry_factors=retry_factors,
        min_signal=min_signal,
        method=method,
        precision=precision,
        chunk_size=chunk_size,
        max_pivots=max_pivots,
        sqrt_sigma=sqrt_sigma,
        bar=bar,
    )
    # Host memory stays bounded: each block of pixels is solved (with its retries) and written
    # into the outputs, which are allocated once in the output dtype.
    for b0 in range(0, N, _BLOCK):
        sl = slice(b0, min(b0 + _BLOCK, N))
        x, status[sl], used[sl], its[sl] = _solve_block(yf[sl], sf[sl], D, **opts)
        coeffs[sl] = x
        synth[sl] = x @ D.T
        em[sl] = basis.scale * (x @ B)
    if bar is not None:
        bar.close()
    return BPResult(
        coeffs=coeffs.reshape(*shape, n),
        em=em.reshape(*shape, em.shape[-1]),
        status=status.reshape(shape),
        tolfac=used.reshape(shape),
        iterations=its.reshape(shape),
        synthetic=synth.reshape(*shape, C),
        objective=coeffs.sum(-1, dtype=np.float64).reshape(shape).astype(out_dt),
    )


def _solve_block(
    yf,
    sf,
    D,
    *,
    tolfac,
    symmbuff,
    retry_factors,
    min_signal,
    method,
    precision,
    chunk_size,
    max_pivots,
    sqrt_sigma,
    bar,
):
    """BP of (N, C) pixels with adaptive tolerance; returns float64 coefficients (N, n),
    status, the tolerance factor used and pivot counts."""
    invalid = ~(np.all(np.isfinite(yf), -1) & np.all(np.isfinite(sf), -1))
    if not sqrt_sigma:
        invalid |= np.any(~(sf > 0), -1)
    yc = np.where(invalid[:, None], 0.0, np.maximum(yf, 0.0))
    sc = np.where(invalid[:, None], 0.0, sf)
    low = ~invalid & (yc.sum(-1) < min_signal)

    N, n = yf.shape[0], D.shape[1]
    x = np.zeros((N, n))
    status = np.full(N, int(BPStatus.INFEASIBLE), np.int32)
    status[low] = BPStatus.LOW_SIGNAL
    status[invalid] = BPStatus.INVALID_INPUT
    used = np.full(N, np.nan)
    its = np.zeros(N, np.int32)
    if bar is not None:
        bar.update(int((low | invalid).sum()))  # flagged, not solved
    for f in (1.0, *retry_factors):
        todo = np.flatnonzero(status == BPStatus.INFEASIBLE)
        if todo.size == 0:
            break
        with jax.enable_x64(True):
            lo, hi = (np.asarray(a) for a in bounds(yc[todo], sc[todo], tolfac * f, symmbuff))
        if method == "highs":
            r = highs_lp(D, lo, hi, None if bar is None else _ticking(bar, todo.size))
            xs, st, it = r.x, r.status, r.iterations
        else:
            xs, st, it = _jax_backend(D, lo, hi, precision, chunk_size, max_pivots, bar)
        x[todo], status[todo], used[todo] = xs, st, tolfac * f
        its[todo] += it
    x[invalid] = np.nan
    return x, status, used, its


def _ticking(bar, n: int):
    for i in range(n):
        yield i
        bar.update(1)
