"""TemperatureResponse loaders, selection, regridding and degradation against the real tables."""

import hashlib
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import aiapy
import astropy.units as u
import numpy as np
import pytest
from aiapy.calibrate import degradation
from aiapy.calibrate.util import get_correction_table
from astropy.time import Time

from deepem_jax.response import (
    AIA_CHANNELS,
    DEEPEM_LOGT,
    RESPONSE_UNIT,
    TemperatureResponse,
    default_response,
)

AIA6 = [94, 131, 171, 193, 211, 335]


def test_three_real_formats_load(genx_path, csv_path, npy_path):
    g = TemperatureResponse.from_genx(genx_path)
    c = TemperatureResponse.from_csv(csv_path)
    n = TemperatureResponse.from_deepem_npy(npy_path)
    for r in (g, c, n):
        assert list(r.channels) == AIA6
        assert np.all(np.asarray(r.K) >= 0)
    assert g.K.shape == c.K.shape == (6, 101)
    np.testing.assert_allclose(g.logt_array, np.round(np.arange(4.0, 9.0001, 0.05), 2), atol=1e-4)
    np.testing.assert_allclose(g.logt_array, c.logt_array, atol=1e-4)
    assert n.K.shape == (6, 18)
    np.testing.assert_allclose(n.logt_array, DEEPEM_LOGT)
    # Peak values quoted in PROVENANCE.md (read independently from the files there).
    assert np.asarray(g.K)[2].max() == pytest.approx(1.55e-24, rel=0.01)
    assert np.asarray(g.K)[0].max() == pytest.approx(2.88e-27, rel=0.01)
    assert np.asarray(n.K)[2].max() == pytest.approx(1.116e-24, rel=0.001)
    assert g.quantity.unit == RESPONSE_UNIT


def test_genx_and_csv_agree_where_they_should(genx_path, csv_path):
    """Two calibrations: same grid and channels, peaks at the same temperatures (±0.05 dex for the
    well-defined single-peak channels), magnitudes within the 0.8–1.21 median ratio the
    provenance notes report."""
    g = TemperatureResponse.from_genx(genx_path)
    c = TemperatureResponse.from_csv(csv_path)
    gk, ck = np.asarray(g.K), np.asarray(c.K)
    for i, ch in enumerate(AIA6):
        if ch in (171, 193, 211):
            peak_g = g.logt_array[np.argmax(gk[i])]
            peak_c = c.logt_array[np.argmax(ck[i])]
            assert abs(peak_g - peak_c) <= 0.05 + 1e-6, ch
        sel = (g.logt_array >= 5.5) & (g.logt_array <= 7.5)
        ratio = np.median(ck[i, sel] / gk[i, sel])
        assert 0.7 < ratio < 1.3, (ch, ratio)


def test_regrid_genx_onto_deepem_grid_matches_deepem_shape(genx_path, npy_path):
    """DeepEM's 171/193/211 rows are the GENX rows times one constant (0.745, 0.825, 0.867 per
    PROVENANCE.md): regridding must hit the tabulated points exactly."""
    g = TemperatureResponse.from_genx(genx_path).regrid(DEEPEM_LOGT)
    n = TemperatureResponse.from_deepem_npy(npy_path)
    ratio = np.asarray(n.K) / np.asarray(g.K)
    for row, expect in ((2, 0.745), (3, 0.825), (4, 0.867)):
        np.testing.assert_allclose(ratio[row], expect, rtol=2e-3)


def test_regrid_is_log_linear_and_zero_outside():
    K = np.array([[1e-26, 1e-24, 0.0], [2e-25, 2e-25, 2e-25]])
    r = TemperatureResponse(K, (171, 193), (6.0, 6.2, 6.4), "toy")
    out = np.asarray(r.regrid([5.9, 6.0, 6.1, 6.2, 6.25, 6.3, 6.5]).K)
    # geometric mean half-way between 1e-26 and 1e-24; outside the table -> 0;
    # anywhere next to a tabulated zero -> 0 (not an interpolated tiny number).
    np.testing.assert_allclose(out[0], [0.0, 1e-26, 1e-25, 1e-24, 0.0, 0.0, 0.0], rtol=1e-10)
    np.testing.assert_allclose(out[1], [0.0, *[2e-25] * 5, 0.0], rtol=1e-10)


def test_select_reorders_and_rejects():
    r = default_response()
    s = r.select([335, 94, 171] * u.AA)
    assert s.channels == (335, 94, 171)
    np.testing.assert_array_equal(np.asarray(s.K)[1], np.asarray(r.K)[0])
    with pytest.raises(ValueError, match="304"):
        r.select([304] * u.AA)
    with pytest.raises(ValueError, match="duplicate"):
        r.select([171, 171] * u.AA)
    with pytest.raises(u.UnitsError):
        r.select([171, 193] * u.s)


def test_default_response_is_demregpy_table(csv_path):
    r = default_response()
    assert list(r.channels) == AIA6 and r.K.shape == (6, 101)
    assert r.wavelength.unit == u.AA
    np.testing.assert_array_equal(r.wavelength, AIA_CHANNELS)
    # The demregpy table and the CSV calibration are the same numbers (checked to 1e-5).
    c = TemperatureResponse.from_csv(csv_path)
    np.testing.assert_allclose(np.asarray(r.K), np.asarray(c.K), rtol=1e-5, atol=1e-40)


