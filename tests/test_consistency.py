"""The data-consistency projection, against scipy's SLSQP on the same convex problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import Bounds, minimize

from deepem_jax.bp import bounds
from deepem_jax.consistency import project_to_band
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.uncertainty import sigma_values

EXPTIME = np.array([2.9, 2.9, 2.0, 2.0, 2.9, 2.9])


def _case(n: int, seed: int):
    """Noisy six-channel data of prior DEMs, their band (tolfac 1.4), and a perturbed EM
    (true EM times a log-normal factor per bin) as the estimate to project."""
    rng = np.random.default_rng(seed)
    resp = default_response().regrid(DEEPEM_LOGT)
    K = np.asarray(resp.K, np.float64)
    em = random_dems(DEEPEM_LOGT, n, rng)
    y = noisy_observation(np.asarray(forward(K, em)), EXPTIME, resp.channels, rng)
    sig = sigma_values(y, EXPTIME, resp.wavelength)
    lo, hi = (np.asarray(b, np.float64) for b in bounds(y, sig, 1.4))
    x0 = em * np.exp(0.4 * rng.standard_normal(em.shape))
    return K, lo, hi, x0


def _reference(K, lo, hi, x0):
    """min sum (x - x0)^2 / (2 x0) s.t. lo <= K x <= hi, x >= 0 by scipy's SLSQP (an active-set
    method, exact on this quadratic program; in O(1) units: x / sum(x0), each channel divided by
    its upper edge)."""
    s = x0.sum()
    k = K * s / hi[:, None]
    p = x0 / s
    res = minimize(
        lambda z: 0.5 * np.sum((z - p) ** 2 / p),
        p,
        jac=lambda z: (z - p) / p,
        constraints=[
            {"type": "ineq", "fun": lambda z: k @ z - lo / hi, "jac": lambda z: k},
            {"type": "ineq", "fun": lambda z: 1.0 - k @ z, "jac": lambda z: -k},
        ],
        bounds=Bounds(0.0, np.inf),
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    r = k @ res.x
    if not res.success or np.any(r < lo / hi - 1e-9) or np.any(r > 1.0 + 1e-9):
        return None  # the reference did not converge on this pixel
    return res.x * s


def test_projection_matches_scipy(x64):
    K, lo, hi, x0 = _case(400, 1)
    res = project_to_band(jnp.asarray(x0), jnp.asarray(K), lo, hi, n_iter=30)
    em, in_band, changed = (np.asarray(a) for a in res)
    assert em.dtype == np.float64
    r = em @ K.T
    assert np.array_equal(in_band, np.all((r >= lo) & (r <= hi), -1))  # flag = independent check
    moved = np.flatnonzero(changed & in_band)
    assert moved.size > 100 and in_band.mean() > 0.85, (moved.size, in_band.mean())
    w = hi - lo
    lo_m, hi_m = lo + 1e-3 * w, hi - 1e-3 * w
    compared, closest = 0, 0
    for i in moved[:40]:
        ref = _reference(K, lo_m[i], hi_m[i], x0[i])
        if ref is None:
            continue
        compared += 1
        assert np.all(em[i] >= 0)
        obj = [0.5 * np.sum((x - x0[i]) ** 2 / x0[i]) for x in (em[i], ref)]
        # the same point (the problem is strictly convex) unless the steps stalled short of it
        if obj[0] <= obj[1] * (1 + 1e-7):
            tol = 1e-4 * w[i]  # a tenth of the margin
            assert np.all(r[i] >= lo_m[i] - tol) and np.all(r[i] <= hi_m[i] + tol)
            np.testing.assert_allclose(em[i], ref, rtol=0, atol=1e-4 * ref.sum())
            closest += 1
    assert compared >= 25 and closest >= 0.9 * compared, (compared, closest)


def test_pixels_inside_the_band_are_unchanged():
    K, lo, hi, _ = _case(50, 2)
    mid = 0.5 * (lo + hi)
    # an EM whose resynthesis is the band centre: the least-norm solution, made non-negative
    # by construction (only pixels where it is non-negative are used)
    x = np.linalg.lstsq(K, mid.T, rcond=None)[0].T
    keep = np.all(x > 0, -1) & np.all(np.abs(x @ K.T - mid) < 0.01 * (hi - lo), -1)
    assert keep.sum() > 3
    x = x[keep].astype(np.float32)
    res = project_to_band(jnp.asarray(x), jnp.asarray(K, jnp.float32), lo[keep], hi[keep])
    assert res.em.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(res.em), x)
    assert np.all(np.asarray(res.in_band)) and not np.any(np.asarray(res.changed))


def test_float32_reaches_the_band_and_moves_only_outliers():
    K, lo, hi, x0 = _case(3000, 3)
    res = project_to_band(jnp.asarray(x0, jnp.float32), jnp.asarray(K, jnp.float32), lo, hi)
    r0 = x0 @ K.T
    outside = ~np.all((r0 >= lo) & (r0 <= hi), -1)
    assert outside.mean() > 0.5
    in_band = np.asarray(res.in_band)
    r = np.asarray(res.em, np.float64) @ K.T
    np.testing.assert_array_equal(in_band, np.all((r >= lo) & (r <= hi), -1))
    assert in_band.mean() > 0.75, in_band.mean()


def test_bad_inputs_are_flagged_not_zeroed():
    K, lo, hi, x0 = _case(4, 4)
    x0[0, 3] = np.nan
    hi[1, 2] = np.nan
    hi[2] = 0.0
    res = project_to_band(jnp.asarray(x0, jnp.float32), jnp.asarray(K, jnp.float32), lo, hi)
    em = np.asarray(res.em)
    assert np.all(np.isnan(em[:3])) and np.all(np.isfinite(em[3]))
    assert not np.any(np.asarray(res.in_band)[:3])
    with pytest.raises(ValueError, match="margin"):
        project_to_band(jnp.asarray(x0), jnp.asarray(K), lo, hi, margin=0.5)


@pytest.mark.slow
def test_gradient_is_finite_and_matches_finite_differences(x64):
    K, lo, hi, x0 = _case(50, 5)
    i = int(np.flatnonzero(~np.all(((x0 @ K.T) >= lo) & ((x0 @ K.T) <= hi), -1))[0])
    Kj, lo_i, hi_i = jnp.asarray(K), jnp.asarray(lo[i]), jnp.asarray(hi[i])

    def total(scale):
        return jnp.sum(project_to_band(x0[i] * scale, Kj, lo_i, hi_i, n_iter=30).em) / 1e26

    g = jax.grad(total)(1.0)
    fd = (total(1.0 + 1e-6) - total(1.0 - 1e-6)) / 2e-6
    assert np.isfinite(g)
    np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-6)
