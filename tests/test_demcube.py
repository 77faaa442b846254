"""DEM cube FITS files, read back with plain astropy and with ndcube: float type on disk,
provenance cards, the log T axis's physical type, 2-D and 3-D extensions."""

from __future__ import annotations

import importlib.metadata
import json
import math

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.wcsapi.fitswcs import custom_ctype_to_ucd_mapping
from ndcube import NDCube

from deepem_jax.io import read_dem_cube, write_dem_cube

LOGT = np.round(np.arange(5.5, 7.25, 0.1), 2)  # 18 bins
NY, NX, NT = 5, 7, LOGT.size


@pytest.fixture
def wcs() -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["HPLN-TAN", "HPLT-TAN"]
    w.wcs.cunit = ["arcsec", "arcsec"]
    w.wcs.cdelt = [2.4, 2.4]
    w.wcs.crpix = [4.0, 3.0]
    w.wcs.crval = [100.0, -200.0]
    w.wcs.dateobs = "2011-02-15T01:44:00"
    w.pixel_shape = (NX, NY)
    return w


@pytest.fixture
def em() -> u.Quantity:
    rng = np.random.default_rng(0)
    e = rng.uniform(0, 1e28, (NY, NX, NT))
    e[1, 2] = np.nan  # a failed pixel
    return e * u.cm**-5


def test_float32_by_default_and_float64_on_request(tmp_path, wcs, em):
    p32 = write_dem_cube(tmp_path / "a.fits", em, LOGT, wcs)
    p64 = write_dem_cube(tmp_path / "b.fits", em, LOGT, wcs, dtype=np.float64)
    with fits.open(p32) as h32, fits.open(p64) as h64:
        assert h32[0].header["BITPIX"] == -32 and h64[0].header["BITPIX"] == -64
        assert h32[0].data.shape == (NT, NY, NX)
        # pixel (y=3, x=4), bin 9: the file's [9, 3, 4]
        assert h32[0].data[9, 3, 4] == np.float32(em.value[3, 4, 9])
        assert h64[0].data[9, 3, 4] == em.value[3, 4, 9]
        assert np.isnan(h32[0].data[:, 1, 2]).all()
    back = read_dem_cube(p32)
    assert back.em.dtype == np.float32 and back.em.unit == u.cm**-5
    np.testing.assert_array_equal(back.em.value, em.value.astype(np.float32))
    np.testing.assert_array_equal(read_dem_cube(p64).em.value, em.value)


def test_float_type_checks(tmp_path, wcs, em):
    with pytest.raises(ValueError, match="float32 or float64"):
        write_dem_cube(tmp_path / "c.fits", em, LOGT, wcs, dtype=np.int16)
    huge = em.copy()
    huge[0, 0, 0] = 1e40 * u.cm**-5
    with pytest.raises(ValueError, match="beyond the float32 range"):
        write_dem_cube(tmp_path / "c.fits", huge, LOGT, wcs)
    assert not (tmp_path / "c.fits").exists()
    path = write_dem_cube(tmp_path / "c.fits", huge, LOGT, wcs, dtype="float64")
    assert fits.getdata(path)[0, 0, 0] == 1e40
    inf = em.copy()
    inf[0, 0, 0] = np.inf * u.cm**-5  # not finite: stored as it is
    assert np.isposinf(fits.getdata(write_dem_cube(tmp_path / "d.fits", inf, LOGT, wcs))[0, 0, 0])


PROVENANCE = {
    "method": "bp",
    "tolfac": 1.4,
    "rebin": 4,
    "n_sample": np.int64(16),
    "consistency": True,
    "response_name": "demregpy aia_tresp_en.dat",
    "response_sha256": "0123456789abcdef" * 4,
    "degradation_table": None,
    "degradation_factors": np.array([0.8123456789012345, 0.9, 1 / 3]),
    "channels": (94, 131, 171),
    "weights_sha256": "f" * 64,
    "tiny": 1e-300 / 3,  # more digits than a FITS float card holds
    "label": "trailing blank ",
    "note": "Å",
}


