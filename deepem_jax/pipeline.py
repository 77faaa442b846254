"""``invert``: observation in, DEM out, whatever the method -- the one pipeline.

It owns the chain every caller (library, ``deepem-jax invert``, demo, benchmarks, training)
shares: calibration (the error model with the file's ``n_sample``, the degradation of each
channel at the observation time), sigma, the method, the per-pixel :class:`DEMStatus`, chi^2
and the provenance of the result.

Degradation: a degraded response is the undegraded one with rows scaled, ``K_deg = diag(f) K``,
so every method solves the corrected data ``y / f`` (sigma ``/ f``) with the undegraded response
``K``. BP's answer is the same as with ``K_deg``; one network serves every epoch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from functools import partial
from typing import Any

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from ._units import INTENSITY_UNIT, channel_list, to_value, unmasked
from .result import DEMResult
from .status import DEMStatus

__all__ = ["DEMWarning", "invert"]

#: Smallest number of channels a DEM is computed from.
MIN_CHANNELS = 3
METHODS = ("bp", "net", "fit")
#: Statuses of pixels that were judged against a tolerance band.
_JUDGED = [DEMStatus.SOLVED, DEMStatus.INFEASIBLE, DEMStatus.MAX_ITER, DEMStatus.OUTSIDE_BAND]
#: Pixels per jit-compiled tile of the fit.
_TILE = 65536
#: Pixels per jit-compiled network tile: small enough that a tile's hidden activations stay in
#: the CPU's caches (README, "Benchmarks").
_NET_TILE = 4096
#: Pixels per host block of BP and of the synthetic intensities and chi^2 (bounds the float64
#: temporaries of a full-disk inversion).
_ROWS = 1 << 18


class DEMWarning(UserWarning):
    """Input that gives a DEM of doubtful value (e.g. a channel with no signal at all)."""


@dataclasses.dataclass(frozen=True, eq=False)
class _Observation:
    """Intensities and errors in DN s^-1 pix^-1 (observed, uncorrected) with what is known of
    where they came from."""

    y: np.ndarray
    sigma: np.ndarray
    channels: tuple[int, ...]
    obstime: Any  # astropy Time (scalar or per channel) or None
    invalid: np.ndarray  # (...) bool: NaN/Inf input
    saturated: np.ndarray  # (...) bool
    wcs: Any
    info: dict[str, Any]
    #: whether ``y`` and ``sigma`` are (views of) arrays the caller holds
    callers: tuple[bool, bool] = (False, False)


def _callers(a, given) -> bool:
    """Whether ``a`` is (a view of) the caller's numpy array ``given``."""
    return isinstance(given, np.ndarray) and np.may_share_memory(a, given)


def _stack_observation(stack, channels: list[int] | None, given: bool) -> _Observation:
    have = channel_list(stack.channels)
    idx = list(range(len(have)))
    if channels is not None:
        missing = [c for c in channels if c not in have]
        if missing:
            raise ValueError(f"channel(s) {missing} Å are not in the observation ({have} Å)")
        idx = [have.index(c) for c in channels]
    from .io import PixelFlag

    def pick(a):  # no copy of a full-disk cube when every channel is used in its order
        return a if idx == list(range(len(have))) else a[..., idx]

    flags, y = pick(stack.flags), pick(stack.data)
    return _Observation(
        y=y,
        sigma=pick(stack.sigma()),
        channels=tuple(have[i] for i in idx),
        obstime=stack.obstime[idx],
        invalid=np.any(flags & (PixelFlag.NONFINITE | PixelFlag.NO_COVERAGE), axis=-1)
        | ~np.all(np.isfinite(y), axis=-1),
        saturated=np.any(flags & PixelFlag.SATURATED, axis=-1),
        wcs=stack.wcs,
        info={
            "NSAMPLE": int(stack.n_sample),
            "NEGCLIP": int(np.asarray(stack.negative_count)[idx].sum()),
        },
        callers=(given and _callers(y, stack.data), False),  # sigma() is computed here
    )


def _intensity_values(a, name: str) -> np.ndarray:
    """``a`` in DN s^-1 pix^-1 as an ndarray: a plain float array as it is (not copied; the
    methods convert block by block), anything else as float64 (masked elements NaN, so their
    pixels are INVALID_INPUT; TypeError unless it holds real numbers)."""
    values, mask = unmasked(a)
    if mask is None and not isinstance(values, u.Quantity):
        arr = np.asarray(values)
        if np.issubdtype(arr.dtype, np.floating):
            return arr
    return to_value(a, INTENSITY_UNIT, name, allow_plain=True)


