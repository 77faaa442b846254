"""Gradient-based DEM fitting: jit-able, vmap-able, differentiable with respect to the data and
the response, for a batch of pixels or a whole map.

Per pixel, with intensities ``y`` and 1-sigma errors ``sigma`` (C,) in DN s^-1 pix^-1 and the
response ``K`` (C, n_T) in DN cm^5 s^-1 pix^-1, :func:`fit` minimises over parameters ``theta``::

    F = 1/2 sum_c ((K em(theta) - y)_c / sigma_c)^2                  data term, units of sigma
      + l1 * sum_j c_j / e_ref                                        sparsity (BP-like)
      + tikhonov0 / 2 * sum_t (em_t / e_ref)^2                         Tikhonov, zeroth order
      + tikhonov2 / 2 * sum_t ((em_{t-1} - 2 em_t + em_{t+1}) / e_ref)^2   second order in log T

and, for a map (ny, nx, C) with ``spatial > 0``, ``spatial / 2 * sum ||theta_i - theta_j||^2``
over every pair of 4-neighbouring pixels (the pixels are then fitted jointly). ``e_ref`` (cm^-5
per bin) is the per-bin EM of the flat DEM that best fits the pixel (weighted least squares),
so the weights ``l1``, ``tikhonov0``, ``tikhonov2`` are dimensionless and mean the same for faint
and bright pixels. ``c_j`` are the non-negative basis coefficients (``"basis"``) or the EM per
bin (otherwise), in cm^-5.

Parametrisations keep EM >= 0: ``"log"`` (EM per bin ``= 1e26 exp(theta)`` cm^-5), ``"softplus"``
(``= 1e26 softplus(theta)``) and ``"basis"`` (Cheung et al. 2015 basis functions with coefficients
``1e26 exp(theta)``, EM ``= B.T @ c``).

The optimiser is any optax transformation (default :func:`optax.lbfgs` with its zoom line
search), run in a ``lax.while_loop`` until ``max |dF/dtheta| <= gtol (1 + |F|)`` or
``max_steps``; a step whose EM (in the working dtype), objective or gradient is not finite
(e.g. an overflowing ``exp``) is not taken: the problem stops at its last finite iterate
(MAX_STEPS). Without spatial coupling a pixel has also to pass a test the gradient in
``theta`` cannot: F is a convex quadratic in the coefficients ``c``, and neither changing one
coefficient to its best positive value nor multiplying all of them by the best factor may lower
F by more than ``gtol (1 + |F|)``. Where the gradient has converged but such a move would lower
F more (coefficients far too small: the gradient of ``log c`` is ``c dF/dc``), the fit takes
that move and restarts the optimiser there. Without spatial coupling each pixel is its own
problem (vmapped, every pixel stops on its own).
A vmapped loop still runs as long as the slowest pixel of its batch, so on concrete inputs the
pixels are run in rounds of a few steps over the pixels still running (``compact``, see
:func:`fit`): on real AIA pixels most fits converge in tens of steps and a few in 2000.
Gradients of the fitted EM with respect to ``y``, ``sigma`` and ``K`` are implicit (the
implicit function theorem at the optimum, ``dtheta* = -H^-1 d(grad F)``, with the Hessian ``H``
solved densely per pixel, or by conjugate gradients for a spatially coupled map), never unrolled.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ._units import INTENSITY_UNIT, to_value
from .basis import EM_SCALE, Basis
from .response import RESPONSE_UNIT
from .status import DEMStatus

__all__ = ["PARAMETRISATIONS", "FitResult", "Fitter", "fit", "initial_params", "objective"]

PARAMETRISATIONS = ("log", "softplus", "basis")
#: Smallest e_ref, cm^-5 per bin (pixels with no positive signal).
_EREF_FLOOR = 1e20
#: Largest number of pixels per compiled call of a compacted fit (see :func:`fit`).
_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Fitter:
    """Configuration of :func:`fit` (hashable: it is static under ``jax.jit``).

    Attributes
    ----------
    parametrisation : ``"log"``, ``"softplus"`` or ``"basis"`` (see the module docstring).
    l1, tikhonov0, tikhonov2 : dimensionless weights of the regularisers (>= 0).
    spatial : weight of the squared parameter differences between 4-neighbouring pixels (>= 0);
        > 0 needs a map (ny, nx, C) and fits its pixels jointly.
    optimizer : an optax ``GradientTransformation``; None means ``optax.lbfgs()``.
    max_steps : optimiser steps per problem (> 0).
    gtol : a pixel has converged when ``max |dF/dtheta| <= gtol * (1 + |F|)`` (F of the pixel,
        in units of chi^2 / 2) and, without spatial coupling, no single closed-form move of its
        coefficients lowers F by more than that (see the module docstring).
    floor : initial EM of empty bins, as a fraction of ``e_ref`` (log and basis
        parametrisations cannot start at EM = 0).
    """

    parametrisation: str = "log"
    l1: float = 0.0
    tikhonov0: float = 0.0
    tikhonov2: float = 0.0
    spatial: float = 0.0
    optimizer: Any = None
    max_steps: int = 2000
    gtol: float = 1e-3
    floor: float = 1e-3

    def __post_init__(self) -> None:
        if self.parametrisation not in PARAMETRISATIONS:
            raise ValueError(
                f"parametrisation must be one of {PARAMETRISATIONS}, got {self.parametrisation!r}"
            )
        for name in ("l1", "tikhonov0", "tikhonov2", "spatial"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (isinstance(self.max_steps, int) and self.max_steps > 0):
            raise ValueError(f"max_steps must be a positive int, got {self.max_steps!r}")
        for name in ("gtol", "floor"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

    @property
    def transform(self) -> optax.GradientTransformationExtraArgs:
        """The optimiser, accepting (and possibly ignoring) ``value``, ``grad``, ``value_fn``."""
        opt = optax.lbfgs() if self.optimizer is None else self.optimizer
        return optax.with_extra_args_support(opt)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FitResult:
    """DEM fits of a set of pixels (leading axes of the input).

    Attributes
    ----------
    em : (..., n_T) EM per log T bin, cm^-5 (NaN for INVALID_INPUT and NONFINITE_OUTPUT).
    params : (..., n_params) the fitted ``theta``.
    status : (...) int8 :class:`~deepem_jax.DEMStatus`: SOLVED (converged), MAX_STEPS (EM of
        the last finite step: at ``max_steps``, or where a further step was not finite),
        NONFINITE_OUTPUT (no finite start), INVALID_INPUT (NaN/Inf intensity, sigma not > 0).
    chi2 : (...) mean over channels of ``((K em - y) / sigma)**2``.
    objective : (...) ``F`` at the fit (for a spatially coupled map: each pixel's own terms).
    grad_norm : (...) ``max |dF/dtheta| / (1 + |F|)`` at the fit, or, without spatial
        coupling, the drop of F by the best closed-form move over ``1 + |F|`` if larger
        (converged if <= gtol).
    steps : (...) int32 steps taken (closed-form moves included; a rejected non-finite step
        not counted).
    """

    em: jax.Array
    params: jax.Array
    status: jax.Array
    chi2: jax.Array
    objective: jax.Array
    grad_norm: jax.Array
    steps: jax.Array


# -- the objective ----------------------------------------------------------------------------


def _coeffs(fitter: Fitter, theta: jax.Array) -> jax.Array:
    """Non-negative coefficients in units of EM_SCALE: basis coefficients or EM per bin."""
    if fitter.parametrisation == "softplus":
        return jax.nn.softplus(theta)
    return jnp.exp(theta)


def _em_of(fitter: Fitter, c: jax.Array, B: jax.Array | None) -> jax.Array:
    """EM per bin in units of EM_SCALE cm^-5 of coefficients ``c``."""
    return c @ B if fitter.parametrisation == "basis" else c


def _em_units(fitter: Fitter, theta: jax.Array, B: jax.Array | None) -> jax.Array:
    """EM per bin in units of EM_SCALE cm^-5."""
    return _em_of(fitter, _coeffs(fitter, theta), B)


def _eref(y: jax.Array, sigma: jax.Array, Ks: jax.Array) -> jax.Array:
    """Per-bin EM (units of EM_SCALE) of the flat DEM best fitting ``y`` (clipped at 0) in
    weighted least squares; at least ``_EREF_FLOOR`` cm^-5."""
    k = Ks.sum(-1) / sigma
    a = jnp.sum(jnp.maximum(y, 0.0) / sigma * k, -1) / jnp.sum(k * k, -1)
    return jnp.maximum(a, _EREF_FLOOR / EM_SCALE)


def _regularisers(fitter, c, e, eref):
    """The regularisers of F, for coefficients ``c`` and EM ``e`` (units of EM_SCALE), as
    ``(linear, quadratic)``: the terms that scale as ``t`` and as ``t^2`` when ``c`` is
    multiplied by ``t`` (l1; Tikhonov)."""
    lin = quad = jnp.zeros(e.shape[:-1], e.dtype)
    if fitter.l1:
        lin = fitter.l1 * jnp.sum(c / eref, -1)
    if fitter.tikhonov0:
        quad = quad + 0.5 * fitter.tikhonov0 * jnp.sum(jnp.square(e / eref), -1)
    if fitter.tikhonov2:
        d2 = e[..., :-2] - 2.0 * e[..., 1:-1] + e[..., 2:]
        quad = quad + 0.5 * fitter.tikhonov2 * jnp.sum(jnp.square(d2 / eref), -1)
    return lin, quad


def _coeff_terms(fitter, c, y, sigma, Ks, B):
    """(F, chi2) of coefficients ``c`` (see :func:`_coeffs`); ``Ks`` = K * EM_SCALE."""
    e = _em_of(fitter, c, B)
    r = (e @ Ks.T - y) / sigma
    lin, quad = _regularisers(fitter, c, e, _eref(y, sigma, Ks)[..., None])
    return 0.5 * jnp.sum(r * r, -1) + lin + quad, jnp.mean(r * r, -1)


def _pixel_terms(fitter, theta, y, sigma, Ks, B):
    """(F, chi2) of one pixel (or a batch with leading axes); ``Ks`` = K * EM_SCALE."""
    return _coeff_terms(fitter, _coeffs(fitter, theta), y, sigma, Ks, B)


def _theta_of(fitter: Fitter, c: jax.Array) -> jax.Array:
    """The parameters ``theta`` of coefficients ``c > 0`` (inverse of :func:`_coeffs`)."""
    if fitter.parametrisation == "softplus":
        return c + jnp.log(-jnp.expm1(-c))
    return jnp.log(c)


def _moves(fitter, theta, y, sigma, Ks, B):
    """Two closed-form moves of one pixel's coefficients ``c`` (F without the spatial term is a
    convex quadratic in ``c``), as ``(drop, theta_after)``: the larger of the drops of F from
    changing one coefficient to its best positive value (slope ``h``, curvature ``q``: to
    ``c - h/q``, a drop of ``h^2 / 2q``) and from multiplying every coefficient by the best
    factor ``t > 0`` (F = ``a t^2 + b t + F(0)``, a drop of ``(2a + b)^2 / 4a``, ``2a + b =
    dF/dt`` at ``t = 1``), and the parameters after that move. Both drops vanish at the
    minimum; unlike the gradient in ``theta`` (``c dF/dc`` for the log parametrisation), they
    are not small where a coefficient, or all of them, are far too small. Moves towards ``c = 0``
    are left to the gradient (log and softplus cannot reach it)."""
    c = _coeffs(fitter, theta)
    h = jax.grad(lambda c: jnp.sum(_coeff_terms(fitter, c, y, sigma, Ks, B)[0]))(c)
    basis = B if fitter.parametrisation == "basis" else jnp.eye(c.shape[-1], dtype=c.dtype)
    eref = _eref(y, sigma, Ks)[..., None]
    q = (jnp.square(basis @ Ks.T) @ jnp.square(1.0 / sigma)[..., None])[..., 0]
    if fitter.tikhonov0:
        q = q + fitter.tikhonov0 * jnp.sum(jnp.square(basis), -1) / jnp.square(eref)
    if fitter.tikhonov2:
        d2 = basis[:, :-2] - 2.0 * basis[:, 1:-1] + basis[:, 2:]
        q = q + fitter.tikhonov2 * jnp.sum(jnp.square(d2), -1) / jnp.square(eref)
    safe_q = jnp.where(q > 0, q, 1.0)
    th_target = _theta_of(fitter, c - h / safe_q)
    inner = (q > 0) & (c * q > h) & jnp.isfinite(th_target)  # a target rounded to 0 is no move
    coord = jnp.where(inner, h * h / (2.0 * safe_q), 0.0)
    j = jnp.argmax(coord, -1)
    e = _em_of(fitter, c, B)
    p = (e @ Ks.T) / sigma
    lin, quad = _regularisers(fitter, c, e, eref)
    a = 0.5 * jnp.sum(p * p, -1) + quad
    b = lin - jnp.sum(p * y / sigma, -1)
    inner_t = (a > 0) & (b < 0)
    safe_a = jnp.where(inner_t, a, 1.0)
    slope = jnp.sum(c * h, -1)
    scale = jnp.where(inner_t, slope * slope / (4.0 * safe_a), 0.0)
    best = jnp.take_along_axis(coord, j[..., None], -1)[..., 0]
    one = jax.nn.one_hot(j, c.shape[-1], dtype=bool)
    # parameters after each move (a c t that underflows to 0 is shifted by log t instead)
    t = jnp.where(inner_t, -b / (2.0 * safe_a), 1.0)[..., None]
    th_coord = jnp.where(one & inner, th_target, theta)
    th_scaled = _theta_of(fitter, c * t)
    th_scale = jnp.where(jnp.isfinite(th_scaled), th_scaled, theta + jnp.log(t))
    return jnp.maximum(best, scale), jnp.where((scale >= best)[..., None], th_scale, th_coord)


def _spatial(fitter: Fitter, theta: jax.Array) -> jax.Array:
    dy = theta[1:] - theta[:-1]
    dx = theta[:, 1:] - theta[:, :-1]
    return 0.5 * fitter.spatial * (jnp.sum(dy * dy) + jnp.sum(dx * dx))


def _total(fitter, theta, data):
    """The scalar minimised: the sum of the pixels' F plus the spatial term."""
    y, sigma, Ks, B = data
    f = jnp.sum(_pixel_terms(fitter, theta, y, sigma, Ks, B)[0])
    return f + _spatial(fitter, theta) if fitter.spatial else f


