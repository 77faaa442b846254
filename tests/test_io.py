"""AIA loading (synthetic six-channel sets with real headers, sunpy's real level-1 171 Å file,
the real 2024-10-04 synoptic files, the real 2011-02-15 level-1 flare cutouts) and DEM cube
FITS round trips."""

from __future__ import annotations

import gzip
import os
import re
import warnings

import astropy.units as u
import numpy as np
import pytest
import sunpy.data.test
import sunpy.map
from _synth import EXPTIME, real_header_and_shape, write_aia_set
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from conftest import shared_path
from scipy import ndimage

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
FLARE = ("aia", "flare_2011-02-15")


def _synth_binning() -> int:
    """Native pixels per pixel of the synthetic files' header, from the header alone."""
    header, _ = real_header_and_shape()
    return round(header["CDELT1"] / header["IMSCL_MP"]) ** 2


def _flare_files(time: str) -> list:
    """The six real level-1 cutout files of one time ("01-44", ...), ordered as SIX."""
    folder = shared_path(*FLARE)
    return [next(folder.glob(f"*T{time}-*_{c:03d}.fits")) for c in SIX]


def _raw(path) -> tuple[fits.Header, np.ndarray]:
    """Header and data (float64) of a one-HDU file, read with plain astropy. The flare cutouts'
    BLANK card does not apply to their float data; astropy's warning about it is silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            return hdul[0].header, hdul[0].data.astype(np.float64)


def _wcs(header: fits.Header) -> WCS:
    """astropy's WCS of a header, without its notices about cards it completes (MJD-OBS)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return WCS(header)