def _array_observation(y, sigma, channels, obstime) -> _Observation:
    if channels is None:
        raise ValueError(
            "intensities given as an array need channels= (Quantity in Å, the order of their "
            "last axis)"
        )
    if sigma is None:
        raise ValueError(
            "intensities given as an array need sigma= (their 1-sigma errors); "
            "load files with deepem_jax.load_aia to get the AIA error model"
        )
    yv = _intensity_values(y, "intensities")
    sv = _intensity_values(sigma, "sigma")
    if yv.ndim < 1 or yv.shape[-1] != len(channels):
        raise ValueError(
            f"intensities have shape {yv.shape}; the last axis must hold the {len(channels)} "
            f"channels {channels} Å"
        )
    if yv.size == 0:
        raise ValueError(f"intensities of shape {yv.shape} hold no pixel")
    try:
        sv = sv if sv.shape == yv.shape else np.broadcast_to(sv, yv.shape)
    except ValueError:
        raise ValueError(f"sigma shape {sv.shape} does not broadcast to {yv.shape}") from None
    n_neg = int(np.count_nonzero(yv < 0))  # taken as 0 by BP and the network: counted
    return _Observation(
        y=yv,
        sigma=sv,
        channels=tuple(channels),
        obstime=obstime,
        invalid=~np.all(np.isfinite(yv) & np.isfinite(sv) & (sv > 0), axis=-1),
        saturated=np.zeros(yv.shape[:-1], bool),
        wcs=None,
        info={"NEGCLIP": n_neg},
        callers=(_callers(yv, y), _callers(sv, sigma)),
    )


#: Inputs taken as intensities themselves (with ``sigma=`` and ``channels=``), not files or Maps.
_ARRAYS = u.Quantity | np.ndarray | jax.Array | np.generic | float | int


def _observation(observation, sigma, channels, obstime, rebin) -> _Observation:
    from .io import AIAStack, load_aia

    if isinstance(observation, AIAStack | _ARRAYS) and rebin != 1:
        raise ValueError(
            f"rebin={rebin!r} applies to files and Maps; an AIAStack or array is inverted as "
            "given (deepem_jax.load_aia(files, rebin=...) rebins with the right sigma)"
        )
    if isinstance(observation, AIAStack):
        if sigma is not None:
            raise ValueError("sigma= is computed from an AIAStack's error model; do not pass it")
        return _stack_observation(observation, channels, True)
    if isinstance(observation, _ARRAYS):
        return _array_observation(observation, sigma, channels, obstime)
    wanted = None if channels is None else np.array(channels) * u.AA
    stack = (
        load_aia(observation, rebin=rebin)
        if wanted is None
        else load_aia(observation, wanted, rebin=rebin)
    )
    return _stack_observation(stack, None, False)


def _check(obs: _Observation, tolfac: float) -> None:
    if isinstance(tolfac, bool) or not (
        isinstance(tolfac, int | float | np.floating) and np.isfinite(tolfac) and tolfac > 0
    ):
        raise ValueError(f"tolfac must be a finite number > 0, got {tolfac!r}")
    if len(obs.channels) < MIN_CHANNELS:
        raise ValueError(
            f"a DEM needs at least {MIN_CHANNELS} channels; got {list(obs.channels)} Å"
        )
    if len(set(obs.channels)) != len(obs.channels):
        raise ValueError(f"duplicate channels: {list(obs.channels)} Å")
    y = obs.y.reshape(-1, len(obs.channels))
    for i, c in enumerate(obs.channels):
        col = y[:, i]
        if y.shape[0] > 1 and not np.any(np.isfinite(col)):
            raise ValueError(f"channel {c} Å has no finite pixel (all NaN/Inf)")
        if y.shape[0] > 1 and not np.any(col[np.isfinite(col)] > 0):
            warnings.warn(
                f"channel {c} Å has no positive pixel: every DEM is constrained by zero "
                "signal in that channel",
                DEMWarning,
                stacklevel=3,
            )


