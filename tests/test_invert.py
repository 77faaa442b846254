"""``deepem_jax.invert``: the one pipeline. Degradation against BP with a degraded response,
statuses and NaN EM for every kind of bad pixel, the network's band flag against an independent
check, chi^2 recomputed by hand, bad requests, and equality with what the CLI writes."""

from __future__ import annotations

import dataclasses

import astropy.units as u
import numpy as np
import pytest
from _synth import write_aia_set
from click.testing import CliRunner

from deepem_jax import bp
from deepem_jax.basis import cheung_basis
from deepem_jax.cli import main
from deepem_jax.data import sample_observation
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.io import load_aia, read_dem_cube
from deepem_jax.pipeline import DEMWarning, invert
from deepem_jax.predictor import native_dtype
from deepem_jax.pretrained import load_default_predictor
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.status import DEMStatus
from deepem_jax.uncertainty import sigma_values

FIVE = [131, 171, 193, 211, 335] * u.AA
T_OBS = "2024-10-04T16:18:00"
EXPTIME = np.array([2.9, 2.0, 2.0, 2.9, 2.9])


@pytest.fixture(scope="module")
def five_channel_pixels():
    """Noisy intensities (N, 5) of random DEMs seen through the response degraded to T_OBS."""
    resp = default_response().regrid(DEEPEM_LOGT).select(FIVE)
    deg = resp.degrade(T_OBS)
    rng = np.random.default_rng(3)
    em = random_dems(DEEPEM_LOGT, 600, rng)
    y = noisy_observation(np.asarray(forward(np.asarray(deg.K), em)), EXPTIME, deg.channels, rng)
    return y, sigma_values(y, EXPTIME, FIVE, 16), resp, deg


