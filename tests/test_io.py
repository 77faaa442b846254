"""AIA loading (synthetic six-channel sets with real headers, sunpy's real level-1 171 Å file,
the real 2024-10-04 synoptic files) and DEM cube FITS round trips."""

from __future__ import annotations

import os
import warnings

import astropy.units as u
import numpy as np
import pytest
import sunpy.data.test
import sunpy.map
from _synth import EXPTIME, real_header_and_shape, write_aia_set
from astropy.io import fits
from astropy.wcs import WCS
from conftest import shared_path

from deepem_jax.io import (
    AIAFileError,
    PixelFlag,
    load_aia,
    read_dem_cube,
    write_dem_cube,
)
from deepem_jax.response import AIA_CHANNELS, DEEPEM_LOGT

SIX = [int(c) for c in AIA_CHANNELS.to_value(u.AA)]
FIVE = [131, 171, 193, 211, 335]
SYNOPTIC = ("aia", "synoptic_2024-10-04")


def _assert_same_point(a, b, tol=1e-3 * u.arcsec):
    """Helioprojective points agree in (Tx, Ty); no frame transformation is involved."""
    assert abs(a.Tx - b.Tx) < tol and abs(a.Ty - b.Ty) < tol


def _edit_one(channel, fn):
    """An ``edit`` hook for write_aia_set that applies ``fn(header, counts)`` to one channel."""

    def edit(chan, header, counts):
        return fn(header, counts) if chan == channel else counts

    return edit


# -- good inputs ---------------------------------------------------------------------------


def test_six_channel_files_load_in_canonical_order(tmp_path):
    paths, truth = write_aia_set(tmp_path)
    stack = load_aia(paths[::-1])  # input order does not matter
    assert stack.data.shape == (*truth.shape[:2], 6)
    assert list(stack.channels.to_value(u.AA)) == SIX
    np.testing.assert_allclose(stack.data, truth, rtol=1e-12)
    np.testing.assert_allclose(stack.exptime.to_value(u.s), [EXPTIME[c] for c in SIX])
    np.testing.assert_allclose(stack.counts, truth * stack.exptime.to_value(u.s), rtol=1e-12)
    assert stack.intensity.unit == u.DN / (u.s * u.pix)
    assert stack.n_sample == 1
    assert not stack.flags.any() and not stack.mask.any()
    assert stack.sources == tuple(str(p) for p in paths)


def test_directory_maps_and_subset_order(tmp_path):
    paths, truth = write_aia_set(tmp_path)
    want = [335, 94, 171]
    idx = [SIX.index(c) for c in want]
    from_dir = load_aia(tmp_path, want * u.AA)
    maps = [sunpy.map.Map(paths[i]) for i in (2, 5, 0)]
    from_maps = load_aia(maps, want * u.AA)
    for stack in (from_dir, from_maps):
        assert list(stack.channels.to_value(u.AA)) == want
        np.testing.assert_allclose(stack.data, truth[..., idx], rtol=1e-12)
    assert from_maps.sources == ("map #1", "map #2", "map #0")


def test_rebin_averages_blocks_and_updates_wcs(tmp_path):
    paths, truth = write_aia_set(tmp_path)
    full = load_aia(paths)
    stack = load_aia(paths, rebin=3)  # 128 is not a multiple of 3: trimmed to 126
    assert stack.data.shape == (42, 42, 6)
    assert stack.n_sample == 9
    expect = truth[:126, :126].reshape(42, 3, 42, 3, 6).mean(axis=(1, 3))
    np.testing.assert_allclose(stack.data, expect, rtol=1e-12)
    np.testing.assert_allclose(stack.wcs.wcs.cdelt, 3 * full.wcs.wcs.cdelt)
    # The centre of rebinned pixel (0, 0) is the centre of native pixels (0..2, 0..2).
    _assert_same_point(stack.wcs.pixel_to_world(0, 0), full.wcs.pixel_to_world(1, 1))


