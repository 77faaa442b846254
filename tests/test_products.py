"""DEM products by hand; Figure 1 and the summary maps rendered to PNG on a small synthetic
cube, their pixel colours, labels and layout checked in the image."""

import astropy.units as u
import matplotlib.image as mpimg
import numpy as np
import pytest
from astropy.wcs import WCS
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.text import Text

from deepem_jax.products import (
    FAILED_COLOR,
    NO_EM_COLOR,
    OUT_OF_BAND_COLOR,
    dem_maps,
    em_at_logt,
    em_in_range,
    figure1,
    mean_logt,
    total_em,
)

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


def _wcs(ny: int, nx: int) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["HPLN-TAN", "HPLT-TAN"]
    w.wcs.cunit = ["arcsec", "arcsec"]
    w.wcs.cdelt = [2.4, 2.4]
    w.wcs.crpix = [nx / 2, ny / 2]
    w.wcs.crval = [-300.0, 250.0]
    w.wcs.dateobs = "2011-02-15T01:44:00"
    return w


def _drawn(fig):
    """Draw ``fig`` on an Agg canvas (as the PNG was) and return its renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _png_colour(png, ax, x: int, y: int) -> np.ndarray:
    """RGB (0-1) of the saved PNG at the centre of data pixel (x, y) of ``ax`` (drawn)."""
    dx, dy = ax.transData.transform((x, y))
    return png[int(round(png.shape[0] - dy)), int(round(dx)), :3]


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(Text)]


def _inside(fig, renderer, artist) -> bool:
    bb = artist.get_window_extent(renderer)
    return bb.x0 >= 0 and bb.y0 >= 0 and bb.x1 <= fig.bbox.x1 and bb.y1 <= fig.bbox.y1


LONG_TITLE = "flare 2011-02-15 01:44 UTC, AIA level 1.5, rebinned 4x4 " * 3


def test_figure1_colours_labels_and_layout(tmp_path):
    ny, nx = 16, 20
    rng = np.random.default_rng(0)
    aia = rng.uniform(10, 1000, (ny, nx))
    bp = rng.uniform(1e25, 1e27, (ny, nx, 3))
    bp[0:4, 0:4] = 0.0  # no emission: bottom of the scale, not a failure
    net = bp * 1.1
    status = np.zeros((ny, nx), int)
    status[8, 5] = 1
    oob = np.zeros((ny, nx), bool)
    oob[10, 15] = True
    out = tmp_path / "fig1.png"
    fig = figure1(
        aia, bp, status, net, LT, 6.1, _wcs(ny, nx), str(out), LONG_TITLE, net_out_of_band=oob
    )
    png = mpimg.imread(out)
    renderer = _drawn(fig)
    assert png.shape[:2] == (round(fig.bbox.height), round(fig.bbox.width))
    ax_bp, ax_net = fig.axes[1], fig.axes[2]

    failed = _png_colour(png, ax_bp, 5, 8)
    zero = _png_colour(png, ax_bp, 1, 1)
    flagged = _png_colour(png, ax_net, 15, 10)
    np.testing.assert_allclose(failed, to_rgb(FAILED_COLOR), atol=2 / 255)
    np.testing.assert_allclose(flagged, to_rgb(OUT_OF_BAND_COLOR), atol=2 / 255)
    np.testing.assert_allclose(zero, colormaps["inferno"](0.0)[:3], atol=2 / 255)
    assert np.abs(failed - zero).max() > 0.5 and np.abs(flagged - zero).max() > 0.5
    assert np.abs(failed - flagged).max() > 0.3
    # each panel marks only its own flags
    assert np.abs(_png_colour(png, ax_net, 5, 8) - failed).max() > 0.3
    assert np.abs(_png_colour(png, ax_bp, 15, 10) - flagged).max() > 0.3

    lon, lat = fig.axes[0].coords[0], fig.axes[0].coords[1]
    assert lon.get_axislabel() == "Helioprojective Longitude (Solar-X) [arcsec]"
    assert lat.get_axislabel() == "Helioprojective Latitude (Solar-Y) [arcsec]"
    texts = _texts(fig)
    assert not [t for t in texts if "custom:" in t or "[K]" in t]
    assert any("BP infeasible): BP 0.31%" in t for t in texts)  # 1 of 320 pixels
    assert any("outside BP's band (0.31%)" in t for t in texts)
    (suptitle,) = [t for t in fig.texts if t.get_text().startswith("flare")]
    assert _inside(fig, renderer, suptitle) and _inside(fig, renderer, fig.legends[0])
    maps = sum(ax.get_window_extent().width for ax in fig.axes[:3])
    assert maps > 0.75 * fig.bbox.width


def test_figure1_positional_call_without_wcs_and_checks():
    rng = np.random.default_rng(1)
    aia = rng.uniform(10, 1000, (8, 8))
    bp = rng.uniform(1e25, 1e27, (8, 8, 3))
    fig = figure1(aia, bp, np.zeros((8, 8), int), bp, LT, 6.1, None, None, "t")
    assert fig.axes[0].get_xlabel() == "x [pixel]" and fig.axes[0].get_ylabel() == "y [pixel]"
    with pytest.raises(ValueError, match="shapes differ"):
        figure1(aia[:4], bp, np.zeros((8, 8), int), bp, LT, at_logt=6.1)
    with pytest.raises(ValueError, match="net_out_of_band"):
        figure1(aia, bp, np.zeros((8, 8)), bp, LT, 6.1, net_out_of_band=np.zeros((4, 4), bool))
    with pytest.raises(TypeError, match="boolean mask"):
        figure1(aia, bp, np.zeros((8, 8)), bp, LT, 6.1, net_out_of_band=np.zeros((8, 8)))


def test_dem_maps(tmp_path):
    ny, nx = 12, 10
    rng = np.random.default_rng(2)
    em = rng.uniform(1e25, 1e27, (ny, nx, 3))
    em[0:3, 0:3] = 0.0
    status = np.zeros((ny, nx), np.int8)
    status[6, 7] = 2
    out = tmp_path / "maps.png"
    fig = dem_maps(em, LT, status, wcs=_wcs(ny, nx), path=out, title=LONG_TITLE)
    png = mpimg.imread(out)
    renderer = _drawn(fig)
    ax_em, ax_t = fig.axes[0], fig.axes[1]
    np.testing.assert_allclose(_png_colour(png, ax_em, 7, 6), to_rgb(FAILED_COLOR), atol=2 / 255)
    np.testing.assert_allclose(
        _png_colour(png, ax_em, 1, 1), colormaps["inferno"](0.0)[:3], atol=2 / 255
    )
    np.testing.assert_allclose(_png_colour(png, ax_t, 7, 6), to_rgb(FAILED_COLOR), atol=2 / 255)
    np.testing.assert_allclose(_png_colour(png, ax_t, 1, 1), to_rgb(NO_EM_COLOR), atol=2 / 255)
    texts = _texts(fig)
    assert "EM-weighted log$_{10}$(T / K)" in texts
    assert not [t for t in texts if "[K]" in t]
    assert _inside(fig, renderer, fig.legends[0])
    (suptitle,) = [t for t in fig.texts if t.get_text().startswith("flare")]
    assert _inside(fig, renderer, suptitle)
    with pytest.raises(ValueError, match="shapes differ"):
        dem_maps(em, LT, status[:4])