def test_degradation_equals_bp_with_the_degraded_response(five_channel_pixels):
    y, sig, _, deg = five_channel_pixels
    res = invert(y, "bp", sigma=sig, channels=FIVE, obstime=T_OBS)
    ref = bp.solve(y, sig, deg, cheung_basis(DEEPEM_LOGT))  # independent path: K_deg directly
    np.testing.assert_array_equal(res.status, ref.status)
    ok = ref.status == 0
    assert ok.mean() > 0.9
    scale = np.max(ref.em[ok])
    np.testing.assert_allclose(res.em[ok], ref.em[ok], rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(res.synthetic[ok], ref.synthetic[ok], rtol=1e-3, atol=1e-3)
    chi2 = np.mean(((ref.synthetic - y) / sig) ** 2, axis=-1)
    np.testing.assert_allclose(res.chi2[ok], chi2[ok], rtol=1e-3)
    assert np.all(np.isnan(res.em[~ok])) and np.all(np.isnan(res.chi2[~ok]))
    np.testing.assert_allclose(res.degradation, [0.51, 0.74, 0.49, 0.40, 0.17], atol=0.005)
    assert res.provenance["DEGTABLE"][0].startswith("aia_V10")
    undegraded = invert(y, "bp", sigma=sig, channels=FIVE, degradation=False)
    assert (undegraded.status != 0).mean() > (res.status != 0).mean()


@pytest.mark.parametrize("method", ["bp", "net"])
def test_channel_order_is_the_callers(five_channel_pixels, method):
    """Channels in any order give the same DEMs (the network takes them in its own order) and
    a result in the caller's order."""
    y, sig, _, _ = five_channel_pixels
    a = invert(y[:100], method, sigma=sig[:100], channels=FIVE, obstime=T_OBS)
    perm = [4, 2, 0, 3, 1]
    b = invert(y[:100, perm], method, sigma=sig[:100, perm], channels=FIVE[perm], obstime=T_OBS)
    assert b.channels == tuple(int(c) for c in FIVE[perm].value)
    np.testing.assert_array_equal(a.status, b.status)
    np.testing.assert_allclose(a.em, b.em, rtol=1e-3, atol=1e-4 * np.nanmax(a.em))
    np.testing.assert_allclose(a.synthetic[:, perm], b.synthetic, rtol=1e-5)


def test_bp_streams_blocks_and_keeps_float32_input(five_channel_pixels, monkeypatch):
    """BP, the synthetic intensities and chi^2 run in blocks of pixels on the input as given (no
    float64 copy of a float32 image, which the result keeps as its intensities and sigma): a
    float32 image in blocks of 64 pixels gives exactly what its float64 copy gives in one
    block."""
    import deepem_jax.pipeline as P

    y, sig, _, _ = five_channel_pixels
    y32, s32 = y.astype(np.float32).reshape(20, 30, 5), sig.astype(np.float32).reshape(20, 30, 5)
    y32[0, 0, 1] = np.nan
    y64, s64 = y32.astype(np.float64), s32.astype(np.float64)
    ref = invert(y64, "bp", sigma=s64, channels=FIVE, obstime=T_OBS)
    monkeypatch.setattr(P, "_ROWS", 64)
    res = invert(y32, "bp", sigma=s32, channels=FIVE, obstime=T_OBS)
    assert res.status[0, 0] == DEMStatus.INVALID_INPUT and (res.status == 0).mean() > 0.9
    assert res.intensities is y32 and res.sigma is s32  # float32 input is not held twice
    assert ref.intensities is y64 and ref.sigma is s64  # nor is a float64 one
    for name in ("em", "status", "chi2", "synthetic", "intensities", "sigma", "tolfac"):
        a, b = getattr(res, name), getattr(ref, name)
        assert a.shape == b.shape, name
        assert a.dtype == b.dtype or name in ("intensities", "sigma"), name
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_bad_pixels_get_a_status_and_nan_em(five_channel_pixels):
    y, sig, _, _ = five_channel_pixels
    y = y[:8].copy()
    sig = sig[:8].copy()
    y[0, 1] = np.nan
    sig[1, 2] = 0.0
    y[2] = 0.0  # no signal in any channel
    for method in ("bp", "net"):
        res = invert(y, method, sigma=sig, channels=FIVE, obstime=T_OBS)
        assert res.status[0] == DEMStatus.INVALID_INPUT
        assert np.all(np.isnan(res.em[0])) and np.isnan(res.chi2[0])
        assert res.status[1] == DEMStatus.INVALID_INPUT and np.all(np.isnan(res.em[1]))
        assert res.status[2] in (DEMStatus.LOW_SIGNAL, DEMStatus.SOLVED, DEMStatus.OUTSIDE_BAND)
        if res.status[2] == DEMStatus.LOW_SIGNAL:
            assert np.all(np.isnan(res.em[2]))
        assert np.all(np.isfinite(res.em[3:][res.has_em[3:]]))


@pytest.mark.parametrize("method", ["net", "bp"])
def test_overflow_is_flagged(method):
    """Pixels whose EM is beyond float32 (the shipped cutouts' intensities times 1e15) are
    NONFINITE_OUTPUT with NaN EM and chi^2, never an infinite EM marked SOLVED."""
    stack = load_aia(sample_observation("01:44"))
    y, sig = stack.data[:2, :3].copy(), stack.sigma()[:2, :3].copy()
    y[1] *= 1e15
    sig[1] *= 1e15
    with np.errstate(over="ignore"):
        res = invert(y, method, sigma=sig, channels=stack.channels, obstime=stack.obstime)
    assert np.all(res.status[1] == DEMStatus.NONFINITE_OUTPUT)
    assert np.all(np.isnan(res.em[1])) and np.all(np.isnan(res.chi2[1]))
    assert np.all(np.isin(res.status[0], [DEMStatus.SOLVED, DEMStatus.OUTSIDE_BAND]))


def test_saturated_pixels_are_flagged(tmp_path):
    def saturate(chan, header, counts):
        if chan == 171:
            counts = counts.copy()
            counts[10:12, 20:22] = 16000.0
        return counts

    write_aia_set(tmp_path, edit=saturate)
    stack = load_aia(tmp_path)
    res = invert(stack, "net")
    assert np.all(res.status[10:12, 20:22] == DEMStatus.SATURATED)
    assert np.all(np.isnan(res.em[10:12, 20:22]))
    assert res.status[30, 30] != DEMStatus.SATURATED


def test_network_band_flag_is_an_independent_check():
    resp = default_response().regrid(DEEPEM_LOGT)
    rng = np.random.default_rng(11)
    t = np.array([2.9, 2.9, 2.0, 2.0, 2.9, 2.9])
    K = np.asarray(resp.K, np.float64)
    y = noisy_observation(
        np.asarray(forward(K, random_dems(DEEPEM_LOGT, 2000, rng))), t, resp.channels, rng
    )
    sig = sigma_values(y, t, resp.wavelength)
    lo, hi = (np.asarray(b, np.float64) for b in bp.bounds(y, sig, 1.4))

    def inside(em):
        r = em.astype(np.float64) @ K.T
        return np.all((r >= lo) & (r <= hi), -1)

    kw = dict(sigma=sig, channels=resp.wavelength, degradation=False)
    raw = invert(y, "net", consistency=False, **kw)
    res = invert(y, "net", consistency=True, **kw)  # the projection alone
    for r in (raw, res):
        np.testing.assert_array_equal(r.status == DEMStatus.SOLVED, inside(r.em))
        assert set(np.unique(r.status)) <= {DEMStatus.SOLVED, DEMStatus.OUTSIDE_BAND}
        assert np.all(np.isfinite(r.em))  # outside the band: EM kept
    # the projection puts at least half of the pixels the network left outside into the band
    outside_raw, outside = (raw.status != 0).mean(), (res.status != 0).mean()
    assert outside < min(0.1, 0.5 * outside_raw)
    # pixels the network put in the band keep its EM; only the others are projected
    keep = raw.status == 0
    assert keep.sum() > 500
    np.testing.assert_array_equal(res.status[keep], raw.status[keep])
    np.testing.assert_array_equal(res.em[keep], raw.em[keep])


def test_network_dtype_is_recorded_and_float32_on_request():
    """The shipped network's matrix products run on the hardware's native operand dtype
    (NETDTYPE card); bfloat16 and float32 operands give nearly the same statuses and EMs."""
    resp = default_response().regrid(DEEPEM_LOGT)
    rng = np.random.default_rng(12)
    t = np.full(6, 2.0)
    y = noisy_observation(
        np.asarray(forward(resp.K, random_dems(DEEPEM_LOGT, 1000, rng))), t, resp.channels, rng
    )
    kw = dict(sigma=sigma_values(y, t, resp.wavelength), channels=resp.wavelength)
    kw["degradation"] = False
    assert invert(y, "net", **kw).provenance["NETDTYPE"] == native_dtype()
    net16 = dataclasses.replace(load_default_predictor(), dtype="bfloat16")
    net32 = dataclasses.replace(net16, dtype="float32")
    res, f32 = invert(y, "net", predictor=net16, **kw), invert(y, "net", predictor=net32, **kw)
    assert res.provenance["NETDTYPE"] == "bfloat16" and f32.provenance["NETDTYPE"] == "float32"
    assert np.mean(res.status == f32.status) > 0.99
    both = res.has_em & f32.has_em
    rel = np.abs((res.total_em()[both] / f32.total_em()[both]).value - 1)
    assert np.median(rel) < 1e-2 and not np.array_equal(res.em, f32.em)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(tolfac=float("nan")), "tolfac"),
        (dict(tolfac=float("inf")), "tolfac"),
        (dict(tolfac=-1.0), "tolfac"),
        (dict(method="nn"), "method"),
        (dict(channels=None), "channels="),
        (dict(sigma=None), "sigma="),
        (dict(degradation=True), "observation time"),
        (dict(uncertainties=2.7), "whole number of replicates"),
        (dict(uncertainties=-1), "whole number of replicates"),
        (dict(tolfac=True), "tolfac"),
        (dict(rebin=4), "rebin=4 applies to files and Maps"),
    ],
)
def test_bad_requests(five_channel_pixels, kwargs, match):
    y, sig, _, _ = five_channel_pixels
    args = dict(method="bp", sigma=sig[:4], channels=FIVE, degradation=False) | kwargs
    method = args.pop("method")
    with pytest.raises(ValueError, match=match):
        invert(y[:4], method, **args)