def test_cutout_by_skycoord_corners(tmp_path):
    paths, truth = write_aia_set(tmp_path)
    ref = sunpy.map.Map(paths[2])
    bl = ref.pixel_to_world(50 * u.pix, 55 * u.pix)  # on the disk
    tr = ref.pixel_to_world(79 * u.pix, 69 * u.pix)
    stack = load_aia(paths, cutout=(bl, tr))
    sub = ref.submap(bl, top_right=tr)
    assert stack.data.shape == (*sub.data.shape, 6) == (15, 30, 6)
    np.testing.assert_allclose(stack.data, truth[55:70, 50:80], rtol=1e-12)
    _assert_same_point(stack.wcs.pixel_to_world(0, 0), bl)
    # Off-disk corners in the image's helioprojective frame work too.
    corner = ref.pixel_to_world(2 * u.pix, 3 * u.pix)
    off = load_aia(paths, cutout=(corner, ref.pixel_to_world(11 * u.pix, 7 * u.pix)))
    np.testing.assert_allclose(off.data, truth[3:8, 2:12], rtol=1e-12)
    with pytest.raises(TypeError, match=r"SkyCoord"):
        load_aia(paths, cutout=([0, 0], [10, 10]))


def test_real_sunpy_level1_file_header_wcs_and_exposure():
    path = sunpy.data.test.get_test_filepath("aia_171_level1.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smap = sunpy.map.Map(path)
        raw = fits.getdata(path).astype(float)
    stack = load_aia(path, [171] * u.AA)
    assert stack.exptime[0] == 2.000191 * u.s
    assert stack.obstime[0].isot == "2011-02-15T00:00:01.340"
    np.testing.assert_allclose(stack.data[..., 0], np.clip(raw, 0, None) / 2.000191)
    assert stack.negative_count[0] == np.count_nonzero(raw < 0) > 0
    np.testing.assert_allclose(stack.wcs.wcs.crval, smap.wcs.wcs.crval)
    np.testing.assert_allclose(stack.wcs.wcs.pc, smap.wcs.wcs.pc)
    m = stack.reference_map()
    assert m.wavelength == 171 * u.AA and m.unit == u.DN / (u.s * u.pix)


def test_data_already_per_second(tmp_path):
    def per_second(header, counts):
        header["BUNIT"] = "DN/s"
        return counts / header["EXPTIME"]

    paths, truth = write_aia_set(tmp_path, edit=_edit_one(193, per_second))
    stack = load_aia(paths)
    np.testing.assert_allclose(stack.data, truth, rtol=1e-12)


def test_real_synoptic_five_channels_one_call():
    folder = shared_path(*SYNOPTIC)
    # The folder also holds the corrupt 94 Å file; it is not requested, so it is not read.
    stack = load_aia(folder, FIVE * u.AA, rebin=8)
    assert stack.data.shape == (128, 128, 5) and stack.n_sample == 64
    np.testing.assert_allclose(
        stack.exptime.to_value(u.s), [2.901, 2.000, 2.000, 2.901, 2.901], atol=1e-3
    )
    assert stack.obstime[0].isot.startswith("2024-10-04T16:17:44")
    assert (stack.obstime.max() - stack.obstime.min()) < 15 * u.s
    assert np.all(np.isfinite(stack.data)) and np.all(stack.data >= 0)
    # The disk-centre median 171 Å intensity is ~112 DN / 2 s (README) before rebinning.
    assert 30 < np.median(stack.data[..., 1]) < 60
    assert stack.wcs.wcs.ctype[0] == "HPLN-TAN"
    np.testing.assert_allclose(stack.wcs.wcs.cdelt, 8 * 2.4 / 3600, rtol=1e-6)


# -- bad inputs ----------------------------------------------------------------------------


def test_real_corrupt_94_file_is_reported():
    folder = shared_path(*SYNOPTIC)
    with pytest.raises(AIAFileError, match=r"AIAsynoptic0094_CORRUPT.fits"):
        load_aia(folder)  # all six channels: the 94 Å data must be decoded, and cannot be
    with pytest.raises(AIAFileError, match=r"AIAsynoptic0094_CORRUPT.fits"):
        load_aia(folder / "AIAsynoptic0094_CORRUPT.fits", [94] * u.AA)


def test_truncated_fits_is_reported(tmp_path):
    paths, _ = write_aia_set(tmp_path)
    blob = paths[3].read_bytes()
    paths[3].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(AIAFileError, match=paths[3].name):
        load_aia(paths)


def test_truncated_compressed_real_file_is_reported(tmp_path):
    src = shared_path(*SYNOPTIC, "AIAsynoptic0171.fits")
    bad = tmp_path / "AIAsynoptic0171.fits"
    bad.write_bytes(src.read_bytes()[:700_000])  # cut inside the compressed image HDU
    with pytest.raises(AIAFileError, match=r"AIAsynoptic0171.fits"):
        load_aia(bad, [171] * u.AA)


def test_not_a_fits_file(tmp_path):
    bad = tmp_path / "notes.fits"
    bad.write_text("not a FITS file " * 200)
    with pytest.raises(AIAFileError, match=r"notes.fits"):
        load_aia(bad, [171] * u.AA)


def test_nan_and_inf_pixels_are_flagged(tmp_path):
    def spoil(header, counts):
        counts[5, 7] = np.nan
        counts[9, 1] = np.inf
        return counts

    paths, truth = write_aia_set(tmp_path, edit=_edit_one(211, spoil))
    stack = load_aia(paths)
    c = SIX.index(211)
    assert np.isnan(stack.data[5, 7, c]) and np.isnan(stack.data[9, 1, c])
    assert stack.flags[5, 7, c] & PixelFlag.NONFINITE
    assert list(stack.nonfinite_count) == [0, 0, 0, 0, 2, 0]
    assert stack.mask.sum() == 2 and stack.mask[5, 7] and stack.mask[9, 1]
    # Other pixels are untouched; rebinning propagates NaN to the whole block.
    np.testing.assert_allclose(stack.data[0, 0], truth[0, 0], rtol=1e-12)
    binned = load_aia(paths, rebin=2)
    assert np.isnan(binned.data[2, 3, c]) and binned.nonfinite_count[c] == 2


def test_negative_pixels_are_clipped_and_counted(tmp_path):
    def negative(header, counts):
        counts[:3, :4] = -2.5
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(94, negative))
    stack = load_aia(paths)
    assert np.all(stack.data[:3, :4, 0] == 0.0)
    assert list(stack.negative_count) == [12, 0, 0, 0, 0, 0]
    assert np.all(stack.flags[:3, :4, 0] == PixelFlag.NEGATIVE)
    assert not stack.mask.any()  # clipped pixels are usable, only counted