def _xcorr_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(dy, dx) such that b(p) ~ a(p - d): peak of the windowed FFT cross-correlation of the
    log images, refined by a parabola through the peak and its neighbours on each axis."""
    a, b = (np.log(np.clip(x, 1.0, None)) for x in (a, b))
    a, b = a - a.mean(), b - b.mean()
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    c = np.fft.fftshift(np.real(np.fft.ifft2(np.fft.fft2(b * win) * np.conj(np.fft.fft2(a * win)))))
    iy, ix = np.unravel_index(np.argmax(c), c.shape)
    d = []
    for m, z, p, centre in (
        (c[iy - 1, ix], c[iy, ix], c[iy + 1, ix], iy - c.shape[0] // 2),
        (c[iy, ix - 1], c[iy, ix], c[iy, ix + 1], ix - c.shape[1] // 2),
    ):
        d.append(centre + 0.5 * (m - p) / (m - 2 * z + p))
    return np.array(d)


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
    assert stack.n_sample == _synth_binning()
    assert not stack.flags.any() and not stack.mask.any()
    assert stack.sources == tuple(str(p) for p in paths)
    assert stack.resampled == ()


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
    assert stack.n_sample == 9 * _synth_binning()
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
    # the 4096^2 frame binned 32x32: CDELT1 / IMSCL_MP = 32, TOTVALS = 4096^2 = 128^2 * 1024
    assert stack.n_sample == 1024
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
    assert stack.data.shape == (128, 128, 5) and stack.n_sample == 16 * 64
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


def test_masked_map_pixels_are_flagged(tmp_path):
    """A Map's mask marks pixels that are not data: they are flagged NONFINITE and NaN, like
    NaN pixels in a file, never inverted as the values under the mask."""
    paths, truth = write_aia_set(tmp_path)
    maps = [sunpy.map.Map(p) for p in paths]
    c = SIX.index(193)
    mask = np.zeros(maps[c].data.shape, bool)
    mask[3:5, 6] = True
    maps[c] = sunpy.map.Map(maps[c].data, maps[c].meta, mask=mask)
    stack = load_aia(maps)
    assert np.all(np.isnan(stack.data[3:5, 6, c]))
    assert np.all(stack.flags[3:5, 6, c] & PixelFlag.NONFINITE)
    assert stack.mask.sum() == 2 and list(stack.nonfinite_count) == [0, 0, 0, 2, 0, 0]
    np.testing.assert_allclose(stack.data[0, 0], truth[0, 0], rtol=1e-12)


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


def test_every_saturated_plateau_of_the_real_flare_is_flagged():
    """A saturated region of a level-1 image is a plateau (the ADC's limit after the dark and
    flat-field corrections): bright pixels whose 3x3 neighbourhood agrees within 3 %, unlike
    solar structure. By default every one of them is flagged, in every channel and time."""
    folder = shared_path(*FLARE)
    plateaus = dict.fromkeys(SIX, 0)
    for path in sorted(folder.glob("*.fits")):
        chan = int(path.stem.rsplit("_", 1)[1])
        raw = _raw(path)[1]
        lo = ndimage.minimum_filter(raw, 3, mode="nearest")
        hi = ndimage.maximum_filter(raw, 3, mode="nearest")
        plateau = (lo >= 10000) & (hi < 1.03 * lo)
        flagged = load_aia(path, [chan] * u.AA).flags[..., 0] & PixelFlag.SATURATED > 0
        assert np.all(flagged[plateau]), (path.name, raw[plateau & ~flagged].min())
        plateaus[chan] += plateau.sum()
    assert min(plateaus.values()) > 100 and plateaus[94] > 5000 and plateaus[193] > 1000


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


def test_smaller_image_is_placed_on_the_reference_grid(tmp_path):
    paths, truth = write_aia_set(tmp_path, edit=_edit_one(131, lambda h, c: c[:, :100]))
    stack = load_aia(paths)
    assert stack.resampled == (131,)
    np.testing.assert_allclose(stack.data[:, :100, 1], truth[:, :100, 1], rtol=1e-9)
    assert np.all(np.isnan(stack.data[:, 101:, 1]))
    assert np.all(stack.flags[:, 101:, 1] == PixelFlag.NO_COVERAGE)
    assert stack.mask[:, 101:].all() and not stack.mask[:, :100].any()
    assert np.isnan(stack.masked_data[:, 101:]).all()


def test_shifted_pointing_is_resampled(tmp_path):
    def shift(header, counts):
        header["CRPIX1"] += 5.0  # the reference's pixel i is this file's pixel i + 5
        return counts

    paths, truth = write_aia_set(tmp_path, edit=_edit_one(211, shift))
    stack = load_aia(paths)
    assert stack.resampled == (211,)
    c = SIX.index(211)
    np.testing.assert_allclose(stack.data[:, :123, c], truth[:, 5:, c], rtol=1e-9)
    assert np.all(np.isnan(stack.data[:, 123:, c]))
    assert np.all(stack.flags[:, 123:, c] == PixelFlag.NO_COVERAGE)
    assert not np.delete(stack.flags, c, axis=-1).any()
    # Within the tolerance nothing is resampled; the tolerance is in reference pixels.
    assert load_aia(paths, pointing_tolerance=6 * u.pix).resampled == ()


def test_image_off_the_reference_is_an_error(tmp_path):
    def far(header, counts):
        header["CRPIX1"] += 500.0
        return counts

    paths, _ = write_aia_set(tmp_path, edit=_edit_one(211, far))
    with pytest.raises(ValueError, match=r"aia_lev1_211a.fits: image does not overlap"):
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


# -- binning (n_sample) from the header --------------------------------------------------


def test_synoptic_n_sample_from_real_headers():
    path = shared_path(*SYNOPTIC, "AIAsynoptic0171.fits")
    header = fits.getheader(path, 1)
    # 1024^2 pixels of a 4096^2 frame: TOTVALS / (NAXIS1 NAXIS2) native pixels each
    expect = header["TOTVALS"] // (header["NAXIS1"] * header["NAXIS2"])
    assert expect == 16
    assert load_aia(path, [171] * u.AA).n_sample == expect
    assert load_aia(path, [171] * u.AA, rebin=2).n_sample == expect * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smap = sunpy.map.Map(path)
    assert load_aia(smap, [171] * u.AA).n_sample == expect  # a Map's meta serves the same way


def test_level1_cutouts_and_binned_maps_n_sample():
    paths = _flare_files("01-44")
    assert load_aia(paths).n_sample == 1
    assert load_aia(paths, rebin=3).n_sample == 9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smap = sunpy.map.Map(paths[2])
    binned = smap.superpixel((2, 2) * u.pix, func=np.mean)
    assert load_aia(binned, [171] * u.AA).n_sample == 4


@pytest.mark.parametrize(
    ("card", "value", "match"),
    [
        ("IMSCL_MP", 1.0, r"IMSCL_MP = 1.0 arcsec/pix is not AIA's native"),
        ("CDELT", 0.9, r"plate scale 0.9 arcsec / pix is 1.501 times the native"),
        ("TOTVALS", 128 * 128 - 1, r"inconsistent header: 128x128 pixels of \d+ native"),
    ],
)
def test_inconsistent_binning_is_refused(tmp_path, card, value, match):
    def spoil(header, counts):
        if card == "CDELT":  # 1.5 native pixels
            header["CDELT1"] = header["CDELT2"] = value
        else:
            header[card] = value
        return counts

    paths, truth = write_aia_set(tmp_path, [171], edit=_edit_one(171, spoil))
    with pytest.raises(ValueError, match=rf"aia_lev1_171a.fits: {match}.*n_native="):
        load_aia(paths, [171] * u.AA)
    stack = load_aia(paths, [171] * u.AA, n_native=4)
    assert stack.n_sample == 4
    np.testing.assert_allclose(stack.data[..., 0], truth[..., 0], rtol=1e-12)


def test_channels_with_different_binning(tmp_path):
    def binned4(header, counts):  # 2.4 arcsec pixels: 4x4-binned, unlike the 171 Å file
        header["CDELT1"] = header["CDELT2"] = 2.4
        return counts

    paths, _ = write_aia_set(tmp_path, [171, 193], edit=_edit_one(193, binned4))
    with pytest.raises(ValueError, match=r"different numbers of native pixels .*193 Å: 16"):
        load_aia(paths, [171, 193] * u.AA)
    with pytest.raises(ValueError, match=r"n_native must be a positive integer"):
        load_aia(paths, [171, 193] * u.AA, n_native=0)


# -- real header cards, compressed and truncated files -------------------------------------


def test_header_card_nan_loads(tmp_path):
    """Real AIA files carry ``OSCNMEAN= nan``, which astropy cannot parse into a value."""
    src = shared_path(*SYNOPTIC, "AIAsynoptic0171.fits")
    blob = src.read_bytes()
    at = blob.index(b"OSCNMEAN=")
    card = b"OSCNMEAN=                  nan / Mean value of overscan rows".ljust(80)
    bad = tmp_path / "AIAsynoptic0171.fits"
    bad.write_bytes(blob[:at] + card + blob[at + 80 :])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(VerifyError, match="OSCNMEAN"):
            dict(fits.getheader(bad, 1))  # what broke building a Map from the header
        assert sunpy.map.Map(bad).wavelength == 171 * u.AA
    stack = load_aia(bad, [171] * u.AA, rebin=4)
    good = load_aia(src, [171] * u.AA, rebin=4)
    np.testing.assert_array_equal(stack.data, good.data)
    assert stack.n_sample == good.n_sample == 16 * 16


def test_gzipped_file_loads_and_truncated_gzip_is_reported(tmp_path):
    src = _flare_files("01-44")[2]
    blob = gzip.compress(src.read_bytes())
    whole = tmp_path / "aia_171.fits.gz"
    whole.write_bytes(blob)
    np.testing.assert_array_equal(
        load_aia(whole, [171] * u.AA).data, load_aia(src, [171] * u.AA).data
    )
    for n in (len(blob) // 2, len(blob) - 4):  # cut in the data, or only the gzip trailer
        cut = tmp_path / f"cut{n}" / "aia_171.fits.gz"
        cut.parent.mkdir()
        cut.write_bytes(blob[:n])
        with pytest.raises(AIAFileError, match=rf"{re.escape(str(cut))}: gzip file is truncated"):
            load_aia(cut, [171] * u.AA)
        with pytest.raises(AIAFileError, match=r"aia_171.fits.gz: gzip file is truncated"):
            load_aia(cut.parent, [171] * u.AA)  # found by scanning a directory


def test_truncated_gzipped_compressed_real_file_is_reported(tmp_path):
    src = shared_path(*SYNOPTIC, "AIAsynoptic0171.fits")
    bad = tmp_path / "AIAsynoptic0171.fits.gz"
    bad.write_bytes(gzip.compress(src.read_bytes())[:200_000])
    with pytest.raises(AIAFileError, match=r"AIAsynoptic0171.fits.gz: gzip file is truncated"):
        load_aia(bad, [171] * u.AA)


# -- level-1 input: co-registration, exposure control, saturation --------------------------


def _gaussian_scene(header: fits.Header) -> np.ndarray:
    """DN s^-1 per pixel of two Gaussian sources of known total flux on this header's grid:
    surface brightness at the pixel centre times the pixel's solid angle. The sources sit at
    fixed pixels of the synthetic files' unedited header, four of its pixels wide."""
    base, _ = real_header_and_shape()
    centres = _wcs(base).wcs_pix2world([35.0, 90.0], [80.0, 45.0], 0)
    width = 4 * abs(base["CDELT1"]) / 3600  # degrees
    w = _wcs(header)
    yy, xx = np.mgrid[0 : header["NAXIS2"], 0 : header["NAXIS1"]]
    lon, lat = w.wcs_pix2world(xx, yy, 0)
    img = np.zeros(lon.shape)
    for x0, y0, flux in zip(*centres, (5e4, 2e4), strict=True):
        dlon = (lon - x0 + 180.0) % 360.0 - 180.0
        r2 = (dlon**2 + (lat - y0) ** 2) / width**2
        img += flux / (2 * np.pi * width**2) * np.exp(-r2 / 2)  # DN s^-1 deg^-2
    return img * proj_plane_pixel_area(w)


