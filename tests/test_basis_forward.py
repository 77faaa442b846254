"""Basis and forward model on hand-computed cases."""

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax.basis import cheung_basis, dictionary
from deepem_jax.forward import (
    forward,
    gaussian_dem,
    multi_gaussian_dem,
    noisy_observation,
    predict_intensities,
    random_dems,
)
from deepem_jax.response import DEEPEM_LOGT, TemperatureResponse, default_response
from deepem_jax.uncertainty import V3_ERROR_TABLE


def test_basis_by_hand():
    lt = [6.0, 6.1, 6.2, 6.3]
    b = cheung_basis(lt, widths=[0.0, 0.1])
    assert b.B.shape == (8, 4)
    np.testing.assert_array_equal(b.B[:4], np.eye(4))
    e1 = np.exp(-1.0)  # one step away; two steps: exp(-4) = 0.018 < 0.04 -> 0
    np.testing.assert_allclose(b.B[4], [1.0, e1, 0.0, 0.0])
    np.testing.assert_allclose(b.B[5], [e1, 1.0, e1, 0.0])
    np.testing.assert_array_equal(b.widths, [0, 0, 0, 0, 0.1, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(b.centers[4:], lt)
    # width 0.2: two steps away exp(-1) kept, three steps exp(-2.25)=0.105 kept
    b2 = cheung_basis(lt, widths=[0.2])
    np.testing.assert_allclose(b2.B[0], np.exp(-((np.array([0, 1, 2, 3]) / 2.0) ** 2)))


def test_default_basis_size_and_cutoff():
    b = cheung_basis(DEEPEM_LOGT)
    assert b.n_basis == 54
    assert np.all((b.B == 0) | (b.B >= 0.04))


def test_dictionary_and_em_by_hand():
    K = np.array([[1e-26, 2e-26], [3e-26, 0.0]])
    r = TemperatureResponse(K, (171, 193), (6.0, 6.1), "toy")
    b = cheung_basis([6.0, 6.1], widths=[0.0, 0.1])
    D = np.asarray(dictionary(r, b))
    e1 = np.exp(-1.0)
    # columns: delta(6.0), delta(6.1), gauss(6.0)=[1,e1], gauss(6.1)=[e1,1]; times 1e26
    np.testing.assert_allclose(D, [[1, 2, 1 + 2 * e1, e1 + 2], [3, 0, 3, 3 * e1]], rtol=1e-12)
    x = np.array([1.0, 0.0, 2.0, 0.0])
    np.testing.assert_allclose(np.asarray(b.em(x)), [3e26, 2 * e1 * 1e26], rtol=1e-6)
    # D @ x equals the forward model of the EM
    np.testing.assert_allclose(D @ x, np.asarray(forward(K, np.asarray(b.em(x)))), rtol=1e-5)
    with pytest.raises(ValueError, match="regrid"):
        dictionary(default_response(), b)


def test_forward_by_hand_and_batched():
    K = np.array([[1e-26, 2e-26], [3e-26, 4e-26]])
    em = np.array([1e26, 2e26])
    np.testing.assert_allclose(np.asarray(forward(K, em)), [5.0, 11.0], rtol=1e-6)
    img = np.broadcast_to(em, (3, 4, 2))
    out = np.asarray(forward(K, img))
    assert out.shape == (3, 4, 2)
    np.testing.assert_allclose(out[2, 3], [5.0, 11.0], rtol=1e-6)
    with pytest.raises(ValueError, match="temperature bins"):
        forward(K, np.ones(3))
    g = jax.grad(lambda e: forward(jnp.asarray(K), e).sum())(jnp.asarray(em))
    np.testing.assert_allclose(np.asarray(g), [4e-26, 6e-26], rtol=1e-6)


def test_forward_float32_no_underflow():
    r = default_response().regrid(DEEPEM_LOGT)
    em = gaussian_dem(DEEPEM_LOGT, 1e28, 6.2, 0.1)
    y32 = np.asarray(forward(jnp.asarray(r.K, jnp.float32), jnp.asarray(em, jnp.float32)))
    y64 = np.asarray(r.K) @ em
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-5)


def test_predict_intensities_units():
    r = default_response().regrid(DEEPEM_LOGT)
    em = gaussian_dem(DEEPEM_LOGT, 1e27, 6.0, 0.15) * u.cm**-5
    y = predict_intensities(r, em)
    assert y.unit == u.DN / (u.s * u.pix)
    with pytest.raises(u.UnitsError):
        predict_intensities(r, em.value * u.m)


def test_gaussian_dems():
    d = gaussian_dem(DEEPEM_LOGT, [1e27, 1e28], [6.0, 6.5], 0.1)
    assert d.shape == (2, 18)
    np.testing.assert_allclose(d.sum(-1), [1e27, 1e28])
    assert DEEPEM_LOGT[np.argmax(d[1])] == pytest.approx(6.5)
    m = multi_gaussian_dem(DEEPEM_LOGT, np.array([1e27, 2e27]), np.array([5.8, 6.8]), [0.1, 0.1])
    np.testing.assert_allclose(m.sum(), 3e27)
    with pytest.raises(ValueError, match="positive"):
        gaussian_dem(DEEPEM_LOGT, 1e27, 6.0, 0.0)
    rnd = random_dems(DEEPEM_LOGT, 500, np.random.default_rng(0))
    assert rnd.shape == (500, 18) and np.all(rnd >= 0)
    tot = rnd.sum(-1)
    assert tot.min() >= 1e26 * 0.999 and tot.max() <= 1e29 * 1.001


def test_noise_statistics_match_error_model():
    """Sample variance of the noisy observation equals the shot + read variance (analytic)."""
    rng = np.random.default_rng(1)
    y = np.full((40000, 2), [50.0, 400.0])  # DN/s
    t = 2.0
    obs = noisy_observation(y, t, [94, 171], rng)
    tab = V3_ERROR_TABLE.select([94, 171] * u.AA)
    var = (np.asarray(tab.dn_per_photon) * y[0] * t + np.asarray(tab.read_noise) ** 2) / t**2
    np.testing.assert_allclose(obs.mean(0), y[0], rtol=5e-3)
    np.testing.assert_allclose(obs.var(0), var, rtol=0.05)
    with pytest.raises(ValueError):
        noisy_observation(y, 0.0, [94, 171], rng)


def test_synthetic_scene():
    from deepem_jax.forward import synthetic_scene

    r = default_response().regrid(DEEPEM_LOGT)
    em, y = synthetic_scene(r, (24, 32), np.random.default_rng(3), noise=False)
    assert em.shape == (24, 32, 18) and y.shape == (24, 32, 6)
    assert np.all(em >= 0)
    np.testing.assert_allclose(y, np.einsum("ct,yxt->yxc", np.asarray(r.K), em), rtol=1e-5)
    tot = em.sum(-1)
    assert 1e26 <= tot.min() and tot.max() <= 3.5e28
    _, y_noisy = synthetic_scene(r, (24, 32), np.random.default_rng(3), noise=True)
    assert not np.allclose(y_noisy, y)