def test_negative_intensities_are_counted(five_channel_pixels):
    """Negative intensities (taken as 0 by BP and the network) are counted in NEGCLIP, for
    arrays as for files (where the data layer clips and counts them)."""
    y, sig, _, _ = five_channel_pixels
    y = y[:20].copy()
    y[1, 2] = -5.0 * sig[1, 2]
    res = invert(y, "bp", sigma=sig[:20], channels=FIVE, degradation=False)
    assert res.provenance["NEGCLIP"] == np.sum(y < 0) >= 1
    stack = load_aia(sample_observation("01:44"))
    res = invert(stack, "bp")
    assert res.provenance["NEGCLIP"] == np.sum(stack.negative_count)


@pytest.mark.parametrize("method", ["bp", "net"])
def test_masked_intensities_are_invalid_pixels(five_channel_pixels, method):
    """Masked elements (numpy or astropy masked arrays) are not data: their pixels are
    INVALID_INPUT with NaN EM, whatever value sits under the mask; the others are untouched."""
    from astropy.utils.masked import Masked

    y, sig, _, _ = five_channel_pixels
    y, sig = y[:12], sig[:12]
    mask = np.zeros(y.shape, bool)
    mask[:3, 0] = True
    mask[5, 4] = True
    under = np.where(mask, 0.0, y)  # a plausible fill value: zero signal
    kw = dict(sigma=sig, channels=FIVE, degradation=False)
    plain = invert(y, method, **kw)
    for given in (np.ma.MaskedArray(under, mask=mask), Masked(under * u.DN / (u.s * u.pix), mask)):
        res = invert(given, method, **kw)
        bad = mask.any(-1)
        assert np.all(res.status[bad] == DEMStatus.INVALID_INPUT)
        assert np.all(np.isnan(res.em[bad]))
        np.testing.assert_array_equal(res.status[~bad], plain.status[~bad])
        np.testing.assert_allclose(res.em[~bad], plain.em[~bad], rtol=1e-6)
    masked_sigma = np.ma.MaskedArray(sig, mask=mask)
    res = invert(y, method, sigma=masked_sigma, channels=FIVE, degradation=False)
    assert np.all(res.status[mask.any(-1)] == DEMStatus.INVALID_INPUT)