def test_subpixel_shift_comes_back_aligned_with_flux_kept(tmp_path):
    headers = {}

    def scene(chan, header, counts):
        if chan == 193:  # a sub-pixel shift, a 0.2 % larger plate scale and a 0.15 deg roll
            header["CRPIX1"] += 0.37
            header["CRPIX2"] -= 0.61
            header["CDELT1"] *= 1.002
            header["CDELT2"] *= 1.002
            header["CROTA2"] += 0.15
        counts = _gaussian_scene(header) * header["EXPTIME"]
        if chan == 193:
            counts[60, 30] = 16383.0  # saturated
            counts[90, 100] = np.nan
        headers[chan] = header.copy()
        return counts

    paths, _ = write_aia_set(tmp_path, [171, 193], edit=scene)
    stack = load_aia(paths, [171, 193] * u.AA)
    assert stack.resampled == (193,)
    expect = _gaussian_scene(headers[171])  # the same sky on the reference grid
    np.testing.assert_allclose(stack.data[..., 0], expect, rtol=1e-12)

    # Where each reference pixel centre falls in the 193 Å image, from the two headers.
    yy, xx = np.mgrid[0:128, 0:128]
    px, py = _wcs(headers[193]).wcs_world2pix(*_wcs(headers[171]).wcs_pix2world(xx, yy, 0), 0)
    outside = (px < -0.5) | (px > 127.5) | (py < -0.5) | (py > 127.5)
    saturated = ~outside & (np.abs(px - 30) < 1) & (np.abs(py - 60) < 1)
    nonfinite = ~outside & (np.abs(px - 100) < 1) & (np.abs(py - 90) < 1)
    flags = stack.flags[..., 1]
    np.testing.assert_array_equal(flags & PixelFlag.NO_COVERAGE > 0, outside)
    np.testing.assert_array_equal(flags & PixelFlag.SATURATED > 0, saturated)
    np.testing.assert_array_equal(flags & PixelFlag.NONFINITE > 0, nonfinite)
    assert 0 < outside.sum() < 400 and saturated.sum() == 4 and nonfinite.sum() == 4
    assert np.all(np.isnan(stack.data[..., 1][outside | nonfinite]))

    got = stack.data[..., 1]
    clean = ~(outside | nonfinite | saturated)
    np.testing.assert_allclose(got[clean], expect[clean], atol=0.02 * expect.max())
    # Total flux (DN/s) is kept to 1 %: the spoiled and uncovered pixels are far from both
    # sources, so the clean pixels hold all of the 193 Å image's flux.
    assert got[clean].sum() == pytest.approx(_gaussian_scene(headers[193]).sum(), rel=0.01)