def objective(
    fitter: Fitter,
    params: jax.Array,
    intensities: jax.Array,
    sigma: jax.Array,
    K: jax.Array,
    basis: Basis | None = None,
) -> jax.Array:
    """Per-pixel ``F`` (without the spatial term) of ``params`` (..., n_params) for intensities
    and sigma (..., C) in DN s^-1 pix^-1 and ``K`` (C, n_T) in DN cm^5 s^-1 pix^-1. Pure jnp,
    differentiable in every array argument."""
    dt = jnp.result_type(intensities)
    Ks = jnp.asarray(K, dt) * EM_SCALE
    B = None if basis is None else jnp.asarray(basis.B, dt)
    return _pixel_terms(fitter, params, intensities, sigma, Ks, B)[0]


# -- the solver -------------------------------------------------------------------------------


def _loop(fitter: Fitter, data) -> tuple:
    """``(start, running, body)`` of the optimiser loop of one problem: ``start(theta0)`` is the
    loop carry ``(theta, opt_state, F, dF/dtheta, measure, moved, halted, steps)``, with the
    per-pixel convergence measure (``FitResult.grad_norm``) and the parameters after the best
    closed-form move (:func:`_moves`; ``theta`` itself with spatial coupling);
    ``running(carry)`` whether it goes on (steps left, not converged, all finite, not halted);
    ``body(carry)`` one step (the optimiser's, or that move where only the move's test fails;
    rejected, the carry kept and ``halted`` set, when the new EM, objective or gradient is not
    finite)."""
    fun = partial(_total, fitter, data=data)
    vg = jax.value_and_grad(fun)
    opt = fitter.transform
    y, sigma, Ks, B = data

    def assess(theta, f, g):
        m = jnp.max(jnp.abs(g), -1)
        moved = theta
        if fitter.spatial:  # each pixel's own F; moving one pixel changes the coupling
            f = _pixel_terms(fitter, theta, y, sigma, Ks, B)[0]
        else:  # f is the pixel's F
            drop, moved = _moves(fitter, theta, y, sigma, Ks, B)
            m = jnp.maximum(m, drop)
        return m / (1.0 + jnp.abs(f)), moved

    def running(c):
        _, _, f, g, measure, _, halted, k = c
        ok = jnp.isfinite(f) & jnp.all(jnp.isfinite(g)) & ~halted
        return (k < fitter.max_steps) & (jnp.max(measure) > fitter.gtol) & ok

    def body(c):
        theta, state, f, g, measure, moved, _, k = c
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int32 and int64 under x64
            upd, new_state = opt.update(g, state, theta, value=f, grad=g, value_fn=fun)
        new = optax.apply_updates(theta, upd)
        if not fitter.spatial:
            # where the gradient has converged but a closed-form move still lowers F (a
            # coefficient, or all, far too small), take that move and restart the optimiser
            stalled = jnp.max(jnp.abs(g), -1) <= fitter.gtol * (1.0 + jnp.abs(f))
            new = jnp.where(stalled, moved, new)
            new_state = jax.tree.map(
                lambda a, b: jnp.where(stalled, a, b), opt.init(moved), new_state
            )
        new_f, new_g = vg(new)
        em = EM_SCALE * _em_units(fitter, new, B)  # the EM the fit would return
        ok = jnp.isfinite(new_f) & jnp.all(jnp.isfinite(new_g)) & jnp.all(jnp.isfinite(em))
        kept = jax.tree.map(
            lambda a, b: jnp.where(ok, a, b),
            (new, new_state, new_f, new_g, *assess(new, new_f, new_g)),
            (theta, state, f, g, measure, moved),
        )
        return (*kept, ~ok, k + ok.astype(k.dtype))

    def start(theta0):
        f0, g0 = vg(theta0)
        measure, moved = assess(theta0, f0, g0)
        return theta0, opt.init(theta0), f0, g0, measure, moved, jnp.bool_(False), jnp.int32(0)

    return start, running, body