def test_provenance_cards(tmp_path, wcs, em):
    path = write_dem_cube(tmp_path / "p.fits", em, LOGT, wcs, provenance=PROVENANCE)
    version = importlib.metadata.version("deepem_jax")

    header = fits.getheader(path)  # plain astropy
    assert header["HIERARCH DEEPEM METHOD"] == "bp"
    assert header["HIERARCH DEEPEM TOLFAC"] == 1.4
    assert header["HIERARCH DEEPEM REBIN"] == 4 and header["HIERARCH DEEPEM N_SAMPLE"] == 16
    assert header["HIERARCH DEEPEM CONSISTENCY"] is True
    assert header["HIERARCH DEEPEM RESPONSE_SHA256"] == "0123456789abcdef" * 4
    assert header["HIERARCH DEEPEM DEEPEM_JAX_VERSION"] == version
    assert header.comments["HIERARCH DEEPEM CHANNELS"] == "JSON"
    assert json.loads(header["HIERARCH DEEPEM CHANNELS"]) == [94, 131, 171]
    assert json.loads(header["HIERARCH DEEPEM DEGRADATION_FACTORS"]) == [
        0.8123456789012345,
        0.9,
        1 / 3,
    ]

    prov = read_dem_cube(path).provenance
    assert prov.keys() == {*PROVENANCE, "deepem_jax_version"}
    assert prov["deepem_jax_version"] == version
    assert prov["degradation_table"] is None
    assert prov["degradation_factors"] == [0.8123456789012345, 0.9, 1 / 3]
    assert prov["channels"] == [94, 131, 171]
    for key, kind in [
        ("method", str),
        ("tolfac", float),
        ("rebin", int),
        ("n_sample", int),
        ("consistency", bool),
        ("response_name", str),
        ("response_sha256", str),
        ("weights_sha256", str),
        ("tiny", float),
        ("label", str),
        ("note", str),
    ]:
        assert prov[key] == PROVENANCE[key] and type(prov[key]) is kind, key


def test_provenance_version_is_always_written(tmp_path, wcs, em):
    path = write_dem_cube(
        tmp_path / "v.fits",
        em,
        LOGT,
        wcs,
        provenance={"deepem_jax_version": "0.0.0", "x": math.nan},
    )
    prov = read_dem_cube(path).provenance
    assert prov["deepem_jax_version"] == importlib.metadata.version("deepem_jax")
    assert math.isnan(prov["x"])
    plain = read_dem_cube(write_dem_cube(tmp_path / "w.fits", em, LOGT, wcs)).provenance
    assert plain == {"deepem_jax_version": importlib.metadata.version("deepem_jax")}


@pytest.mark.parametrize(
    "provenance, error, match",
    [
        ({"Method": "bp"}, ValueError, "lower-case identifier"),
        ({"a" * 41: 1}, ValueError, "lower-case identifier"),
        ({"bad key": 1}, ValueError, "lower-case identifier"),
        ({"obj": object()}, TypeError, "provenance 'obj' cannot be stored"),
    ],
)
def test_provenance_rejects(tmp_path, wcs, em, provenance, error, match):
    with pytest.raises(error, match=match):
        write_dem_cube(tmp_path / "r.fits", em, LOGT, wcs, provenance=provenance)
    assert not (tmp_path / "r.fits").exists()


def test_logt_axis_is_a_temperature_for_ndcube(tmp_path, wcs, em):
    path = write_dem_cube(tmp_path / "t.fits", em, LOGT, wcs)
    cube = read_dem_cube(path)
    assert cube.wcs.world_axis_physical_types[2] == "phys.temperature"
    ndc = cube.to_ndcube()
    (lt,) = ndc.axis_world_coords("temperature")
    np.testing.assert_allclose(lt.value, LOGT, atol=1e-12)
    (lt_sliced,) = ndc[3:6].axis_world_coords("temp")
    np.testing.assert_allclose(lt_sliced.value, LOGT[3:6], atol=1e-12)

    # From the file alone, with astropy's documented CTYPE -> UCD extension point.
    with fits.open(path) as hdul:
        plain = NDCube(hdul[0].data, wcs=WCS(hdul[0].header), unit=hdul[0].header["BUNIT"])
    with custom_ctype_to_ucd_mapping({"LOGT": "phys.temperature"}):
        (lt_plain,) = plain.axis_world_coords("temperature")
    np.testing.assert_allclose(lt_plain.value, LOGT, atol=1e-12)


