"""Degradation factors against aiapy called directly, the published numbers, and the table's own
rows evaluated by hand."""

import datetime as dt
import hashlib
import subprocess
import sys

import astropy.units as u
import numpy as np
import pytest
from aiapy.calibrate import degradation as aiapy_degradation
from aiapy.calibrate.util import get_correction_table
from astropy.io import fits
from astropy.time import Time
from conftest import shared_path

from deepem_jax.calibration import DEFAULT_CORRECTION_TABLE, Degradation, degradation

V10_NAME = "aia_V10_20201119_190000_response_table.txt"
V8_NAME = "aia_V8_20171210_050627_response_table.txt"
# SHA-256 that aiapy registers for the V10 table it downloads from SolarSoft.
V10_SHA256 = "0a3f2db39d05c44185f6fdeec928089fb55d1ce1e0a805145050c6356cbc6e98"
OBS = "2024-10-04T16:18:00"
ALL_AIA = [94, 131, 171, 193, 211, 304, 335, 1600, 1700]


def test_shipped_table_is_the_v10_table():
    assert DEFAULT_CORRECTION_TABLE.name == V10_NAME
    assert hashlib.sha256(DEFAULT_CORRECTION_TABLE.read_bytes()).hexdigest() == V10_SHA256
    original = shared_path("aia", "calibration", V10_NAME)
    assert DEFAULT_CORRECTION_TABLE.read_bytes() == original.read_bytes()


def test_published_v10_factors_for_2024_10_04():
    d = degradation([131, 171, 193, 211, 335] * u.AA, OBS)
    assert d.table == V10_NAME and d.version == 10
    assert d.channels == (131, 171, 193, 211, 335)
    np.testing.assert_array_equal(np.round(d.factors, 2), [0.51, 0.74, 0.49, 0.40, 0.17])
    assert d.obstime == ("2024-10-04T16:18:00.000",) * 5
    assert d.label == "V10 @ 2024-10-04T16:18"


def test_published_v8_factors_for_2024_10_04():
    path = shared_path("aia", "calibration", V8_NAME)
    d = degradation([193, 335] * u.AA, Time(OBS), correction_table=path)
    assert d.table == V8_NAME and d.version == 8
    np.testing.assert_array_equal(np.round(d.factors, 2), [0.70, 0.10])


@pytest.mark.parametrize("when", ["2011-06-01T00:00", "2016-01-27T12:00", OBS])
def test_equals_aiapy_called_directly(when):
    original = shared_path("aia", "calibration", V10_NAME)
    table = get_correction_table(original)
    d = degradation(ALL_AIA * u.AA, when)
    for ch, f in zip(ALL_AIA, d.factors, strict=True):
        expect = aiapy_degradation(ch * u.AA, Time(when), correction_table=table)
        assert f == pytest.approx(float(np.ravel(expect.value)[0]), rel=1e-12), ch


def _by_hand(path, channel, when):
    """Effective area of the epoch holding ``when`` over that of the launch epoch, times the
    epoch's polynomial in days since its start, read with plain Python from the table."""
    lines = path.read_text().splitlines()
    cols = lines[0].split()
    rows = [dict(zip(cols, ln.split(), strict=True)) for ln in lines[1:] if ln.strip()]
    rows = [r for r in rows if r["WAVE_STR"] in (f"{channel}_THIN", str(channel))]
    for r in rows:
        r["start"] = dt.datetime.fromisoformat(r["T_START"])
        r["stop"] = dt.datetime.fromisoformat(r["T_STOP"])
    t = dt.datetime.fromisoformat(when)
    launch = min(rows, key=lambda r: r["start"])
    (epoch,) = [r for r in rows if r["start"] <= t < r["stop"]]
    days = (t - epoch["start"]).total_seconds() / 86400.0
    p1, p2, p3 = (float(epoch[k]) for k in ("EFFA_P1", "EFFA_P2", "EFFA_P3"))
    poly = 1.0 + p1 * days + p2 * days**2 + p3 * days**3
    return float(epoch["EFF_AREA"]) / float(launch["EFF_AREA"]) * poly


@pytest.mark.parametrize("when", ["2011-06-01T00:00:00", "2016-01-27T12:00:00", OBS])
def test_equals_the_table_rows_by_hand(when):
    chans = [94, 131, 171, 193, 211, 335, 1600, 1700]
    d = degradation(chans * u.AA, when)
    for ch, f in zip(chans, d.factors, strict=True):
        assert f == pytest.approx(_by_hand(DEFAULT_CORRECTION_TABLE, ch, when), rel=1e-6), ch