def _minimise(fitter: Fitter, theta0: jax.Array, data) -> tuple:
    """(theta, F, per-pixel convergence measure, steps) of one problem: a pixel (n_params,) or
    a spatially coupled map (ny, nx, n_params)."""
    start, running, body = _loop(fitter, data)
    theta, _, f, _, measure, _, _, k = jax.lax.while_loop(running, body, start(theta0))
    return theta, f, measure, k


def _hessian_solve(fitter: Fitter, theta: jax.Array, data, b: jax.Array) -> jax.Array:
    """``H^+ b`` with ``H`` the Hessian of the minimised scalar at ``theta``: a dense
    eigen-decomposition for one pixel (directions of negligible curvature, e.g. bins driven to
    EM = 0, are dropped), conjugate gradients on Hessian-vector products for a map."""
    fun = partial(_total, fitter, data=data)
    if theta.ndim == 1:
        w, V = jnp.linalg.eigh(jax.hessian(fun)(theta))
        cut = jnp.max(jnp.abs(w)) * theta.size * jnp.finfo(theta.dtype).eps * 10
        return V @ (jnp.where(w > cut, 1.0 / jnp.where(w > cut, w, 1.0), 0.0) * (V.T @ b))

    def hvp(v):
        return jax.jvp(jax.grad(fun), (theta,), (v,))[1]

    return jax.scipy.sparse.linalg.cg(hvp, b, maxiter=10 * b.size)[0]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _argmin(fitter: Fitter, theta0: jax.Array, data) -> tuple:
    return _minimise(fitter, jax.lax.stop_gradient(theta0), data)