def test_2d_and_3d_extensions(tmp_path, wcs, em):
    status = (np.arange(NY * NX).reshape(NY, NX) % 5).astype(np.int8)
    status16 = status.astype(np.int16) * 300
    valid = status == 0
    chi2 = np.linspace(0, 3, NY * NX).reshape(NY, NX)
    em_err = 0.1 * em
    path = write_dem_cube(
        tmp_path / "x.fits",
        em,
        LOGT,
        wcs,
        extras={
            "status": status,
            "status16": status16,
            "valid": valid,
            "chi2": chi2,
            "em_err": em_err,
        },
    )
    with fits.open(path) as hdul:
        assert [h.name for h in hdul] == [
            "PRIMARY",
            "STATUS",
            "STATUS16",
            "VALID",
            "CHI2",
            "EM_ERR",
        ]
        assert hdul["STATUS"].header["BITPIX"] == 8 and hdul["STATUS"].data.dtype.kind == "i"
        np.testing.assert_array_equal(hdul["STATUS"].data, status)
        assert hdul["STATUS16"].header["BITPIX"] == 16
        np.testing.assert_array_equal(hdul["STATUS16"].data, status16)
        assert hdul["VALID"].data.dtype == np.uint8
        assert hdul["CHI2"].header["BITPIX"] == -32 and hdul["CHI2"].header["NAXIS"] == 2
        err = hdul["EM_ERR"]
        assert err.data.shape == (NT, NY, NX) and err.header["BUNIT"] == "cm-5"
        assert err.header["BITPIX"] == -32 and err.header["CTYPE3"] == "LOGT"
        assert err.data[9, 3, 4] == np.float32(em_err.value[3, 4, 9])
        w3 = WCS(err.header)
        assert w3.sub([3]).pixel_to_world_values(17) == pytest.approx(7.2)
        assert WCS(hdul["CHI2"].header).naxis == 2

    back = read_dem_cube(path).extras
    assert back["status"].dtype == np.int8 and back["status16"].dtype == np.int16
    np.testing.assert_array_equal(back["status"], status)
    np.testing.assert_array_equal(back["valid"], valid.astype(np.uint8))
    np.testing.assert_array_equal(back["chi2"], chi2.astype(np.float32))
    assert back["em_err"].unit == u.cm**-5 and back["em_err"].shape == (NY, NX, NT)
    np.testing.assert_array_equal(back["em_err"].value, em_err.value.astype(np.float32))


def test_extension_shape_and_type_errors(tmp_path, wcs, em):
    out = tmp_path / "e.fits"
    with pytest.raises(ValueError, match=r"extra map 'err' has shape \(5, 7, 17\)"):
        write_dem_cube(out, em, LOGT, wcs, extras={"err": em.value[..., :-1]})
    with pytest.raises(ValueError, match=r"extra map 'err' has shape \(18, 5, 7\)"):
        write_dem_cube(out, em, LOGT, wcs, extras={"err": np.moveaxis(em.value, -1, 0)})
    with pytest.raises(TypeError, match="real numbers"):
        write_dem_cube(out, em, LOGT, wcs, extras={"c": np.zeros((NY, NX), complex)})
    assert not out.exists()


def test_damaged_cubes_are_errors_naming_the_file(tmp_path, wcs, em):
    """A truncated or garbled cube is a ValueError naming the file and what is wrong with it;
    a missing file stays FileNotFoundError; a readable FITS image is 'not a DEM cube'."""
    good = write_dem_cube(tmp_path / "good.fits", em, LOGT, wcs).read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"cut\.fits: DEM cube file is truncated"):
        read_dem_cube(cut)
    bad = tmp_path / "bad.fits"
    bad.write_bytes(good[:80] + b"\0" * 2800 + good[2880:])
    with pytest.raises(
        ValueError, match=r"bad\.fits: not a readable DEM cube, the file is corrupt"
    ):
        read_dem_cube(bad)
    with pytest.raises(FileNotFoundError):
        read_dem_cube(tmp_path / "missing.fits")
    image = tmp_path / "image.fits"
    fits.writeto(image, np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"image\.fits is not a DEM cube"):
        read_dem_cube(image)


def test_unwritable_targets_are_named(tmp_path, wcs, em):
    """Writing into a missing folder or onto a directory names the target, not the temporary
    file beside it, and leaves nothing behind."""
    with pytest.raises(FileNotFoundError, match=r"cannot write .*x\.fits: its folder .* not exist"):
        write_dem_cube(tmp_path / "no" / "x.fits", em, LOGT, wcs)
    (tmp_path / "d.fits").mkdir()
    with pytest.raises(IsADirectoryError, match=r"d\.fits: it is a directory"):
        write_dem_cube(tmp_path / "d.fits", em, LOGT, wcs, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.fits"]