@pytest.mark.parametrize(
    "values", [lambda y: y + 1j * y, lambda y: y > 1.0, lambda y: y.astype(str)]
)
def test_intensities_that_are_not_real_numbers_are_refused(five_channel_pixels, values):
    y, sig, _, _ = five_channel_pixels
    with pytest.raises(TypeError, match="intensities must hold real numbers"):
        invert(values(y[:4]), "bp", sigma=sig[:4], channels=FIVE, degradation=False)
    with pytest.raises(TypeError, match="sigma must hold real numbers"):
        invert(y[:4], "bp", sigma=values(sig[:4]), channels=FIVE, degradation=False)


def test_scalar_and_empty_intensities_are_errors():
    with pytest.raises(ValueError, match="last axis must hold the 5 channels"):
        invert(np.float64(3.0), "bp", sigma=1.0, channels=FIVE, degradation=False)
    with pytest.raises(ValueError, match="hold no pixel"):
        invert(np.zeros((0, 5)), "bp", sigma=np.ones((0, 5)), channels=FIVE, degradation=False)


def test_degenerate_channels(five_channel_pixels):
    y, sig, _, _ = five_channel_pixels
    with pytest.raises(ValueError, match="at least 3 channels"):
        invert(y[:4, 1:2], "bp", sigma=sig[:4, 1:2], channels=[171] * u.AA, degradation=False)
    nan = y[:4].copy()
    nan[:, 2] = np.nan
    with pytest.raises(ValueError, match="193 Å has no finite pixel"):
        invert(nan, "bp", sigma=sig[:4], channels=FIVE, degradation=False)
    zero = y[:4].copy()
    zero[:, 0] = 0.0
    with pytest.warns(DEMWarning, match="131 Å has no positive pixel"):
        invert(zero, "bp", sigma=sig[:4], channels=FIVE, degradation=False)
    with pytest.raises(ValueError, match="takes channels"):
        invert(y[:4, :4], "net", sigma=sig[:4, :4], channels=FIVE[:4], degradation=False)