def _argmin_fwd(fitter, theta0, data):
    out = _minimise(fitter, theta0, data)
    return out, (out[0], data)


def _argmin_bwd(fitter, res, cot):
    theta, data = res
    theta_bar, f_bar = cot[0], cot[1]
    v = _hessian_solve(fitter, theta, data, theta_bar)

    fun = partial(_total, fitter)
    # d theta*/d data = -H^-1 d(grad_theta F)/d data; dF*/d data = dF/d data (envelope).
    _, vjp = jax.vjp(lambda d: jax.grad(fun)(theta, d), data)
    (data_bar,) = vjp(-v)
    df = jax.grad(fun, argnums=1)(theta, data)
    # a problem that ended non-finite (status NONFINITE_OUTPUT) contributes nothing: its NaNs
    # would otherwise reach the cotangent of K, which every pixel of a batch shares
    finite = jnp.all(jnp.isfinite(theta)) & jnp.isfinite(fun(theta, data))
    data_bar = jax.tree.map(lambda a, b: jnp.where(finite, a + f_bar * b, 0.0), data_bar, df)
    return jnp.zeros_like(theta), data_bar


_argmin.defvjp(_argmin_fwd, _argmin_bwd)


# -- public entry -----------------------------------------------------------------------------


def initial_params(
    fitter: Fitter,
    em0: jax.Array | None,
    intensities: jax.Array,
    sigma: jax.Array,
    K: jax.Array,
    basis: Basis | None = None,
) -> jax.Array:
    """Parameters (..., n_params) starting the fit at ``em0`` (..., n_T) in cm^-5 (values
    below ``fitter.floor * e_ref`` raised to it; None, or a pixel with no finite positive
    value: the flat DEM of ``e_ref`` per bin). For
    ``"basis"`` the EM goes on the basis's Dirac functions (its first n_T functions must be
    them, as in :func:`deepem_jax.cheung_basis`) and every other coefficient starts at the
    floor."""
    dt = jnp.result_type(intensities)
    Ks = jnp.asarray(K, dt) * EM_SCALE
    eref = _eref(intensities, sigma, Ks)[..., None]
    n_T = Ks.shape[-1]
    flat = jnp.broadcast_to(eref, (*eref.shape[:-1], n_T))
    if em0 is None:
        e = flat
    else:
        e = jnp.nan_to_num(jnp.asarray(em0, dt) / EM_SCALE, nan=0.0, posinf=0.0, neginf=0.0)
        e = jnp.where(jnp.any(e > 0, -1, keepdims=True), e, flat)
    e = jnp.maximum(e, fitter.floor * eref)
    if fitter.parametrisation == "basis":
        if basis is None:
            raise ValueError('parametrisation="basis" needs basis= (a deepem_jax.Basis)')
        n_b = basis.n_basis
        if n_b < n_T or not np.array_equal(np.asarray(basis.B)[:n_T], np.eye(n_T)):
            raise ValueError("the basis's first n_T functions must be Dirac deltas")
        rest = jnp.broadcast_to(fitter.floor * eref, (*e.shape[:-1], n_b - n_T))
        e = jnp.concatenate([e, rest], -1)
    return _theta_of(fitter, e)


