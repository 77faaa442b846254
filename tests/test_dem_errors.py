"""DEM uncertainties: coverage of the truth on synthetic Gaussian DEMs (Laplace and Monte
Carlo), Monte Carlo statistics against numpy on known replicates, and the FITS round trip of
invert(..., uncertainties=N)."""

from __future__ import annotations

import dataclasses

import astropy.units as u
import jax
import numpy as np
import pytest

import deepem_jax as dj
from deepem_jax import dem_errors as E
from deepem_jax import fit as F
from deepem_jax.forward import gaussian_dem, noisy_observation
from deepem_jax.uncertainty import sigma_values

CHANNELS = [94, 131, 171, 193, 211, 335]


def _gaussian_dems(n, rng):
    """``n`` Gaussian DEMs (total EM 1e27--1e28 cm^-5, peak log T 6.0--6.4, width 0.15--0.3),
    one noisy AIA observation of each (photon and read noise, 2 s) and its AIA sigma; with the
    response K (C, n_T) and the log T grid."""
    resp = dj.default_response().regrid(dj.DEEPEM_LOGT).select(np.array(CHANNELS) * u.AA)
    K, lt = np.asarray(resp.K), np.asarray(dj.DEEPEM_LOGT)
    em = gaussian_dem(
        lt, 10 ** rng.uniform(27, 28, n), rng.uniform(6.0, 6.4, n), rng.uniform(0.15, 0.3, n)
    )
    y = noisy_observation(em @ K.T, 2.0, CHANNELS, rng)
    return em, y, sigma_values(y, 2.0, CHANNELS), K, lt


def _coverage(est, truth, err, lt, ok=Ellipsis):
    """Fractions of the pixels ``ok`` whose true total EM and mean log T lie within the
    1-sigma ``err`` (DEMErrors) of their centres: the Monte Carlo means when ``err`` has
    them, else the estimate ``est``."""
    mean = lambda e: (e * lt).sum(-1) / e.sum(-1)  # noqa: E731
    c_tot = est.sum(-1) if err.total_em_mean is None else err.total_em_mean
    c_lt = mean(est) if err.logt_mean is None else err.logt_mean
    tot = np.abs(c_tot - truth.sum(-1)) <= err.total_em
    mlt = np.abs(c_lt - mean(truth)) <= err.logt
    return np.mean(tot[ok]), np.mean(mlt[ok])


def test_laplace_interval_covers_the_truth(x64):
    """Estimator: the fit with Fitter(tikhonov2=1.0) of one noisy AIA observation (photon and
    read noise, 2 s, sigma from the AIA error model) per Gaussian DEM (600 DEMs: total EM
    1e27--1e28 cm^-5, peak log T 6.0--6.4, width 0.15--0.3); interval: its total EM and mean
    log T +- the Laplace 1-sigma. Measured over seeds 1 / 2 / 3: total EM 72.3 / 73.2 /
    71.7 %, mean log T 73.5 / 78.0 / 73.2 % (the Laplace estimate over-covers mean log T
    slightly, so its bound stays 63--78 %, not 63--73 %)."""
    em, y, s, K, lt = _gaussian_dems(600, np.random.default_rng(1))
    fitter = F.Fitter(tikhonov2=1.0)
    res = F.fit(y, s, K, fitter)
    err = E.laplace(res, y, s, K, fitter, lt)
    cover_tot, cover_lt = _coverage(np.asarray(res.em), em, err, lt)
    assert 0.63 <= cover_tot <= 0.73
    assert 0.63 <= cover_lt <= 0.78
    # demregpy's horizontal error: at least one bin (0.1), finite where there is an EM
    assert np.all(err.logt_resolution >= 0.1 - 1e-9) and np.all(np.isfinite(err.em))


@pytest.mark.parametrize("parametrisation", ["log", "softplus"])
def test_laplace_in_float32_equals_float64(parametrisation):
    """The Laplace estimate of a float32 fit (EM covariance ~1e52 cm^-10, beyond float32;
    Hessian eigenvalues spanning more than float32 resolves) equals float64's at the same
    fitted parameters."""
    _, y, s, K, lt = _gaussian_dems(24, np.random.default_rng(4))
    fitter = F.Fitter(parametrisation, tikhonov2=1.0)
    with jax.enable_x64(True):
        res = F.fit(y, s, K, fitter)
        ref = E.laplace(res, y, s, K, fitter, lt)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    res32 = dataclasses.replace(res, params=f32(res.params))
    err = E.laplace(res32, f32(y), f32(s), f32(K), fitter, lt)
    ok = np.asarray(res.status) == 0
    assert ok.mean() > 0.9
    for got, want in ((err.total_em, ref.total_em), (err.logt, ref.logt)):
        assert np.all(np.isfinite(got[ok]))
        np.testing.assert_allclose(got[ok], want[ok], rtol=1e-3)
    tol = 1e-3 * ref.em[ok] + 1e-6 * ref.em[ok].max(-1, keepdims=True)
    assert np.all(np.abs(err.em[ok] - ref.em[ok]) <= tol)


