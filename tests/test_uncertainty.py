"""The JAX AIA error model against aiapy.calibrate.estimate_error (the independent reference)."""

import os

import aiapy
import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from aiapy.calibrate import estimate_error as aiapy_estimate_error
from aiapy.calibrate.util import get_error_table

from deepem_jax.uncertainty import V3_ERROR_TABLE, ErrorTable, aia_sigma, estimate_error

TABLE_PATH = os.path.join(
    os.path.dirname(aiapy.__file__), "tests", "data", "aia_V3_error_table.txt"
)
CHANNELS = [94, 131, 171, 193, 211, 335]
COUNTS = np.concatenate([[0.0, 0.5, 1.0, 24.9, 25.0, 25.1], np.geomspace(1e-3, 1e5, 300)])


@pytest.fixture(scope="module")
def aiapy_table():
    return get_error_table(TABLE_PATH)


def test_embedded_v3_table_equals_aiapy_file():
    t = ErrorTable.from_file(TABLE_PATH)
    for field in ("dn_per_photon", "compress", "read_noise", "calerr", "eveerr", "chianti"):
        np.testing.assert_array_equal(getattr(t, field), getattr(V3_ERROR_TABLE, field), field)
    assert t.channels == V3_ERROR_TABLE.channels


@pytest.mark.parametrize("n_sample", [1, 4])
@pytest.mark.parametrize(
    "flags",
    [{}, {"include_eve": True}, {"include_preflight": True, "include_chianti": True}],
)
def test_matches_aiapy_every_channel(aiapy_table, n_sample, flags, x64):
    tab = V3_ERROR_TABLE.select(CHANNELS * u.AA)
    counts = np.repeat(COUNTS[:, None], len(CHANNELS), axis=1)
    ours = np.asarray(
        jax.jit(estimate_error, static_argnames=tuple(flags))(
            jnp.asarray(counts), tab, n_sample, **flags
        )
    )
    for i, ch in enumerate(CHANNELS):
        ref = aiapy_estimate_error(
            COUNTS * u.DN / u.pix, ch * u.AA, n_sample=n_sample, error_table=aiapy_table, **flags
        )
        np.testing.assert_allclose(ours[:, i], ref.to_value(u.DN / u.pix), rtol=1e-6)


def test_float32_close_to_aiapy(aiapy_table):
    tab = V3_ERROR_TABLE.select([171] * u.AA)
    ours = np.asarray(estimate_error(jnp.asarray(COUNTS[:, None], jnp.float32), tab))
    assert ours.dtype == np.float32
    ref = aiapy_estimate_error(COUNTS * u.DN / u.pix, 171 * u.AA, error_table=aiapy_table)
    np.testing.assert_allclose(ours[:, 0], ref.value, rtol=1e-5)


def test_negative_counts_clipped_not_nan():
    tab = V3_ERROR_TABLE.select([171] * u.AA)
    s = np.asarray(estimate_error(jnp.array([[-5.0], [0.0]]), tab))
    assert np.all(np.isfinite(s))
    assert s[0, 0] == pytest.approx(s[1, 0])


def test_aia_sigma_per_second(aiapy_table):
    y = np.array([[10.0, 200.0]]) * u.DN / (u.s * u.pix)
    t = np.array([2.9, 2.0]) * u.s
    s = aia_sigma(y, t, [94, 171] * u.AA)
    assert s.unit == u.DN / (u.s * u.pix)
    ref94 = aiapy_estimate_error(29.0 * u.DN / u.pix, 94 * u.AA, error_table=aiapy_table)
    assert s[0, 0].value == pytest.approx(ref94.value[0] / 2.9, rel=1e-5)
    with pytest.raises(ValueError, match="exposure"):
        aia_sigma(y, [0.0, 2.0] * u.s, [94, 171] * u.AA)
    with pytest.raises(u.UnitsError):
        aia_sigma(y.value * u.DN, t, [94, 171] * u.AA)
    with pytest.raises(ValueError, match="channels"):
        aia_sigma(y, t, [94, 171, 193] * u.AA)
    with pytest.raises(ValueError, match="1600"):
        V3_ERROR_TABLE.select([1600] * u.AA)


def test_error_table_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ErrorTable.from_file(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("A B\n1 2\n")
    with pytest.raises(ValueError, match="lacks columns"):
        ErrorTable.from_file(bad)