def _prepare(y, sigma, theta0) -> tuple:
    """Valid-pixel mask, started mask (a finite start: intensities far beyond float range
    make it inf or NaN) and the inputs with invalid or unstarted pixels replaced by a harmless
    problem."""
    valid = jnp.all(jnp.isfinite(y), -1) & jnp.all(jnp.isfinite(sigma) & (sigma > 0), -1)
    started = jnp.all(jnp.isfinite(theta0), -1)
    y0 = jnp.where(valid[..., None], y, 0.0)
    s0 = jnp.where(valid[..., None], sigma, 1.0)
    th0 = jnp.where((valid & started)[..., None], theta0, 0.0)
    return valid, started, y0, s0, th0


def _finish(fitter: Fitter, valid, started, y0, s0, Ks, B, theta, gmax, steps) -> FitResult:
    """The :class:`FitResult` of fitted parameters (leading axes of the pixels). The EM,
    chi^2 and objective of a pixel without a finite start, EM and objective (NONFINITE_OUTPUT)
    are NaN, computed from a harmless problem so that gradients through the result are 0 for
    it, not NaN (a NaN would reach the cotangent of ``Ks``, shared by every pixel)."""
    sg = jax.lax.stop_gradient
    f, _ = _pixel_terms(fitter, sg(theta), sg(y0), sg(s0), sg(Ks), B)
    em = EM_SCALE * _em_units(fitter, sg(theta), B)
    finite = jnp.all(jnp.isfinite(em), -1) & jnp.isfinite(f) & started
    status = jnp.where(gmax <= fitter.gtol, int(DEMStatus.SOLVED), int(DEMStatus.MAX_STEPS))
    status = jnp.where(finite, status, int(DEMStatus.NONFINITE_OUTPUT))
    status = jnp.where(valid, status, int(DEMStatus.INVALID_INPUT)).astype(jnp.int8)
    ok = valid & finite
    keep = ok[..., None]
    th = jnp.where(keep, theta, 0.0)
    f, chi2 = _pixel_terms(fitter, th, jnp.where(keep, y0, 0.0), jnp.where(keep, s0, 1.0), Ks, B)
    em = EM_SCALE * _em_units(fitter, th, B)
    return FitResult(
        em=jnp.where(keep, em, jnp.nan),
        params=theta,
        status=status,
        chi2=jnp.where(ok, chi2, jnp.nan),
        objective=jnp.where(ok, f, jnp.nan),
        grad_norm=gmax,
        steps=steps.astype(jnp.int32),
    )