def _header_shift(a, b) -> np.ndarray:
    """(dy, dx) such that the image of file b shows at pixel p + d what file a shows at p,
    from the two headers' WCS (mean over a's pixels)."""
    wa, wb = _wcs(_raw(a)[0]), _wcs(_raw(b)[0])
    yy, xx = np.mgrid[0:67, 0:67]
    px, py = wb.wcs_world2pix(*wa.wcs_pix2world(xx, yy, 0), 0)
    return np.array([np.mean(py - yy), np.mean(px - xx)])


def test_real_level1_cutouts_are_put_on_one_wcs():
    paths = _flare_files("01-44")
    headers = [_raw(p)[0] for p in paths]
    # Level 1: every channel has its own plate scale, roll and reference pixel.
    assert len({h["CDELT1"] for h in headers}) > 3 and len({h["CROTA2"] for h in headers}) > 1
    stack = load_aia(paths)
    assert stack.data.shape == (67, 67, 6)
    assert stack.resampled == (131, 171, 193, 211, 335)  # all but the reference, 94 Å
    # The stack's grid is the reference's: same world coordinates at every pixel.
    yy, xx = np.mgrid[0:67, 0:67]
    np.testing.assert_allclose(
        stack.wcs.wcs_pix2world(xx, yy, 0), _wcs(headers[0]).wcs_pix2world(xx, yy, 0), atol=1e-9
    )
    assert np.isfinite(stack.data[1:-1, 1:-1]).all() and not stack.flags[1:-1, 1:-1].any()

    raw = {c: _raw(p)[1] for c, p in zip(SIX, paths, strict=True)}
    inner = (slice(3, -3), slice(3, -3))
    for a, b in ((211, 335), (94, 335), (193, 335), (193, 211)):
        before = _xcorr_shift(raw[a][inner], raw[b][inner])
        after = _xcorr_shift(
            stack.data[..., SIX.index(a)][inner], stack.data[..., SIX.index(b)][inner]
        )
        # Resampling moved channel b relative to a by what the headers say ...
        np.testing.assert_allclose(
            before - after, _header_shift(paths[SIX.index(a)], paths[SIX.index(b)]), atol=0.25
        )
    # ... and so removed the 335 Å image's ~1 px offset along x (the largest the headers give).
    for a in (211, 94):
        before = _xcorr_shift(raw[a][inner], raw[335][inner])
        after = _xcorr_shift(stack.data[..., SIX.index(a)][inner], stack.data[..., -1][inner])
        assert abs(before[1]) > 0.6 and abs(after[1]) < 0.3