def test_saturated_pixels_are_flagged(tmp_path):
    def saturate(header, counts):
        counts[40, 41] = 16383.0
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(171, saturate))
    stack = load_aia(paths, rebin=2)
    assert list(stack.saturated_count) == [0, 0, 1, 0, 0, 0]
    assert stack.flags[20, 20, 2] & PixelFlag.SATURATED and stack.mask[20, 20]
    assert load_aia(paths, saturation_level=20000 * u.DN).saturated_count.sum() == 0


@pytest.mark.parametrize("value", [0.0, -1.0, None])
def test_bad_exptime_names_the_file(tmp_path, value):
    def bad_exptime(header, counts):
        if value is None:
            del header["EXPTIME"]
        else:
            header["EXPTIME"] = value
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(335, bad_exptime))
    with pytest.raises(AIAFileError, match=r"aia_lev1_335a.fits: .*EXPTIME"):
        load_aia(paths)


def test_missing_channel(tmp_path):
    paths, _ = write_aia_set(tmp_path, [131, 171, 193, 211, 335])
    with pytest.raises(ValueError, match=r"\[94\] Å missing"):
        load_aia(paths)


def test_duplicated_channel(tmp_path):
    def as_171(header, counts):
        header["WAVELNTH"] = 171
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(193, as_171))
    with pytest.raises(ValueError, match=r"171 Å given twice.*aia_lev1_171a.*aia_lev1_193a"):
        load_aia(paths)