@partial(jax.jit, static_argnums=(0,))
def _fit(fitter: Fitter, y, sigma, K, B, theta0) -> FitResult:
    valid, started, y0, s0, th0 = _prepare(y, sigma, theta0)
    Ks = K * EM_SCALE
    if fitter.spatial:
        theta, _, gmax, steps = _argmin(fitter, th0, (y0, s0, Ks, B))
        steps = jnp.broadcast_to(steps, gmax.shape)
    else:
        lead = y.shape[:-1]
        flat = lambda a: a.reshape(-1, a.shape[-1])  # noqa: E731
        solve = jax.vmap(_argmin, in_axes=(None, 0, (0, 0, None, None)))
        theta, _, gmax, steps = solve(fitter, flat(th0), (flat(y0), flat(s0), Ks, B))
        theta, gmax, steps = theta.reshape(*lead, -1), gmax.reshape(lead), steps.reshape(lead)
    return _finish(fitter, valid, started, y0, s0, Ks, B, theta, gmax, steps)


# -- compacted batches (concrete inputs, no spatial coupling) ---------------------------------


@partial(jax.jit, static_argnums=(0,))
def _start_rows(fitter: Fitter, theta0, y, sigma, Ks, B):
    """Loop carries of rows of pixels (rows, ...), whether each would go on, and its
    convergence measure."""

    def one(th, yy, ss):
        start, running, _ = _loop(fitter, (yy, ss, Ks, B))
        c = start(th)
        return c, running(c), c[4]

    return jax.vmap(one)(theta0, y, sigma)