def _degradation(obs: _Observation, degradation) -> tuple[np.ndarray, dict[str, Any]]:
    """Degradation factors (C,) and their header cards; ``degradation`` is True (shipped
    table), a path (that table) or False (none)."""
    if degradation is False or degradation is None:
        return np.ones(len(obs.channels)), {"DEGRADE": False}
    if obs.obstime is None:
        raise ValueError(
            "the degradation correction needs the observation time: pass obstime= or "
            "degradation=False (for intensities already corrected, or synthetic ones)"
        )
    from .calibration import degradation as degradation_at

    table = None if degradation is True else degradation
    deg = degradation_at(np.array(obs.channels) * u.AA, obs.obstime, table)
    return np.asarray(deg.factors, dtype=np.float64), {"DEGRADE": True, **deg.to_header()}


def _default_response(logt, channels):
    from .response import default_response

    return default_response().regrid(logt).select(np.array(channels) * u.AA)


def _fit_response(response, logt, channels):
    """``response`` regridded to ``logt`` and put in the order of ``channels``."""
    if response is None:
        return _default_response(logt, channels)
    have = list(response.channels)
    missing = [c for c in channels if c not in have]
    if missing:
        raise ValueError(f"the response has no channel(s) {missing} Å (it has {have} Å)")
    if len(response.logt) != len(logt) or not np.allclose(response.logt, logt, atol=1e-6):
        response = response.regrid(logt)
    return response.select(np.array(channels) * u.AA)