def test_one_time_per_channel():
    times = ["2012-01-01T00:00:00", OBS]
    d = degradation([171, 335] * u.AA, times)
    table = get_correction_table(DEFAULT_CORRECTION_TABLE)
    for i, (ch, t) in enumerate(zip((171, 335), times, strict=True)):
        expect = aiapy_degradation(ch * u.AA, Time(t), correction_table=table)
        assert d.factors[i] == pytest.approx(float(np.ravel(expect.value)[0]), rel=1e-12)
    assert d.obstime == ("2012-01-01T00:00:00.000", "2024-10-04T16:18:00.000")
    assert d.label == "V10 @ 2012-01-01T00:00,2024-10-04T16:18"
    with pytest.raises(ValueError, match="one per channel"):
        degradation([171, 193, 335] * u.AA, times)


def test_header_cards():
    d = degradation([94, 335] * u.AA, OBS)
    cards = d.to_header()
    assert all(len(k) <= 8 for k in cards)
    header = fits.Header()
    header.update(cards)
    back = fits.Header.fromstring(header.tostring())
    assert back["DEGTABLE"] == V10_NAME
    assert back["DEGVER"] == 10
    assert back["DEGTIME"] == "2024-10-04T16:18:00.000"
    assert back["DEGF0094"] == pytest.approx(d.factors[0], rel=1e-12)
    assert back["DEGF0335"] == pytest.approx(d.factors[1], rel=1e-12)
    per_channel = degradation([171, 1600] * u.AA, ["2012-01-01", OBS]).to_header()
    assert "DEGTIME" not in per_channel
    assert per_channel["DEGT1600"][0] == "2024-10-04T16:18:00.000"
    assert all(len(k) <= 8 for k in per_channel)


def test_result_is_frozen():
    d = degradation([171] * u.AA, OBS)
    with pytest.raises(ValueError, match="read-only"):
        d.factors[0] = 1.0
    with pytest.raises(AttributeError):
        d.version = 9
    with pytest.raises(ValueError, match="2 factors"):
        Degradation((171, 193), np.ones(3), ("2020-01-01",) * 2, V10_NAME, 10)


def test_times_outside_the_table_raise():
    with pytest.raises(ValueError, match=r"171 Å at 2009-01-01.*aia_V10"):
        degradation([171] * u.AA, "2009-01-01")
    with pytest.raises(ValueError, match=r"2031-01-01"):
        degradation([171] * u.AA, "2031-01-01")


def test_non_aia_or_uncovered_channels_raise():
    with pytest.raises(ValueError, match="500 Å"):
        degradation([171, 500] * u.AA, OBS)
    with pytest.raises(ValueError, match="4500 Å"):
        degradation([4500] * u.AA, OBS)
    with pytest.raises(ValueError, match="distinct"):
        degradation([171, 171] * u.AA, OBS)
    with pytest.raises(u.UnitsError):
        degradation([171] * u.s, OBS)


def test_negative_extrapolation_raises_not_returns():
    # V8 extrapolates 304 Å below zero by 2024: an error, not a factor.
    path = shared_path("aia", "calibration", V8_NAME)
    with pytest.raises(ValueError, match=r"finite positive.*304 Å|304 Å.*finite positive"):
        degradation([304] * u.AA, OBS, correction_table=path)


def test_bad_table_files(tmp_path):
    missing = tmp_path / "aia_V99_missing.txt"
    with pytest.raises(FileNotFoundError, match=r"aia_V99_missing\.txt"):
        degradation([171] * u.AA, OBS, correction_table=missing)
    garbage = tmp_path / "garbage_table.txt"
    garbage.write_text("this is not\na correction table\n")
    with pytest.raises(ValueError, match=r"garbage_table\.txt"):
        degradation([171] * u.AA, OBS, correction_table=str(garbage))


def test_degradation_leaves_root_logging_alone():
    """aiapy's calibration imports ``drms``, which configures the root logger at INFO; a
    fresh process that computes a degradation factor keeps the root logger unconfigured (no
    handler, WARNING), so JAX's INFO records stay quiet."""
    code = (
        "import logging, sys\n"
        "import astropy.units as u\n"
        "from deepem_jax.calibration import degradation\n"
        "degradation([171] * u.AA, '2020-01-01T00:00')\n"
        "root = logging.getLogger()\n"
        "sys.exit(0 if not root.handlers and root.level == logging.WARNING else 7)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "INFO" not in proc.stderr