def test_non_aia_and_non_euv_channels(tmp_path):
    def uv(header, counts):
        header["WAVELNTH"] = 1600
        return counts

    def other_instrument(header, counts):
        header["TELESCOP"] = "SOHO"
        header["INSTRUME"] = "EIT"
        return counts

    (tmp_path / "a").mkdir()
    paths, _ = write_aia_set(tmp_path / "a", edit=_edit_one(94, uv))
    with pytest.raises(ValueError, match=r"aia_lev1_94a.fits: channel 1600 Å is not an AIA EUV"):
        load_aia(paths)
    (tmp_path / "b").mkdir()
    paths, _ = write_aia_set(tmp_path / "b", edit=_edit_one(94, other_instrument))
    with pytest.raises(ValueError, match=r"aia_lev1_94a.fits: not an SDO/AIA image"):
        load_aia(paths)
    with pytest.raises(ValueError, match=r"\[1600\] Å are not AIA EUV"):
        load_aia(paths, [171, 1600] * u.AA)
    with pytest.raises(ValueError, match=r"duplicate channels"):
        load_aia(paths, [171, 171] * u.AA)


def test_unrequested_explicit_file_is_an_error(tmp_path):
    paths, _ = write_aia_set(tmp_path)
    with pytest.raises(ValueError, match=r"aia_lev1_94a.fits: channel 94 Å was not requested"):
        load_aia(paths, FIVE * u.AA)


def test_mismatched_shapes(tmp_path):
    paths, _ = write_aia_set(tmp_path, edit=_edit_one(131, lambda h, c: c[:, :100]))
    with pytest.raises(ValueError, match=r"aia_lev1_131a.fits: image shape"):
        load_aia(paths)


def test_mismatched_pointing(tmp_path):
    def shift(header, counts):
        header["CRPIX1"] += 5.0
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(211, shift))
    with pytest.raises(ValueError, match=r"aia_lev1_211a.fits: pointing differs .* 5 pixels"):
        load_aia(paths)


def test_times_too_far_apart(tmp_path):
    paths, _ = write_aia_set(tmp_path, time_step=20 * u.s)  # spans 100 s
    with pytest.raises(ValueError, match=r"span 100\.0 s"):
        load_aia(paths)
    assert load_aia(paths, time_tolerance=2 * u.min).data.shape[-1] == 6


def test_wrong_units_at_the_boundary(tmp_path):
    paths, _ = write_aia_set(tmp_path, [171])
    with pytest.raises(u.UnitsError):
        load_aia(paths, [171] * u.s)
    with pytest.raises(u.UnitsError):
        load_aia(paths, [171] * u.AA, time_tolerance=60 * u.m)
    with pytest.raises(TypeError):
        load_aia(paths, [171])  # a bare list has no unit
    with pytest.raises(ValueError, match=r"rebin"):
        load_aia(paths, [171] * u.AA, rebin=0)


def test_missing_input_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing.fits"):
        load_aia(tmp_path / "nothing.fits")
    with pytest.raises(FileNotFoundError, match=r"no FITS files"):
        load_aia(tmp_path)


# -- DEM cubes -----------------------------------------------------------------------------


@pytest.fixture
def cube(tmp_path):
    paths, _ = write_aia_set(tmp_path, [171])
    stack = load_aia(paths, [171] * u.AA, rebin=4)
    rng = np.random.default_rng(0)
    em = rng.uniform(0, 1e28, size=(32, 32, DEEPEM_LOGT.size)) * u.cm**-5
    return stack, em


