"""Host-level Basis Pursuit driver (SolarSoft ``aia_sparse_em_solve`` semantics) and the
jit-able, differentiable per-pixel entry :func:`solve_jax`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from .._units import INTENSITY_UNIT, to_value
from ..basis import Basis, dictionary
from ..response import TemperatureResponse
from ._simplex import MAX_PIVOTS, solve_lp
from ._solvers import DualSimplex, HiGHS, ToleranceSchedule
from ._types import BPResult, BPStatus, LPResult

__all__ = ["bounds", "solve", "solve_jax"]

#: Pixels per host-side block of :func:`solve`: bounds the float64 temporaries (about 2 kB a
#: pixel: coefficients, bounds, the float32 pass and its float64 certificates).
_BLOCK = 1 << 18


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
    """``a`` as a numeric ndarray in DN s^-1 pix^-1, not copied when it is already one (the
    solver converts each block to float64)."""
    if isinstance(a, u.Quantity):
        return to_value(a, INTENSITY_UNIT, name)
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{name} must be a numeric array or Quantity, got dtype {arr.dtype}")
    return arr


def _inputs(intensities, sigma, response: TemperatureResponse):
    """Intensities (..., C) and sigma broadcast to them (DN s^-1 pix^-1, numeric arrays in any
    dtype); sigma is None for ``sigma="sqrt"`` (``sqrt(max(y, 0))``, computed per block)."""
    y = _as_intensity(intensities, "intensities")
    if y.ndim < 1 or y.shape[-1] != response.n_channels:
        raise ValueError(
            f"intensities have shape {y.shape}; the last axis must hold the "
            f"{response.n_channels} channels {list(response.channels)} of the response"
        )
    if isinstance(sigma, str):
        if sigma != "sqrt":
            raise ValueError(f"sigma must be an array, a Quantity or 'sqrt', got {sigma!r}")
        return y, None
    sig = _as_intensity(sigma, "sigma")
    try:
        return y, np.broadcast_to(sig, y.shape)
    except ValueError:
        raise ValueError(
            f"sigma shape {sig.shape} does not broadcast to intensities {y.shape}"
        ) from None


def _options(tolfac: float, solver: object, schedule: object) -> float:
    """``tolfac`` as a float after checking the options of :func:`solve`."""
    if not isinstance(solver, (DualSimplex, HiGHS)):
        raise TypeError(f"solver must be bp.DualSimplex(...) or bp.HiGHS(), got {solver!r}")
    if not isinstance(schedule, ToleranceSchedule):
        raise TypeError(f"schedule must be a bp.ToleranceSchedule, got {schedule!r}")
    try:
        tf = float(tolfac)
    except (TypeError, ValueError):
        raise TypeError(f"tolfac must be a number, got {tolfac!r}") from None
    if not (math.isfinite(tf) and tf > 0):
        raise ValueError(f"tolfac must be finite and > 0, got {tolfac!r}")
    return tf


@contextlib.contextmanager
def _progress_bar(progress, total: int) -> Iterator:
    """The caller's bar (``progress`` has ``update``; the caller closes it), a new tqdm bar
    over ``total`` pixels (``progress`` true), or None."""
    if hasattr(progress, "update"):
        yield progress
        return
    if not progress:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="px", desc="BP")
    try:
        yield bar
    finally:
        bar.close()


def solve(
    intensities: np.ndarray | jax.Array | u.Quantity,
    sigma: np.ndarray | jax.Array | u.Quantity | str,
    response: TemperatureResponse,
    basis: Basis,
    *,
    tolfac: float = 1.4,
    solver: DualSimplex | HiGHS = DualSimplex(),
    schedule: ToleranceSchedule = ToleranceSchedule(),
    progress: Any = False,
    coeffs: bool = True,
    start: int | np.ndarray = 0,
) -> BPResult:
    """Basis Pursuit DEM of every pixel (SolarSoft ``aia_sparse_em_solve`` semantics).

    Per pixel, with ``y = max(intensities, 0)`` (negative values are clipped, as SolarSoft
    does) and ``tol = tolfac * sigma``: minimise ``sum(x)`` subject to ``x >= 0`` and
    ``max(y - schedule.symmbuff * tol, 0) <= D x <= y + tol``. Infeasible pixels are retried
    with ``tolfac * f`` for each ``f`` in ``schedule.retry_factors``; ``result.tolfac`` records
    the factor used.

    Parameters
    ----------
    intensities : (..., C) DN s^-1 pix^-1 (plain array in those units, or a Quantity).
    sigma : (..., C) 1-sigma uncertainties, DN s^-1 pix^-1 (array or Quantity, broadcast to
        ``intensities``), or ``"sqrt"`` for SolarSoft's default ``sqrt(y)`` (zero allowed).
    response : channels in the order of the last axis of ``intensities``, on ``basis.logt``.
    basis : :func:`deepem_jax.basis.cheung_basis`. A dictionary column that is all zero (a basis
        function no channel sees) is kept and gets coefficient 0 (it can only add cost).
    tolfac : width of the band in units of sigma (finite, > 0).
    solver : :class:`DualSimplex` (batched, exact; its ``precision`` sets the output dtype, its
        ``warm_start`` where the pivots start: by default the best basis of the shipped
        :class:`BasisTable` for the channels) or :class:`HiGHS` (SciPy ``linprog`` per pixel,
        float64; the slow reference).
    schedule : :class:`ToleranceSchedule` (``symmbuff``, ``retry_factors``, ``min_signal``).
    progress : show a tqdm bar over pixels; it reaches the number of pixels once every pixel
        has a first verdict (retries are shown in its postfix, not counted again). A tqdm bar
        (anything with ``update(n)`` and ``set_postfix_str(s)``) is advanced instead of a new
        one, e.g. by a caller that solves a large image in several calls.
    coeffs : keep the coefficients (``result.coeffs``); False leaves ``result.coeffs`` None
        and saves ``n_basis`` numbers per pixel (the other fields are the same).
    start : index into ``(1, *schedule.retry_factors)`` of the first band tried, for pixels
        already known to be infeasible in the narrower ones (e.g. proven by a Farkas ray):
        their answers are then those of the whole schedule, without its first passes. One
        index for every pixel, or an integer array of them with the pixels' shape
        (``intensities.shape[:-1]``), so pixels with different starts share the passes.

    Memory: pixels are solved in blocks of ``2**18``; besides the outputs, only one block's
    float64 temporaries are held (the inputs are converted to float64 block by block).

    Returns
    -------
    BPResult with leading axes of ``intensities``. INVALID_INPUT pixels (NaN/Inf intensity or
    sigma, sigma <= 0) have NaN coefficients, EM and synthetic intensities; LOW_SIGNAL,
    INFEASIBLE and MAX_ITER pixels have zeros.

    Raises
    ------
    ValueError on mismatched shapes, grids or channel counts, or a non-finite or non-positive
    ``tolfac``; TypeError on a wrong kind of ``solver`` or ``schedule``;
    ``astropy.units.UnitConversionError`` on Quantities in the wrong units.
    """
    tolfac = _options(tolfac, solver, schedule)
    y, sig = _inputs(intensities, sigma, response)
    start = _start(start, y.shape[:-1], len(schedule.factors))
    with jax.enable_x64(True):
        D = np.asarray(dictionary(response, basis), dtype=np.float64)
    solver = solver._for(D, tuple(response.channels))
    shape, C = y.shape[:-1], y.shape[-1]
    yf = y.reshape(-1, C)
    sf = None if sig is None else sig.reshape(-1, C)
    with _progress_bar(progress, len(yf)) as bar:
        res = _solve_flat(yf, sf, D, basis, tolfac, solver, schedule, bar, bool(coeffs), start)
    return jax.tree.map(lambda a: a.reshape((*shape, *a.shape[1:])), res)


def _start(start, shape: tuple[int, ...], n_factors: int) -> int | np.ndarray:
    """``start`` checked: an int, or a flat int array of the pixels (``shape``); each an index
    into the ``n_factors`` tolerance factors."""
    if isinstance(start, int) and not isinstance(start, bool) and 0 <= start < n_factors:
        return start
    a = np.asarray(start)
    if (
        a.shape == shape
        and a.dtype.kind in "iu"
        and (a.size == 0 or (a.min() >= 0 and a.max() < n_factors))
    ):
        return a.reshape(-1).astype(np.intp)
    raise ValueError(
        f"start must be an integer index into the {n_factors} tolerance factors, or an array "
        f"of them with the pixels' shape {shape}; got {start!r}"
    )


def _solve_flat(yf, sf, D, basis, tolfac, solver, schedule, bar, keep_coeffs, start=0):
    """:func:`solve` of (N, C) pixels (any numeric dtype; ``sf`` None for ``sqrt(y)``) as a
    flat BPResult. Host memory stays bounded: each block of ``_BLOCK`` pixels is converted to
    float64, solved (with its retries) and written into the outputs, which are allocated once
    in the output dtype."""
    (N, C), n, dt = yf.shape, D.shape[1], solver.dtype
    B = np.asarray(basis.B, np.float64)
    res = BPResult(
        coeffs=np.empty((N, n), dt) if keep_coeffs else None,
        em=np.empty((N, B.shape[1]), dt),
        status=np.empty(N, np.int8),
        tolfac=np.empty(N),
        iterations=np.empty(N, np.int32),
        synthetic=np.empty((N, C), dt),
        objective=np.empty(N, dt),
    )
    for b0 in range(0, N, _BLOCK):
        sl = slice(b0, min(b0 + _BLOCK, N))
        yb = np.asarray(yf[sl], np.float64)
        sb = np.sqrt(np.maximum(yb, 0.0)) if sf is None else np.asarray(sf[sl], np.float64)
        first = start if isinstance(start, int) else start[sl]
        x, res.status[sl], res.tolfac[sl], res.iterations[sl] = _solve_block(
            yb, sb, D, tolfac, solver, schedule, sf is None, bar, first
        )
        del yb, sb
        if res.coeffs is not None:
            res.coeffs[sl] = x
        res.synthetic[sl] = x @ D.T
        res.em[sl] = basis.scale * (x @ B)
        res.objective[sl] = x.sum(-1)
    return res


def _ray_proven_pixels(
    intensities: np.ndarray,
    sigma: np.ndarray,
    response: TemperatureResponse,
    basis: Basis,
    tolfac: float = 1.4,
    solver: DualSimplex = DualSimplex(),
    schedule: ToleranceSchedule = ToleranceSchedule(),
) -> np.ndarray:
    """(N,) bool: pixels (N, C) (DN s^-1 pix^-1, with their sigma) whose band at ``tolfac`` a
    Farkas ray of ``solver``'s basis table proves infeasible: those :func:`solve` finds
    INFEASIBLE at ``tolfac`` without a pivot and solves, if at all, at a retry tolerance. One
    matrix product per pixel; all False without a table."""
    with jax.enable_x64(True):
        D = np.asarray(dictionary(response, basis), dtype=np.float64)
    solver = solver._for(D, tuple(response.channels))
    y = np.asarray(intensities, np.float64)
    yc, sc, invalid, _ = _flags(y, np.asarray(sigma, np.float64), False, schedule.min_signal)
    with jax.enable_x64(True):
        lo, hi = (np.asarray(a) for a in bounds(yc, sc, tolfac, schedule.symmbuff))
    return solver._ray_proven(D, lo, hi) & ~invalid


def _flags(yf, sf, sqrt_sigma: bool, min_signal: float):
    """Clipped intensities and sigma of (N, C) pixels (zeros where invalid), and the
    INVALID_INPUT and LOW_SIGNAL masks (N,)."""
    invalid = ~(np.all(np.isfinite(yf), -1) & np.all(np.isfinite(sf), -1))
    if not sqrt_sigma:
        invalid |= np.any(~(sf > 0), -1)
    yc = np.where(invalid[:, None], 0.0, np.maximum(yf, 0.0))
    sc = np.where(invalid[:, None], 0.0, sf)
    low = ~invalid & (yc.sum(-1) < min_signal)
    return yc, sc, invalid, low


def _solve_block(yf, sf, D, tolfac, solver, schedule, sqrt_sigma, bar, start=0):
    """BP of (N, C) pixels with the tolerance schedule, each starting at the factor ``start``
    (an int, or (N,) ints); returns float64 coefficients (N, n), status, the tolerance factor
    used and pivot counts. The bar advances once per pixel: flagged pixels at once, the others
    during their first pass (with one start) or after it (with several); retries only set its
    postfix."""
    yc, sc, invalid, low = _flags(yf, sf, sqrt_sigma, schedule.min_signal)
    N, n = yf.shape[0], D.shape[1]
    x = np.zeros((N, n))
    status = np.full(N, int(BPStatus.INFEASIBLE), np.int32)
    status[low] = BPStatus.LOW_SIGNAL
    status[invalid] = BPStatus.INVALID_INPUT
    used = np.full(N, np.nan)
    its = np.zeros(N, np.int32)
    if bar is not None:
        bar.update(int((low | invalid).sum()))
    first = np.broadcast_to(start, (N,))
    one = isinstance(start, int) or first.size == 0 or first.min() == first.max()
    k0 = int(first.min()) if first.size else 0
    for k, f in enumerate(schedule.factors):
        if k < k0:
            continue
        todo = np.flatnonzero((status == BPStatus.INFEASIBLE) & (first <= k))
        if todo.size == 0:
            if k >= first.max(initial=0):
                break
            continue
        if bar is not None and k > k0:
            bar.set_postfix_str(f"retrying {todo.size} px at tolfac {tolfac * f:g}")
        with jax.enable_x64(True):
            lo, hi = (
                np.asarray(a) for a in bounds(yc[todo], sc[todo], tolfac * f, schedule.symmbuff)
            )
        tick = bar.update if bar is not None and one and k == k0 else None
        if todo.size == N:  # every pixel: take the solver's arrays without copying them
            x, status, its = solver._lp(D, lo, hi, tick)
            status, its = status.astype(np.int32, copy=False), its.astype(np.int32, copy=False)
        else:
            x[todo], status[todo], it = solver._lp(D, lo, hi, tick)
            its[todo] += it
        used[todo] = tolfac * f
        if bar is not None and not one:
            bar.update(int(np.count_nonzero(first[todo] == k)))
    x[invalid] = np.nan
    return x, status, used, its
