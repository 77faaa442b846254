"""DEM products by hand, and the Figure-1 layout on a small synthetic cube."""

import astropy.units as u
import numpy as np
import pytest

from deepem_jax.products import em_at_logt, em_in_range, figure1, mean_logt, total_em

LT = [6.0, 6.1, 6.2]


def test_products_by_hand():
    em = np.array([[1e26, 3e26, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(total_em(em).to_value(u.cm**-5), [4e26, 0.0])
    assert total_em(em * u.m**-5).unit == u.cm**-5
    np.testing.assert_allclose(total_em(em * u.m**-5).value, [4e16, 0.0])  # 1 m^-5 = 1e-10 cm^-5
    mt = mean_logt(em, LT)
    assert mt[0] == pytest.approx((6.0 * 1 + 6.1 * 3) / 4)
    assert np.isnan(mt[1])  # no emission: NaN, not 0
    np.testing.assert_allclose(em_in_range(em, LT, 6.05, 6.2).value, [3e26, 0.0])
    np.testing.assert_allclose(em_at_logt(em, LT, 6.1).value, [3e26, 0.0])


def test_products_reject_bad_input():
    em = np.ones((2, 3))
    with pytest.raises(ValueError, match="temperature bins"):
        mean_logt(em, [6.0, 6.1])
    with pytest.raises(ValueError, match="not on the grid"):
        em_at_logt(em, LT, 6.15)
    with pytest.raises(ValueError, match="no bin"):
        em_in_range(em, LT, 7.0, 7.5)
    with pytest.raises(u.UnitConversionError, match="em"):
        total_em(em * u.s)


def test_figure1_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    aia = rng.uniform(10, 1000, (16, 16))
    bp = rng.uniform(1e25, 1e27, (16, 16, 3))
    net = bp * 1.1
    status = np.zeros((16, 16), int)
    status[3, 4] = 1
    out = tmp_path / "fig1.png"
    fig = figure1(aia, bp, status, net, LT, at_logt=6.1, path=str(out))
    assert out.stat().st_size > 10_000
    # the failed BP pixel is masked (drawn black), the others are not
    arr = fig.axes[1].images[0].get_array()
    assert arr.mask[3, 4] and not arr.mask[0, 0]
    with pytest.raises(ValueError, match="shapes differ"):
        figure1(aia[:8], bp, status, net, LT, at_logt=6.1)