def invert(
    observation,
    method: str = "bp",
    *,
    sigma=None,
    channels: u.Quantity | None = None,
    obstime=None,
    response=None,
    predictor=None,
    tolfac: float = 1.4,
    consistency: bool | str = "exact",
    degradation: bool | str | os.PathLike = True,
    solver=None,
    rebin: int = 1,
    progress: bool = False,
    fitter=None,
    init: str = "bp",
    uncertainties: int = 0,
) -> DEMResult:
    """DEM of every pixel of an AIA observation by Basis Pursuit (``"bp"``), the network
    (``"net"``) or a gradient-based fit (``"fit"``).

    Parameters
    ----------
    observation
        An :class:`~deepem_jax.AIAStack`, anything :func:`~deepem_jax.load_aia` accepts (files,
        a directory, sunpy Maps), or intensities ``(..., C)`` in DN s^-1 pix^-1 (Quantity or
        plain array) together with ``sigma`` and ``channels``.
    method
        ``"bp"``: exact Basis Pursuit (:func:`deepem_jax.bp.solve`). ``"net"``: the DeepEM
        network (the shipped one for the channels unless ``predictor`` is given), followed by
        the consistency step (``consistency``). ``"fit"``:
        :func:`deepem_jax.fit.fit` with ``fitter``, started from ``init``.
    sigma
        1-sigma errors of array intensities (DN s^-1 pix^-1); for files and stacks the AIA
        error model is used with each channel's exposure and the file's ``n_sample``.
    channels
        Channels to use (Å), in order. Arrays: required, the order of their last axis. Files
        and stacks: a subset/order of theirs (default: the six coronal channels for files,
        all of a stack's channels, the predictor's channels for ``"net"``).
    obstime
        Observation time of array intensities (for the degradation correction).
    response
        Undegraded temperature response (default: :func:`~deepem_jax.default_response`),
        regridded to the method's log T grid and put in channel order here.
    predictor
        A :class:`~deepem_jax.Predictor` for ``"net"`` (default: the shipped weights; its
        ``dtype`` sets the matrix products' operands: by default those native to the
        hardware, :func:`deepem_jax.predictor.native_dtype`).
    tolfac
        Tolerance factor of the band ``max(y - tolfac*sigma, 0) <= K EM <= y + tolfac*sigma``
        BP solves in and the network's EM is judged against (finite, > 0).
    consistency
        ``"net"`` only. ``"exact"`` (the shipped model): project the network's EM onto the band
        (:func:`deepem_jax.consistency.project_to_band`) and solve by BP the pixels the
        projection leaves outside, so every pixel where BP is feasible ends inside
        (``provenance["BPFALLBK"]`` counts them). ``True``: the projection only. ``False``:
        the network's own output (still judged against the band). A pixel left outside
        (OUTSIDE_BAND) keeps the network's own EM.
    degradation
        ``True``: divide each channel by aiapy's degradation factor at its observation time,
        from the correction table shipped with deepem_jax; a path: from that correction table;
        ``False``: no correction (intensities already corrected, or synthetic).
    solver
        ``"bp"``: a :class:`deepem_jax.bp.DualSimplex` or :class:`deepem_jax.bp.HiGHS`.
    rebin
        ``n x n`` block averaging when files are loaded here.
    progress
        Show progress bars.
    fitter
        ``"fit"`` only: a :class:`deepem_jax.fit.Fitter` (default ``Fitter()``).
    init
        ``"fit"`` only: its starting EM, ``"bp"`` (flat where BP has none), ``"net"`` (the
        network with the consistency step; ``predictor`` or the shipped one) or ``"flat"``.
    uncertainties
        Number of Monte Carlo replicates (0: none): the method is rerun on ``y + sigma * N(0,
        1)`` (seeded, reproducible) and :attr:`DEMResult.errors` holds the standard deviations
        and the replicate means of total EM and mean log T, the centres of the intervals
        (:func:`deepem_jax.dem_errors.monte_carlo`).

    Returns
    -------
    DEMResult
        EM (NaN where the status carries none), :class:`DEMStatus`, chi^2, synthetic
        intensities, the calibration and provenance used.

    Raises
    ------
    ValueError
        Bad options (method, tolfac), fewer than three channels, a channel with no finite
        pixel, shapes that do not match, no observation time for the degradation.
    """
    from ._cache import enable_compilation_cache

    enable_compilation_cache()
    t_start = time.perf_counter()
    _check_options(method, consistency, predictor, fitter, init, solver)
    if isinstance(uncertainties, bool) or not (
        isinstance(uncertainties, int | np.integer) and uncertainties >= 0
    ):
        raise ValueError(
            f"uncertainties must be a whole number of replicates >= 0, got {uncertainties!r}"
        )
    chans = None if channels is None else channel_list(channels)
    if method == "net" and chans is None and predictor is not None:
        chans = list(predictor.channels)
    obs = _observation(observation, sigma, chans, obstime, rebin)
    _check(obs, tolfac)
    factors, deg_cards = _degradation(obs, degradation)
    if deg_cards["DEGRADE"] and response is not None and "+degraded(" in response.name:
        raise ValueError(
            f"the response {response.name!r} is already degraded; pass the undegraded response "
            "(invert corrects for degradation itself) or degradation=False"
        )
    opts = dict(
        response=response,
        predictor=predictor,
        tolfac=tolfac,
        consistency=consistency,
        solver=solver,
        fitter=fitter,
        init=init,
    )
    t0 = time.perf_counter()
    em, status, used, prov, logt, resp = _run(method, obs, factors, opts, progress)
    errors = None
    if uncertainties:
        errors = _monte_carlo_errors(method, obs, factors, opts, int(uncertainties), logt)
    t_solve = time.perf_counter() - t0
    status = np.where(obs.saturated, int(DEMStatus.SATURATED), status)
    status = np.where(obs.invalid, int(DEMStatus.INVALID_INPUT), status).astype(np.int8)
    return _result(
        obs,
        em,
        status,
        used,
        logt,
        resp,
        factors,
        method,
        tolfac,
        {**prov, **deg_cards},
        {"solve": t_solve, "total": time.perf_counter() - t_start},
        errors,
    )