def test_monte_carlo_counts_replicates_with_zero_em():
    """A replicate whose EM is zero (e.g. BP's answer to a faint draw) is a finite answer: it
    enters the EM and total-EM statistics; only the mean log T, undefined there, skips it.
    Against numpy over the same replicates."""
    A = np.abs(np.random.default_rng(0).normal(size=(3, 4))) * 1e26
    lt = np.linspace(6.0, 6.3, 4)
    y, s = np.array([[0.2, 0.5, 1.0], [4.0, 5.0, 6.0]]), np.array([0.3, 0.2, 0.3])

    def solve(yy):  # zero EM where the first channel's draw is negative
        return np.where(yy[..., :1] < 0, 0.0, yy @ A)

    err = E.monte_carlo(solve, y, s, lt, 60, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    reps = np.stack([solve(y + s * rng.standard_normal(y.shape)) for _ in range(60)])
    zero = reps.sum(-1) == 0
    assert zero[:, 0].sum() >= 10 and not zero[:, 1].any()
    assert list(err.n) == [60, 60]
    np.testing.assert_allclose(err.em, reps.std(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(err.total_em, reps.sum(-1).std(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(err.total_em_mean, reps.sum(-1).mean(0), rtol=1e-10)
    for i in range(2):
        r = reps[~zero[:, i], i]
        mlt = (r * lt).sum(-1) / r.sum(-1)
        np.testing.assert_allclose(err.logt[i], mlt.std(ddof=1), rtol=1e-8)
        np.testing.assert_allclose(err.logt_mean[i], mlt.mean(), rtol=1e-10)


def test_monte_carlo_statistics_match_numpy():
    """A linear 'method' (EM = y @ A): the Monte Carlo standard deviations equal numpy's over
    the same replicates (same generator), NaN replicates skipped."""
    A = np.abs(np.random.default_rng(0).normal(size=(3, 4))) * 1e26
    lt = np.linspace(6.0, 6.3, 4)
    y = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    s = np.array([0.1, 0.2, 0.3])
    err = E.monte_carlo(lambda yy: yy @ A, y, s, lt, 50, np.random.default_rng(5))
    rng = np.random.default_rng(5)
    reps = np.stack([(y + s * rng.standard_normal(y.shape)) @ A for _ in range(50)])
    np.testing.assert_allclose(err.em, reps.std(0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(err.total_em, reps.sum(-1).std(0, ddof=1), rtol=1e-10)
    mlt = (reps * lt).sum(-1) / reps.sum(-1)
    np.testing.assert_allclose(err.logt, mlt.std(0, ddof=1), rtol=1e-8)
    np.testing.assert_allclose(err.total_em_mean, reps.sum(-1).mean(0), rtol=1e-10)
    np.testing.assert_allclose(err.logt_mean, mlt.mean(0), rtol=1e-10)
    assert list(err.n) == [50, 50] and err.logt_resolution is None
    batched = E.monte_carlo(lambda yy: yy @ A, y, s, lt, 50, np.random.default_rng(5), batched=True)
    np.testing.assert_allclose(batched.em, err.em, rtol=1e-12)
    np.testing.assert_allclose(batched.logt, err.logt, rtol=1e-12)
    with pytest.raises(ValueError, match="n >= 2"):
        E.monte_carlo(lambda yy: yy @ A, y, s, lt, 1, rng)


def test_monte_carlo_interval_covers_the_truth(xla_optimized):
    """Monte Carlo intervals (20 replicates y + sigma N(0, 1), drawn after the observation from
    its generator: replicate mean +- standard deviation) of invert(method="fit") (Fitter(),
    started from BP, as invert runs it) on 1,024 synthetic Gaussian DEMs as in the Laplace
    test. Measured over seeds 1--6: total EM covered in 64.3--66.2 % of the pixels, mean log T
    in 63.5--68.3 % (seed 1, this test: 64.3 % and 68.3 %; with 40 replicates, before fit's
    closed-form moves, 66.7--67.9 % and 66.1--71.8 %). BP's intervals do not cover the truth
    at the nominal rate (its minimum-EM answer is biased low by more than its spread):
    44.2--49.0 % and 57.3--61.9 %."""
    rng = np.random.default_rng(1)
    em, y, s, _, lt = _gaussian_dems(1024, rng)

    def run(method):
        def solve(yy):
            kw = dict(sigma=np.broadcast_to(s, yy.shape), channels=CHANNELS * u.AA)
            return dj.invert(yy, method, degradation=False, **kw).em

        p = solve(y).astype(np.float64)
        err = E.monte_carlo(solve, y, s, lt, 20, rng, batched=True)
        ok = np.all(np.isfinite(p), -1) & (err.n >= 2)
        assert ok.mean() > 0.99
        return _coverage(p, em, err, lt, ok)

    cover_tot, cover_lt = run("fit")
    assert 0.63 <= cover_tot <= 0.73 and 0.63 <= cover_lt <= 0.73
    cover_tot, cover_lt = run("bp")  # measured: 49.0 % and 61.3 %
    assert cover_tot < 0.55 and cover_lt < 0.63


@pytest.mark.parametrize("method", ["bp", "net", "fit"])
def test_invert_uncertainties_in_fits(tmp_path, method, request):
    if method == "fit":  # its time is spent running the fits
        request.getfixturevalue("xla_optimized")
    obs = dj.load_aia(dj.data.sample_observation(), rebin=8)
    res = dj.invert(obs, method, uncertainties=4)
    e = res.errors
    assert e.em.shape == res.em.shape and e.total_em.shape == res.shape
    ok = res.has_em & (e.n >= 2)
    assert ok.mean() > 0.5 and np.all(e.total_em[ok] >= 0)
    path = res.to_fits(tmp_path / "dem.fits")
    cube = dj.read_dem_cube(path)
    np.testing.assert_allclose(
        cube.extras["em_err"].to_value(u.cm**-5), e.em.astype(np.float32), equal_nan=True
    )
    np.testing.assert_allclose(cube.extras["logt_err"], e.logt.astype(np.float32), equal_nan=True)
    assert cube.extras["tem_err"].unit == u.cm**-5
    # the Monte Carlo interval centres
    tem_mean = cube.extras["tem_mean"].to_value(u.cm**-5)
    np.testing.assert_allclose(tem_mean, e.total_em_mean.astype(np.float32), equal_nan=True)
    np.testing.assert_allclose(cube.extras["logt_mean"], e.logt_mean, rtol=1e-6, equal_nan=True)