def test_real_exposures_come_from_each_file():
    """Automatic exposure control shortens exposures during the flare, down to 5 ms."""
    folder = shared_path(*FLARE)
    short = next(folder.glob("*T01-58-*_193.fits"))
    header, raw = _raw(short)
    assert header["EXPTIME"] < 0.006 and header["AECMODE"] == "ON"
    stack = load_aia(short, [193] * u.AA)
    assert stack.exptime[0] == header["EXPTIME"] * u.s
    np.testing.assert_allclose(stack.data[..., 0], np.clip(raw, 0, None) / header["EXPTIME"])
    paths = _flare_files("01-50")
    six = load_aia(paths)
    np.testing.assert_array_equal(six.exptime.to_value(u.s), [_raw(p)[0]["EXPTIME"] for p in paths])
    assert six.exptime.min() < 0.5 * u.s < 2.9 * u.s < six.exptime.max()


def test_real_saturated_pixels_are_flagged():
    paths = _flare_files("01-48")
    single = {}
    for chan, path, low in zip(SIX, paths, [0, 0, 0.03, 0.005, 0.003, 0], strict=True):
        raw = _raw(path)[1]  # DN per exposure
        stack = load_aia(path, [chan] * u.AA, saturation_level=15000 * u.DN)
        np.testing.assert_array_equal(stack.flags[..., 0] & PixelFlag.SATURATED > 0, raw >= 15000)
        single[chan] = stack.saturated_count[0]
        assert single[chan] >= low * raw.size and (low > 0) == (single[chan] > 0)
    six = load_aia(paths, saturation_level=15000 * u.DN)
    # Resampling spreads each saturated pixel onto the output pixels it touches.
    for c, chan in enumerate(SIX):
        assert six.saturated_count[c] >= single[chan]
        assert (six.saturated_count[c] > 0) == (single[chan] > 0)
    assert six.mask.sum() >= max(single.values())
    assert np.isnan(six.masked_data[six.mask]).all()


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
    np.testing.assert_array_equal(back.em.value, em.value.astype(np.float32))  # float32 on disk
    np.testing.assert_allclose(back.logt, DEEPEM_LOGT, atol=1e-12)
    np.testing.assert_array_equal(back.extras["status"], status)
    np.testing.assert_array_equal(back.extras["chi2"], chi2.value.astype(np.float32))
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
    np.testing.assert_array_equal(ndc.data[:, 5, 6], em.value[5, 6].astype(np.float32))


def test_dem_cube_refuses_overwrite(tmp_path, cube):
    stack, em = cube
    path = write_dem_cube(tmp_path / "dem.fits", em, DEEPEM_LOGT, stack.wcs)
    with pytest.raises(FileExistsError, match=r"overwrite=True"):
        write_dem_cube(path, em, DEEPEM_LOGT, stack.wcs)
    write_dem_cube(path, 2 * em, DEEPEM_LOGT, stack.wcs, overwrite=True)
    np.testing.assert_array_equal(read_dem_cube(path).em.value, (2 * em.value).astype(np.float32))


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