def test_shipped_response_table_is_demregpy_0_6_2_file():
    shipped = Path(str(resources.files("deepem_jax") / "tables" / "aia_tresp_en.dat"))
    # SHA-256 of demregpy 0.6.2's tresp/aia_tresp_en.dat (PyPI distribution).
    digest = "8ab3cb9da628fc7afa33511f2a767f6e67233ae50256235c7c00a8973df1857c"
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == digest
    assert "MIT License" in (shipped.parent / "README.md").read_text()


def test_default_response_works_without_demregpy():
    """Any ``import demregpy`` fails in the child; the default response still loads."""
    code = (
        "import sys\n"
        "sys.modules['demregpy'] = None\n"
        "from deepem_jax.response import default_response\n"
        "r = default_response()\n"
        "print(r.K.shape, r.name)\n"
        "import demregpy\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "(6, 101) idlsave:aia_tresp_en.dat" in run.stdout, run.stderr
    # the last line proves the import really was blocked
    assert run.returncode != 0 and "ModuleNotFoundError" in run.stderr


@pytest.mark.parametrize(
    "K, logt, match",
    [
        (np.array([[1.0, np.nan]]), (6.0, 6.1), "NaN"),
        (np.array([[1.0, -1.0]]), (6.0, 6.1), "negative"),
        (np.array([[1.0, 1.0]]), (6.1, 6.0), "increasing"),
        (np.array([[1.0, 1.0]]), (6.0, np.inf), "NaN or Inf"),
        (np.array([[1.0, 1.0, 1.0]]), (6.0, 6.1), "shape"),
    ],
)
def test_bad_tables_rejected(K, logt, match):
    with pytest.raises(ValueError, match=match):
        TemperatureResponse(K, (171,), logt, "bad")


def test_from_arrays_units():
    K = np.ones((1, 3)) * 1e-25 * RESPONSE_UNIT
    r = TemperatureResponse.from_arrays(K, [171] * u.AA, [6.0, 6.1, 6.2])
    assert r.channels == (171,)
    with pytest.raises(u.UnitConversionError, match="DN"):
        TemperatureResponse.from_arrays(np.ones((1, 3)) * u.m, [171] * u.AA, [6.0, 6.1, 6.2])
    with pytest.raises(u.UnitsError):
        TemperatureResponse.from_arrays(K, [171] * u.s, [6.0, 6.1, 6.2])


def test_bad_files_rejected(tmp_path):
    bad_csv = tmp_path / "r.csv"
    bad_csv.write_text("logte,A171\n6.0,abc\n")
    with pytest.raises(ValueError, match="non-numeric"):
        TemperatureResponse.from_csv(bad_csv)
    bad_csv.write_text("")
    with pytest.raises(ValueError, match="empty"):
        TemperatureResponse.from_csv(bad_csv)
    bad_csv.write_text("logte,B999\n6.0,1e-25\n6.1,1e-25\n")
    with pytest.raises(ValueError, match="B999"):
        TemperatureResponse.from_csv(bad_csv)
    bad_genx = tmp_path / "r.genx"
    bad_genx.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="GENX"):
        TemperatureResponse.from_genx(bad_genx)
    bad_npy = tmp_path / "r.npy"
    np.save(bad_npy, np.ones((5, 18)))
    with pytest.raises(ValueError, match="6x18"):
        TemperatureResponse.from_deepem_npy(bad_npy)


def test_degradation_uses_aiapy_factor_per_channel():
    data_dir = os.path.join(os.path.dirname(aiapy.__file__), "tests", "data")
    table_path = os.path.join(data_dir, "aia_V8_20171210_050627_response_table.txt")
    r = default_response().select([335, 94, 171] * u.AA)
    d = r.degrade("2016-01-27T00:00:00", table_path)
    table = get_correction_table(table_path)
    for i, ch in enumerate((335, 94, 171)):
        expect = degradation(ch * u.AA, Time("2016-01-27T00:00:00"), correction_table=table)
        np.testing.assert_allclose(
            np.asarray(d.K)[i] / np.asarray(r.K)[i], np.ravel(expect.value)[0], rtol=1e-12
        )
    assert d.name == "idlsave:aia_tresp_en.dat+degraded(V8 @ 2016-01-27T00:00)"
    # 335 Å lost far more sensitivity than 171 Å by 2016 (aiapy's V8 table)
    ratio = np.asarray(d.K).max(axis=1) / np.asarray(r.K).max(axis=1)
    assert ratio[0] < 0.3 < 0.7 < ratio[2]
    with pytest.raises(FileNotFoundError, match="correction table"):
        r.degrade("2016-01-27", "/nonexistent/table.txt")


def test_degrade_defaults_to_shipped_v10_table():
    """Without a table the V10 factors apply: the published 2024-10-04 values per channel."""
    r = default_response().select([131, 171, 193, 211, 335] * u.AA)
    d = r.degrade("2024-10-04T16:18:00")
    ratio = np.asarray(d.K).max(axis=1) / np.asarray(r.K).max(axis=1)
    np.testing.assert_array_equal(np.round(ratio, 2), [0.51, 0.74, 0.49, 0.40, 0.17])
    assert d.name == "idlsave:aia_tresp_en.dat+degraded(V10 @ 2024-10-04T16:18)"
    assert d.channels == r.channels and d.logt == r.logt
    with pytest.raises(ValueError, match="2009"):
        r.degrade("2009-06-01")


def test_response_is_a_pytree():
    import jax

    r = default_response()
    leaves, tree = jax.tree_util.tree_flatten(r)
    assert len(leaves) == 1
    r2 = jax.tree_util.tree_unflatten(tree, [x * 2 for x in leaves])
    assert r2.channels == r.channels and r2.logt == r.logt
    np.testing.assert_allclose(np.asarray(r2.K), 2 * np.asarray(r.K))