def test_dem_cube_round_trip(tmp_path, cube):
    stack, em = cube
    status = np.arange(32 * 32, dtype=np.int16).reshape(32, 32) % 4
    chi2 = np.linspace(0, 3, 32 * 32).reshape(32, 32) * u.dimensionless_unscaled
    t_em = np.full((32, 32), 2e6) * u.K
    path = write_dem_cube(
        tmp_path / "dem.fits",
        em,
        DEEPEM_LOGT,
        stack.wcs,
        extras={"status": status, "chi2": chi2, "t_em": t_em},
        meta={"RESPNAME": "demregpy"},
    )
    back = read_dem_cube(path)
    assert back.em.unit == u.cm**-5
    np.testing.assert_array_equal(back.em.value, em.value)
    np.testing.assert_allclose(back.logt, DEEPEM_LOGT, atol=1e-12)
    np.testing.assert_array_equal(back.extras["status"], status)
    np.testing.assert_array_equal(back.extras["chi2"], chi2.value)
    assert back.extras["t_em"].unit == u.K and back.extras["t_em"][0, 0] == 2e6 * u.K
    assert back.header["RESPNAME"] == "demregpy"
    _assert_same_point(back.celestial_wcs.pixel_to_world(3, 4), stack.wcs.pixel_to_world(3, 4))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary left

    # Loadable by plain astropy as a 3-D WCS, and as an NDCube.
    header = fits.getheader(path)
    assert header["CTYPE3"] == "LOGT" and header["BUNIT"] == "cm-5"
    w = WCS(header)
    assert w.naxis == 3 and w.pixel_shape == (32, 32, DEEPEM_LOGT.size)
    assert w.sub([3]).pixel_to_world_values(17) == pytest.approx(7.2)
    ndc = back.to_ndcube()
    assert ndc.data.shape == (DEEPEM_LOGT.size, 32, 32) and ndc.unit == u.cm**-5
    np.testing.assert_array_equal(ndc.data[:, 5, 6], em.value[5, 6])


def test_dem_cube_refuses_overwrite(tmp_path, cube):
    stack, em = cube
    path = write_dem_cube(tmp_path / "dem.fits", em, DEEPEM_LOGT, stack.wcs)
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        write_dem_cube(path, em, DEEPEM_LOGT, stack.wcs)
    write_dem_cube(path, 2 * em, DEEPEM_LOGT, stack.wcs, overwrite=True)
    np.testing.assert_array_equal(read_dem_cube(path).em.value, 2 * em.value)


def test_dem_cube_bad_inputs(tmp_path, cube):
    stack, em = cube
    out = tmp_path / "dem.fits"
    with pytest.raises(u.UnitsError):
        write_dem_cube(out, em.value * u.DN, DEEPEM_LOGT, stack.wcs)
    with pytest.raises(ValueError, match=r"uniformly spaced"):
        write_dem_cube(out, em, np.r_[DEEPEM_LOGT[:-1], 7.5], stack.wcs)
    with pytest.raises(ValueError, match=r"temperature bins"):
        write_dem_cube(out, em[..., :-1], DEEPEM_LOGT, stack.wcs)
    with pytest.raises(ValueError, match=r"wcs describes"):
        write_dem_cube(out, em[:16], DEEPEM_LOGT, stack.wcs)
    with pytest.raises(ValueError, match=r"extra map 'chi2' has shape"):
        write_dem_cube(out, em, DEEPEM_LOGT, stack.wcs, extras={"chi2": np.zeros(3)})
    with pytest.raises(TypeError, match=r"celestial"):
        write_dem_cube(out, em, DEEPEM_LOGT, WCS(naxis=3))
    assert not out.exists() and not list(tmp_path.glob(".dem.fits*"))
    header, _ = real_header_and_shape()
    fits.PrimaryHDU(np.zeros((2, 2)), header=header).writeto(tmp_path / "img.fits")
    with pytest.raises(ValueError, match=r"not a DEM cube"):
        read_dem_cube(tmp_path / "img.fits")