@partial(jax.jit, static_argnums=(0,))
def _advance_rows(fitter: Fitter, carry, y, sigma, Ks, B, k_stop):
    """Rows of pixels run on until each has converged, failed, or taken ``k_stop`` (rows,)
    steps in all; the carries, whether each would go on, and its convergence measure."""

    def one(c, yy, ss, ks):
        _, running, body = _loop(fitter, (yy, ss, Ks, B))
        c = jax.lax.while_loop(lambda c: running(c) & (c[-1] < ks), body, c)
        return c, running(c), c[4]

    return jax.vmap(one)(carry, y, sigma, k_stop)


def _rows_per_call(m: int, chunk: int) -> int:
    """Rows per compiled call for ``m`` pixels: the largest of ``chunk``, ``chunk / 4``,
    ``chunk / 16``, ... (at least 64) whose calls pad the ``m`` rows by at most half, else the
    smallest. Few shapes, since each costs seconds to compile (L-BFGS with a line search)."""
    sizes = [chunk]
    while sizes[-1] % 4 == 0 and sizes[-1] // 4 >= 64:
        sizes.append(sizes[-1] // 4)
    fits = [r for r in sizes if -(-m // r) * r <= 1.5 * m]
    return fits[0] if fits else sizes[-1]


_finish_jit = jax.jit(_finish, static_argnums=(0,))


def _fit_compacted(fitter, y, sigma, K, B, theta0, round_steps: int, chunk: int) -> FitResult:
    """:func:`_fit` without spatial coupling, with the same per-pixel iterations, run in rounds
    of ``round_steps`` steps over the pixels still running, so pixels that converge early stop
    costing (a vmapped ``while_loop`` runs every pixel of its batch as long as its slowest).
    Rows are processed in chunks of at most ``chunk`` pixels (see :func:`_rows_per_call`); once
    the pixels left fit the smallest chunk, one last round runs them to the end."""
    from ._batching import map_rows

    lead = y.shape[:-1]
    flat = lambda a: np.asarray(a).reshape(-1, a.shape[-1])  # noqa: E731
    valid, started, y0, s0, th0 = _prepare(y, sigma, theta0)
    y0, s0 = flat(y0), flat(s0)
    Ks = K * EM_SCALE
    n = y0.shape[0]
    size = partial(_rows_per_call, chunk=chunk)
    carry, on, gmax = map_rows(
        lambda th, yy, ss: _start_rows(fitter, th, yy, ss, Ks, B),
        [flat(th0), y0, s0],
        size(n),
        fills=(0.0, 0.0, 1.0),
    )
    leaves, tree = jax.tree.flatten(carry)
    active = np.flatnonzero(on)  # e.g. padding rows of zeros have converged at the start
    while active.size:
        sub = [a[active] for a in leaves]
        # once the pixels left fit one smallest call, compaction saves nothing: finish them
        last = active.size <= size(1)
        k_stop = np.minimum(sub[-1] + (fitter.max_steps if last else round_steps), fitter.max_steps)
        k_stop = k_stop.astype(np.int32)

        def rows(*a):
            c, on, g = _advance_rows(
                fitter, jax.tree.unflatten(tree, a[:-3]), *a[-3:-1], Ks, B, a[-1]
            )
            return jax.tree.leaves(c), on, g

        new, on, g = map_rows(rows, [*sub, y0[active], s0[active], k_stop], size(active.size))
        for a, b in zip(leaves, new, strict=True):
            a[active] = b
        gmax[active] = g
        active = active[on]
    theta, steps = leaves[0], leaves[-1]
    return _finish_jit(
        fitter,
        valid,
        started,
        y0.reshape(y.shape),
        s0.reshape(y.shape),
        Ks,
        B,
        theta.reshape(*lead, -1),
        gmax.reshape(lead),
        steps.reshape(lead),
    )


def _traced(*arrays) -> bool:
    return any(isinstance(a, jax.core.Tracer) for a in arrays)


def _plain(a: Any, name: str, unit: u.UnitBase = INTENSITY_UNIT) -> Any:
    """``a`` without units: a Quantity converted to ``unit`` (in its own dtype), anything else
    (arrays, tracers, None) as it is."""
    if not isinstance(a, u.Quantity):
        return a
    return to_value(a, unit, name).astype(a.dtype, copy=False)


def fit(
    intensities: jax.Array,
    sigma: jax.Array,
    K: jax.Array,
    fitter: Fitter = Fitter(),
    *,
    em0: jax.Array | None = None,
    basis: Basis | None = None,
    compact: bool | None = None,
    round_steps: int = 16,
) -> FitResult:
    """Fit DEMs to intensities (..., C) with 1-sigma errors ``sigma`` (broadcast to them), both
    in DN s^-1 pix^-1, through the response ``K`` (C, n_T) in DN cm^5 s^-1 pix^-1 (degraded to
    the observation, or undegraded with degradation-corrected intensities).

    Each of these, and ``em0``, may be a plain array in those units or an astropy Quantity
    (converted; ``UnitConversionError`` naming the argument if it cannot be).
    ``em0`` (..., n_T) in cm^-5 starts the fit (e.g. BP's or the network's EM; None: the flat
    DEM fitting the pixel); ``basis`` is required for ``parametrisation="basis"``. Computed in
    the dtype of ``intensities``; jit-able and vmap-able; differentiable (implicitly, see the
    module docstring) with respect to ``intensities``, ``sigma`` and ``K``. Never raises on bad
    pixels: they get a status (see :class:`FitResult`).

    ``compact``: without spatial coupling, run the pixels on the host in rounds of
    ``round_steps`` optimiser steps, each round over the pixels still running, in chunks of at
    most 4096 (the loop carry, optimiser state included, kept between rounds). Each pixel takes
    the same iterations as in one program; the fits can differ by round-off, as they do between
    any two batch shapes. One vmapped ``while_loop`` runs every pixel as long as the slowest of
    its batch: on 10^4 real AIA pixels started from BP (median 32 steps, a few hit
    ``max_steps``) compaction was ~20x faster. ``None`` (default): compact when ``spatial`` is
    0 and no input is a JAX tracer (not under ``jit``, ``vmap`` or ``grad``); ``True`` requires
    that; ``False``: one jitted program.
    """
    intensities, sigma = _plain(intensities, "intensities"), _plain(sigma, "sigma")
    K, em0 = _plain(K, "K", RESPONSE_UNIT), _plain(em0, "em0", u.cm**-5)
    y = jnp.asarray(intensities)
    dt = y.dtype if jnp.issubdtype(y.dtype, jnp.floating) else jnp.result_type(float)
    y = y.astype(dt)
    if y.ndim < 1:
        raise ValueError(f"intensities must have shape (..., C), got {y.shape}")
    try:
        s = jnp.broadcast_to(jnp.asarray(sigma, dt), y.shape)
    except ValueError:
        raise ValueError(
            f"sigma shape {jnp.shape(sigma)} does not broadcast to the intensities' {y.shape}"
        ) from None
    Kd = jnp.asarray(K, dt)
    if Kd.ndim != 2 or Kd.shape[0] != y.shape[-1]:
        raise ValueError(f"K must be (C={y.shape[-1]}, n_T), got {Kd.shape}")
    want = (*y.shape[:-1], Kd.shape[1])
    if em0 is not None and jnp.shape(em0) != want:
        raise ValueError(
            f"em0 must have shape {want} (the intensities' pixels, K's bins), got {jnp.shape(em0)}"
        )
    if fitter.spatial and y.ndim != 3:
        raise ValueError(f"spatial > 0 needs a map (ny, nx, C); intensities are {y.shape}")
    B = None if basis is None else jnp.asarray(basis.B, dt)
    if fitter.parametrisation == "basis" and basis is None:
        raise ValueError('parametrisation="basis" needs basis= (a deepem_jax.Basis)')
    if not (isinstance(round_steps, int) and round_steps > 0):
        raise ValueError(f"round_steps must be a positive int, got {round_steps!r}")
    can = not fitter.spatial and not _traced(intensities, sigma, K, em0)
    if compact and not can:
        raise ValueError("compact=True needs concrete inputs (no jit/vmap/grad) and spatial=0")
    e0 = None if em0 is None else jnp.asarray(em0, dt)
    theta0 = initial_params(fitter, e0, y, s, jax.lax.stop_gradient(Kd), basis)
    if can and compact is not False:
        return _fit_compacted(fitter, y, s, Kd, B, theta0, round_steps, _CHUNK)
    return _fit(fitter, y, s, Kd, B, jax.lax.stop_gradient(theta0))
