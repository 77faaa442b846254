"""DEM uncertainties: coverage of the truth on synthetic Gaussian DEMs, Monte Carlo statistics
against numpy on known replicates, and the FITS round trip of invert(..., uncertainties=N)."""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest

import deepem_jax as dj
from deepem_jax import dem_errors as E
from deepem_jax import fit as F
from deepem_jax.forward import gaussian_dem, noisy_observation
from deepem_jax.uncertainty import sigma_values

CHANNELS = [94, 131, 171, 193, 211, 335]


def test_laplace_interval_covers_the_truth(x64):
    """Estimator: the fit with Fitter(tikhonov2=1.0) of one noisy AIA observation (photon and
    read noise, 2 s, sigma from the AIA error model) per Gaussian DEM (600 DEMs: total EM
    1e27--1e28 cm^-5, peak log T 6.0--6.4, width 0.15--0.3); interval: its total EM and mean
    log T +- the Laplace 1-sigma. Measured over seeds 1 and 2: total EM 70.2 / 71.3 %, mean
    log T 71.3 / 75.0 % (the Laplace estimate over-covers mean log T slightly)."""
    resp = dj.default_response().regrid(dj.DEEPEM_LOGT).select(np.array(CHANNELS) * u.AA)
    K, lt = np.asarray(resp.K), np.asarray(dj.DEEPEM_LOGT)
    rng = np.random.default_rng(1)
    n = 600
    em = gaussian_dem(
        lt, 10 ** rng.uniform(27, 28, n), rng.uniform(6.0, 6.4, n), rng.uniform(0.15, 0.3, n)
    )
    y = noisy_observation(em @ K.T, 2.0, CHANNELS, rng)
    s = sigma_values(y, 2.0, CHANNELS)
    fitter = F.Fitter(tikhonov2=1.0)
    res = F.fit(y, s, K, fitter)
    err = E.laplace(res, y, s, K, fitter, lt)
    p = np.asarray(res.em)
    cover_tot = np.mean(np.abs(p.sum(-1) - em.sum(-1)) <= err.total_em)
    mean = lambda e: (e * lt).sum(-1) / e.sum(-1)  # noqa: E731
    cover_lt = np.mean(np.abs(mean(p) - mean(em)) <= err.logt)
    assert 0.63 <= cover_tot <= 0.73
    assert 0.63 <= cover_lt <= 0.78
    # demregpy's horizontal error: at least one bin (0.1), finite where there is an EM
    assert np.all(err.logt_resolution >= 0.1 - 1e-9) and np.all(np.isfinite(err.em))


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
    assert list(err.n) == [50, 50] and err.logt_resolution is None
    with pytest.raises(ValueError, match="n >= 2"):
        E.monte_carlo(lambda yy: yy @ A, y, s, lt, 1, rng)


@pytest.mark.parametrize("method", ["bp", "net", "fit"])
def test_invert_uncertainties_in_fits(tmp_path, method):
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