def test_invert_equals_what_the_cli_writes(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    write_aia_set(data)
    stack = load_aia(data)
    for method in ("bp", "net"):
        out = tmp_path / method
        r = CliRunner().invoke(main, ["invert", str(data), "--method", method, "--out", str(out)])
        assert r.exit_code == 0, r.output
        (path,) = out.glob(f"dem_{method}_*.fits")
        cube = read_dem_cube(path)
        res = invert(stack, method)
        np.testing.assert_array_equal(cube.extras["status"], res.status)
        np.testing.assert_array_equal(cube.em.to_value(u.cm**-5), res.em)
        np.testing.assert_array_equal(cube.extras["chi2"], res.chi2)
        assert cube.header["METHOD"] == method and cube.header["DEGTABLE"].startswith("aia_V10")


@pytest.mark.slow
def test_real_synoptic_bp_with_default_calibration(tmp_path):
    """Issue 11: the real 2024-10-04 synoptic set, five channels, default options."""
    from conftest import shared_path

    data = shared_path("aia", "synoptic_2024-10-04")
    args = ["invert", str(data), "--method", "bp", "--channels", "131,171,193,211,335"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.glob("dem_bp_*.fits")
    cube = read_dem_cube(path)
    status = cube.extras["status"]
    valid = status != DEMStatus.INVALID_INPUT
    assert (status[valid] == DEMStatus.INFEASIBLE).mean() <= 0.01
    h = cube.header
    assert h["NSAMPLE"] == 16 and h["DEGTABLE"].startswith("aia_V10") and h["DEGVER"] == 10
    got = [h[f"DEGF{c:04d}"] for c in (131, 171, 193, 211, 335)]
    np.testing.assert_allclose(got, [0.51, 0.74, 0.49, 0.40, 0.17], atol=0.005)
    # without the correction, a central block is solved as BP does with the undegraded response
    stack = load_aia(data, FIVE)
    block = (slice(384, 512), slice(384, 512))
    y, s = stack.data[block], stack.sigma()[block]
    res = invert(y, "bp", sigma=s, channels=FIVE, degradation=False)
    ref = bp.solve(
        y, s, default_response().regrid(DEEPEM_LOGT).select(FIVE), cheung_basis(DEEPEM_LOGT)
    )
    np.testing.assert_array_equal(res.status, ref.status)
    assert (res.status == DEMStatus.INFEASIBLE).sum() > (
        status[block] == DEMStatus.INFEASIBLE
    ).sum()


def test_exact_consistency_puts_every_bp_feasible_pixel_in_band(five_channel_pixels):
    y, sig, _, deg = five_channel_pixels
    kw = dict(sigma=sig, channels=FIVE, obstime=T_OBS)
    res = invert(y, "net", consistency="exact", **kw)
    ref = bp.solve(y, sig, deg, cheung_basis(DEEPEM_LOGT))  # independent: the degraded response
    feasible = ref.status == 0
    assert np.all(res.status[feasible] == DEMStatus.SOLVED)
    lo, hi = (np.asarray(b, np.float64) for b in res.band())
    r = res.em.astype(np.float64) @ np.asarray(res.response.K, np.float64).T
    inside = np.all((r >= lo * (1 - 1e-5)) & (r <= hi * (1 + 1e-5)), -1)
    assert np.all(inside[res.status == DEMStatus.SOLVED])
    projected = invert(y, "net", consistency=True, **kw)
    assert res.provenance["BPFALLBK"] == int(np.sum(feasible & (projected.status != 0)))
    with pytest.raises(ValueError, match="consistency"):
        invert(y, "net", consistency="yes", **kw)


def test_pixels_left_outside_keep_the_network_em(five_channel_pixels):
    """Whatever the consistency step, a pixel it leaves OUTSIDE_BAND keeps the network's own
    EM (pixels whose band BP cannot reach are among them), and so does every pixel the network
    put inside the band."""
    y, sig, _, deg = five_channel_pixels
    kw = dict(sigma=sig, channels=FIVE, obstime=T_OBS)
    alone = invert(y, "net", consistency=False, **kw)
    first = bp.ToleranceSchedule(retry_factors=())
    ref = bp.solve(y, sig, deg, cheung_basis(DEEPEM_LOGT), schedule=first)  # independent
    assert (ref.status == DEMStatus.INFEASIBLE).sum() >= 5
    for consistency in (True, "exact"):
        res = invert(y, "net", consistency=consistency, **kw)
        kept = (res.status == DEMStatus.OUTSIDE_BAND) | (alone.status == DEMStatus.SOLVED)
        np.testing.assert_array_equal(res.em[kept], alone.em[kept])
        moved = (res.status == DEMStatus.SOLVED) & (alone.status == DEMStatus.OUTSIDE_BAND)
        assert moved.any() and not np.all(res.em[moved] == alone.em[moved], -1).any()
    infeasible = ref.status == DEMStatus.INFEASIBLE
    projected = invert(y, "net", consistency=True, **kw)
    assert np.all(projected.status[infeasible] == DEMStatus.OUTSIDE_BAND)


def test_bp_fallback_gets_only_pixels_with_a_network_em(five_channel_pixels, monkeypatch):
    """Invalid pixels (no network EM) are INVALID_INPUT and never handed to BP."""
    from deepem_jax import pipeline

    y, sig, _, _ = five_channel_pixels
    y = y[:50].copy()
    y[:10, 2] = np.nan
    sent = []
    solve = pipeline._bp_solve
    monkeypatch.setattr(pipeline, "_bp_solve", lambda y, *a: sent.append(y) or solve(y, *a))
    res = invert(y, "net", sigma=sig[:50], channels=FIVE, obstime=T_OBS)
    assert np.all(res.status[:10] == DEMStatus.INVALID_INPUT)
    assert all(np.all(np.isfinite(a)) for a in sent)


def test_result_as_ndcube_and_float64_fits(tmp_path):
    from astropy.io import fits

    from deepem_jax.data import sample_observation

    res = invert(load_aia(sample_observation()), "bp")
    cube = res.to_ndcube()
    assert cube.data.shape == (18, *res.shape)
    np.testing.assert_allclose(cube.axis_world_coords("temperature")[0], DEEPEM_LOGT, atol=1e-9)
    np.testing.assert_array_equal(np.moveaxis(cube.data, 0, -1), res.em)
    path = res.to_fits(tmp_path / "dem.fits", dtype=np.float64)
    assert fits.getheader(path)["BITPIX"] == -64


def test_degraded_response_is_not_corrected_twice(five_channel_pixels):
    y, sig, resp, _ = five_channel_pixels
    with pytest.raises(ValueError, match="already degraded"):
        invert(
            y[:4], "bp", sigma=sig[:4], channels=FIVE, obstime=T_OBS, response=resp.degrade(T_OBS)
        )


def test_result_keeps_only_the_callers_float_arrays(five_channel_pixels):
    y, sig, _, _ = five_channel_pixels
    y, sig = y[:50], sig[:50]
    dn = u.DN / (u.s * u.pix)
    kw = dict(channels=FIVE, obstime=T_OBS)
    q = y * dn  # a float64 Quantity in the intensity unit: shared, not copied
    kept = invert(q, "bp", sigma=sig * dn, **kw)
    assert np.shares_memory(kept.intensities, q) and kept.intensities.dtype == np.float64
    # converted values (other units, integers) are the result's own float32 copies
    conv = invert((y * dn).to(dn / 1000), "bp", sigma=sig * dn, **kw)
    assert conv.intensities.dtype == np.float32
    ints = invert(np.round(y).astype(np.int32), "bp", sigma=sig, **kw)
    assert ints.intensities.dtype == np.float32


def test_status_isin_equals_numpy_isin():
    rng = np.random.default_rng(0)
    status = rng.integers(-128, 128, (50, 40)).astype(np.int8)
    for codes in ([0, 5, 8], [-1, 127, -128], [300, 3], []):
        np.testing.assert_array_equal(DEMStatus.isin(status, codes), np.isin(status, codes))
        np.testing.assert_array_equal(
            DEMStatus.isin(status.astype(np.int32), codes), np.isin(status, codes)
        )
    zero_d = DEMStatus.isin(np.int8(5), [5])
    assert isinstance(zero_d, np.ndarray) and zero_d.shape == () and zero_d