def _check_options(method, consistency, predictor, fitter, init, solver) -> None:
    if consistency not in (True, False, "exact"):
        raise ValueError(f"consistency must be True, False or 'exact', got {consistency!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if predictor is not None and not (method == "net" or (method == "fit" and init == "net")):
        raise ValueError("predictor= is only used with method='net' (or 'fit' with init='net')")
    if method != "fit" and fitter is not None:
        raise ValueError("fitter= is only used with method='fit'")
    if method == "net" and solver is not None:
        raise ValueError("solver= is only used with method='bp' (or 'fit' with init='bp')")


def _run(method: str, obs: _Observation, factors: np.ndarray, o: dict, progress: bool):
    """(em, status, tolfac used, provenance cards, log T grid, response) of one method."""
    if method == "bp":
        em, status, used, prov = _run_bp(
            obs, factors, o["response"], o["tolfac"], o["solver"], progress
        )
        logt, resp = prov.pop("_logt"), prov.pop("_response")
        return em, status, used, prov, logt, resp
    if method == "fit":
        args = (o["fitter"], o["init"], o["predictor"], o["tolfac"], o["solver"], progress)
        return _run_fit(obs, factors, o["response"], *args)
    return _run_net(
        obs, factors, o["response"], o["predictor"], o["tolfac"], o["consistency"], progress
    )


def _monte_carlo_errors(method, obs, factors, o, n: int, logt):
    """Monte Carlo DEM errors: the method rerun on ``n`` noise draws ``y + sigma N(0, 1)``."""
    from .dem_errors import monte_carlo

    def replicate(y):
        em, status = _run(method, dataclasses.replace(obs, y=y), factors, o, False)[:2]
        return np.where(DEMStatus.with_em(status)[..., None], em, np.nan)

    return monte_carlo(replicate, obs.y, obs.sigma, logt, n, np.random.default_rng(0))


def _result(obs, em, status, used, logt, resp, factors, method, tolfac, cards, timings, errors):
    from . import __version__
    from .checkpoint import ResponseId

    has_em = DEMStatus.with_em(status)
    # float32 throughout, masked in place: no float64 copy of a full-disk EM cube
    em = np.asarray(em, dtype=np.float32)
    if not em.flags.writeable:
        em = em.copy()
    # an EM beyond float32 (or any method's inf/NaN) is flagged, never passed on as SOLVED
    lost = has_em & ~np.all(np.isfinite(em), axis=-1)
    if lost.any():
        status = np.where(lost, np.int8(DEMStatus.NONFINITE_OUTPUT), status).astype(status.dtype)
        has_em &= ~lost
    em[~has_em] = np.nan
    Kf = (np.asarray(resp.K, dtype=np.float64) * factors[:, None]).T.astype(np.float32)
    synth, chi = _synthetic_chi2(em, has_em, Kf, obs.y, obs.sigma)
    rid = ResponseId.of(resp)
    provenance = {
        "METHOD": method,
        "CHANNELS": ",".join(str(c) for c in obs.channels),
        "TOLFAC": float(tolfac),
        "RESPONSE": rid.name[:68],
        "RESPSHA": rid.sha256[:16],
        **obs.info,
        **cards,
        "DJVERSN": __version__,
    }
    return DEMResult(
        em=em,
        logt=np.asarray(logt, dtype=np.float64),
        status=status,
        chi2=chi,
        synthetic=synth,
        intensities=_kept(obs.y, obs.callers[0]),
        sigma=_kept(obs.sigma, obs.callers[1]),
        tolfac=np.where(
            DEMStatus.isin(status, _JUDGED), np.asarray(used, np.float32), np.float32(np.nan)
        ),
        channels=obs.channels,
        method=method,
        response=resp,
        degradation=factors,
        provenance=provenance,
        wcs=obs.wcs,
        timings=timings,
        errors=errors,
    )


def _kept(a: np.ndarray, callers: bool) -> np.ndarray:
    """``a`` itself when it is a writeable C-contiguous float32 array, or a float64 one the
    caller holds (``callers``): a full-disk input is not held twice; otherwise a float32
    copy."""
    wanted = a.dtype == np.float32 or (callers and a.dtype == np.float64)
    if wanted and a.flags.c_contiguous and a.flags.writeable:
        return a
    return a.astype(np.float32)


def _blocks(n: int) -> list[slice]:
    """Consecutive slices of at most ``_ROWS`` of ``n`` pixels."""
    return [slice(i, min(i + _ROWS, n)) for i in range(0, n, _ROWS)]


def _synthetic_chi2(em, has_em, K, y, sigma) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic intensities ``em @ K`` (..., C) and chi^2 (...) against the observed ``y`` and
    ``sigma`` (float64 per block), both float32 and NaN without an EM, in blocks of pixels."""
    from .forward import chi2

    C, lead = K.shape[1], has_em.shape
    synth, chi = np.empty((*lead, C), np.float32), np.empty(lead, np.float32)
    ef, hf, sy, cf = (
        em.reshape(-1, em.shape[-1]),
        has_em.reshape(-1),
        synth.reshape(-1, C),
        chi.reshape(-1),
    )
    yf, sf = y.reshape(-1, C), np.broadcast_to(sigma, y.shape).reshape(-1, C)
    for sl in _blocks(len(hf)):
        block = np.nan_to_num(ef[sl]) @ K
        block[~hf[sl]] = np.nan
        sy[sl] = block
        cf[sl] = chi2(block, yf[sl].astype(np.float64), sf[sl].astype(np.float64))
    return synth, chi


# -- methods ----------------------------------------------------------------------------------


def _corrected(obs: _Observation, factors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Degradation-corrected intensities and sigma (float64); invalid and saturated pixels
    NaN."""
    return _correct(obs.y, obs.sigma, obs.invalid | obs.saturated, factors)


def _correct(y, sigma, bad, factors) -> tuple[np.ndarray, np.ndarray]:
    """``y / factors`` (NaN where ``bad``) and ``sigma / factors``, float64."""
    f = np.asarray(factors, np.float64)
    return np.where(bad[..., None], np.nan, y / f), sigma / f


def _bp_solve(y, s, resp, tolfac, solver=None, progress=False, start=0):
    """:func:`deepem_jax.bp.solve` of corrected intensities and sigma with the Cheung basis on
    the response's grid, without the coefficients; ``progress`` and ``start`` as in
    ``bp.solve``."""
    from . import bp
    from .basis import cheung_basis

    kw = {} if solver is None else {"solver": solver}
    return bp.solve(
        y,
        s,
        resp,
        cheung_basis(resp.logt_array),
        tolfac=tolfac,
        progress=progress,
        coeffs=False,
        start=start,
        **kw,
    )


def _run_bp(obs, factors, response, tolfac, solver, progress):
    """BP of the corrected observation in blocks of ``_ROWS`` pixels, so only one block is
    ever held in float64; EM (..., n_T) float32, status, tolerance factor used (float32)."""
    from .response import DEEPEM_LOGT

    resp = _fit_response(response, DEEPEM_LOGT, obs.channels)
    C, lead = len(obs.channels), obs.y.shape[:-1]
    y = obs.y.reshape(-1, C)
    s = np.broadcast_to(obs.sigma, obs.y.shape).reshape(-1, C)
    bad = (obs.invalid | obs.saturated).reshape(-1)
    n = len(y)
    em = np.empty((n, len(DEEPEM_LOGT)), np.float32)
    status, used = np.empty(n, np.int8), np.empty(n, np.float32)
    bar = _bar(progress, n, "BP")
    try:
        for sl in _blocks(n):
            res = _bp_solve(*_correct(y[sl], s[sl], bad[sl], factors), resp, tolfac, solver, bar)
            em[sl], status[sl], used[sl] = res.em, res.status, res.tolfac
    finally:
        if bar is not None:
            bar.close()
    prov = {"_logt": DEEPEM_LOGT, "_response": resp}
    return em.reshape(*lead, em.shape[-1]), status.reshape(lead), used.reshape(lead), prov


@partial(jax.jit, static_argnames=("config", "dtype"))
def _net_tile(params, y, sigma, K, tolfac, config, dtype):
    """EM (n, n_T), in-band flag (n,) and finite flag (n,) of the network (matrix products on
    ``dtype`` operands) on one tile of corrected intensities and sigma (n, C); NaN EM where the
    input is not valid."""
    from .bp import bounds
    from .model import network_em

    valid = jnp.all(jnp.isfinite(y), -1) & jnp.all(jnp.isfinite(sigma) & (sigma > 0), -1)
    y0 = jnp.where(valid[:, None], y, 0.0)
    s0 = jnp.where(valid[:, None], sigma, 1.0)
    em = network_em(params, y0, config, jnp.dtype(dtype), sigma=s0, K=K)
    lower, upper = bounds(y0, s0, tolfac)
    r = em @ K.T
    in_band = jnp.all((r >= lower) & (r <= upper), axis=-1)
    finite = jnp.all(jnp.isfinite(em), -1)
    return jnp.where(valid[:, None], em, jnp.nan), in_band & valid, finite | ~valid


@partial(jax.jit, static_argnames=("n_iter",))
def _project_tile(em, y, sigma, K, tolfac, n_iter):
    """EM (n, n_T), in-band flag (n,) and finite flag (n,) of network EMs (n, n_T) of valid
    pixels moved into their band (:func:`deepem_jax.consistency.project_to_band`)."""
    from .bp import bounds
    from .consistency import project_to_band

    lower, upper = bounds(y, sigma, tolfac)
    res = project_to_band(em, K, lower, upper, n_iter=n_iter)
    return res.em, res.in_band, jnp.all(jnp.isfinite(res.em), -1)


def _run_net(obs, factors, response, predictor, tolfac, consistency, progress):
    from ._batching import bucket, map_rows
    from .pretrained import load_default_predictor

    if predictor is None:
        predictor = load_default_predictor(np.array(obs.channels) * u.AA)
    if sorted(predictor.channels) != sorted(obs.channels):
        raise ValueError(
            f"the network takes channels {list(predictor.channels)} Å; the observation has "
            f"{list(obs.channels)} Å"
        )
    resp = _fit_response(response, predictor.logt_array, obs.channels)
    y, s = _corrected(obs, factors)
    C = len(obs.channels)
    yf = y.reshape(-1, C).astype(np.float32)
    sf = s.reshape(-1, C).astype(np.float32)
    K = np.asarray(resp.K, np.float32)
    order = [list(obs.channels).index(c) for c in predictor.channels]
    if order != list(range(C)):  # the network sees its channels in its own order
        yf, sf, K = yf[:, order], sf[:, order], K[order]
    K = jnp.asarray(K)
    tol = jnp.float32(tolfac)
    fn = partial(
        _net_tile,
        predictor.params,
        K=K,
        tolfac=tol,
        config=predictor.config,
        dtype=predictor.dtype,
    )
    bar = _bar(progress, yf.shape[0], "network")
    em, in_band, finite = map_rows(
        lambda a, b: fn(a, b),
        [yf, sf],
        bucket(yf.shape[0], _NET_TILE, min_size=1),
        fills=(0.0, 1.0),
        on_chunk=None if bar is None else bar.update,
    )
    if bar is not None:
        bar.close()
    unreachable = np.zeros(yf.shape[0], bool)
    redo, network = np.empty(0, np.intp), em[:0]
    if consistency:
        # only the pixels the network left outside are projected: the others keep its EM;
        # bands a Farkas ray proves out of reach are left to BP's retries
        redo = np.flatnonzero(~in_band & finite & np.all(np.isfinite(em), -1))
        if redo.size:
            yr, sr = y.reshape(-1, C)[redo], s.reshape(-1, C)[redo]
            unreachable[redo] = _unreachable(yr, sr, resp, tolfac)
            redo = redo[~unreachable[redo]]
        if redo.size:
            network = em[redo]
            em[redo], in_band[redo], finite[redo] = map_rows(
                partial(_project_tile, K=K, tolfac=tol, n_iter=20),
                [em[redo], yf[redo], sf[redo]],
                bucket(redo.size, _NET_TILE, min_size=1),
                fills=(0.0, 0.0, 1.0),
            )
    lead = y.shape[:-1]
    status = np.where(in_band, int(DEMStatus.SOLVED), int(DEMStatus.OUTSIDE_BAND))
    status = np.where(finite, status, int(DEMStatus.NONFINITE_OUTPUT)).reshape(lead)
    used = np.full(lead, float(tolfac))
    em = np.asarray(em).reshape(*lead, -1)
    n_bp = 0
    if consistency == "exact":
        n_bp = _bp_fallback(y, s, resp, tolfac, em, status, used, progress, unreachable)
    left = status.reshape(-1)[redo] == DEMStatus.OUTSIDE_BAND
    em.reshape(-1, em.shape[-1])[redo[left]] = network[left]  # no move: the network's EM
    cfg = predictor.config
    widths = (cfg.n_channels, *cfg.hidden, cfg.n_temperatures)
    refined = f"+GN{cfg.refine_steps}" if cfg.refine_steps else ""
    refined += "T" if cfg.band_target else ""
    prov = {
        "NETWORK": "-".join(str(w) for w in widths) + refined,
        "NETDTYPE": predictor.dtype,
        "WEIGHTS": _params_sha256(predictor.params)[:16],
        "CONSIST": str(consistency),
        "BPFALLBK": n_bp,
    }
    return em, status, used, prov, predictor.logt_array, resp


def _unreachable(y, s, resp, tolfac) -> np.ndarray:
    """(N,) bool: corrected intensities and sigma (N, C) whose BP band no non-negative EM
    reaches, proven by a Farkas ray (:func:`deepem_jax.bp._solve._ray_proven_pixels`)."""
    from .basis import cheung_basis
    from .bp._solve import _ray_proven_pixels

    return _ray_proven_pixels(y, s, resp, cheung_basis(resp.logt_array), tolfac)


def _bp_fallback(y, s, resp, tolfac, em, status, used, progress, unreachable) -> int:
    """Solve by BP (in place) the pixels the projection left outside the band: SOLVED with
    BP's EM and tolerance factor where BP is feasible; the others keep their EM and
    OUTSIDE_BAND. Pixels without a network EM (invalid or saturated input) are not sent; those
    whose band is ``unreachable`` (N,) (proven by a ray, as BP's first pass would) start at
    BP's first retry. Returns the number of pixels BP solved."""
    has = np.all(np.isfinite(em.reshape(-1, em.shape[-1])), -1)
    idx = np.flatnonzero((status.reshape(-1) == DEMStatus.OUTSIDE_BAND) & has)
    if idx.size == 0:
        return 0
    C = y.shape[-1]
    yr, sr = y.reshape(-1, C)[idx], s.reshape(-1, C)[idx]
    start = unreachable[idx].astype(np.intp)  # one call: the pixels share BP's passes
    res = _bp_solve(yr, sr, resp, tolfac, None, progress, start)
    ok = res.status == DEMStatus.SOLVED
    em.reshape(-1, em.shape[-1])[idx[ok]] = res.em[ok]
    status.reshape(-1)[idx[ok]] = int(DEMStatus.SOLVED)
    used.reshape(-1)[idx[ok]] = res.tolfac[ok]
    return int(ok.sum())


def _run_fit(obs, factors, response, fitter, init, predictor, tolfac, solver, progress):
    from .basis import cheung_basis
    from .fit import Fitter, fit
    from .response import DEEPEM_LOGT

    fitter = Fitter() if fitter is None else fitter
    if init not in ("bp", "net", "flat"):
        raise ValueError(f"init must be 'bp', 'net' or 'flat', got {init!r}")
    if init == "bp":
        em0 = _run_bp(obs, factors, response, tolfac, solver, progress)[0]
    elif init == "net":
        em0 = _run_net(obs, factors, response, predictor, tolfac, True, progress)[0]
    else:
        em0 = None
    resp = _fit_response(response, DEEPEM_LOGT, obs.channels)
    y, s = _corrected(obs, factors)
    basis = cheung_basis(DEEPEM_LOGT) if fitter.parametrisation == "basis" else None
    C, lead = len(obs.channels), y.shape[:-1]
    K = np.asarray(resp.K, np.float32)
    if fitter.spatial:
        res = fit(y.astype(np.float32), s.astype(np.float32), K, fitter, em0=em0, basis=basis)
        em, status = np.asarray(res.em), np.asarray(res.status)
    else:
        from ._batching import bucket, map_rows

        yf = y.reshape(-1, C).astype(np.float32)
        sf = s.reshape(-1, C).astype(np.float32)
        e0 = np.full((len(yf), len(DEEPEM_LOGT)), np.nan, np.float32)
        if em0 is not None:
            e0 = np.asarray(em0, np.float32).reshape(len(yf), -1)

        def rows(a, b, c):
            r = fit(a, b, K, fitter, em0=c, basis=basis)
            return r.em, r.status

        bar = _bar(progress, yf.shape[0], "fit")
        em, status = map_rows(
            rows,
            [yf, sf, e0],
            bucket(yf.shape[0], _TILE, min_size=1),
            fills=(0.0, 1.0, np.nan),
            on_chunk=None if bar is None else bar.update,
        )
        if bar is not None:
            bar.close()
        em, status = np.asarray(em).reshape(*lead, -1), np.asarray(status).reshape(lead)
    prov = {
        "FITPARAM": fitter.parametrisation,
        "FITINIT": init,
        "FITL1": fitter.l1,
        "FITTIK0": fitter.tikhonov0,
        "FITTIK2": fitter.tikhonov2,
        "FITSPAT": fitter.spatial,
        "FITSTEPS": fitter.max_steps,
        "FITGTOL": fitter.gtol,
    }
    return em, status.astype(np.int8), np.full(lead, np.nan), prov, DEEPEM_LOGT, resp


def _params_sha256(params) -> str:
    """sha256 of the network parameters (leaves in tree order, float32 bytes)."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
    return h.hexdigest()


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="px", desc=desc)
