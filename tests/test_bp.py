"""Basis Pursuit (deepem_jax.bp): the JAX dual simplex against SciPy's HiGHS on the real AIA
response tables, physics recovery, bad input, batching, dtypes and gradients."""

from __future__ import annotations

import dataclasses

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax import bp
from deepem_jax.basis import cheung_basis, dictionary
from deepem_jax.forward import forward, gaussian_dem, noisy_observation, random_dems
from deepem_jax.response import DEEPEM_LOGT, TemperatureResponse, default_response
from deepem_jax.uncertainty import aia_sigma

BASIS = cheung_basis(DEEPEM_LOGT)


@pytest.fixture(scope="module")
def genx_response():
    from conftest import shared_path

    path = shared_path("deepem", "PaulJWright_DeepEM", "DeepEM_Data", "aia_temperature_resp.genx")
    return TemperatureResponse.from_genx(path).regrid(DEEPEM_LOGT)


def _dict64(response):
    with jax.enable_x64(True):
        return np.asarray(dictionary(response, BASIS), dtype=np.float64)


def _observe(response, n, seed, exptime=2.0):
    """Noisy intensities (n, C) of random DEMs and their AIA sigma, DN s^-1 pix^-1."""
    rng = np.random.default_rng(seed)
    em = random_dems(DEEPEM_LOGT, n, rng)
    with jax.enable_x64(True):
        y0 = np.asarray(forward(response.K, em))
    y = noisy_observation(y0, exptime, response.channels, rng)
    sig = aia_sigma(np.maximum(y, 0) * u.DN / (u.s * u.pix), exptime * u.s, response.wavelength)
    return y, sig.value


def _compare_with_highs(D, lower, upper, x, status):
    """Disagreement counts of solutions ``x`` (N, n) with ``status`` (N,) against HiGHS on the
    same bounds."""
    ref = bp.highs_lp(D, lower, upper)
    st = np.asarray(status)
    x = np.asarray(x, np.float64)
    ok_ref, ok = ref.status == 0, st == 0
    both = ok & ok_ref
    rel_obj = np.abs(x.sum(-1) - ref.objective) / np.maximum(np.abs(ref.objective), 1e-30)
    Dx = x @ D.T
    scale = np.maximum(np.abs(upper), 1e-30)
    viol = np.max(np.maximum(lower - Dx, 0) + np.maximum(Dx - upper, 0), -1) / scale.max(-1)
    counts = {
        "verdict": int(np.sum(ok != ok_ref)),
        "objective>1e-4": int(np.sum(both & (rel_obj > 1e-4))),
        "constraint>1e-5": int(np.sum(ok & (viol > 1e-5))),
        "max_iter": int(np.sum(st == bp.BPStatus.MAX_ITER)),
        "infeasible(highs)": int(np.sum(ref.status == bp.BPStatus.INFEASIBLE)),
        "n": len(st),
    }
    print("disagreements vs HiGHS:", counts)
    return counts


def _check_against_highs(genx_response, n_highs, seed):
    D = _dict64(genx_response)
    y, sig = _observe(genx_response, 10_000, seed)
    # tolfac 1.0 instead of 1.4 makes ~10% of the pixels infeasible
    with jax.enable_x64(True):
        lower, upper = (np.asarray(a) for a in bp.bounds(y, sig, 1.0, 1.0))
    # the certified float32 path of the host driver is what users get; no retries, no
    # LOW_SIGNAL, so every pixel is solved on exactly these bounds
    once = bp.ToleranceSchedule(retry_factors=(), min_signal=0.0)
    res = bp.solve(y, sig, genx_response, BASIS, tolfac=1.0, schedule=once)
    assert np.all(res.tolfac == 1.0)
    pick = np.random.default_rng(seed).choice(len(y), n_highs, replace=False)
    c = _compare_with_highs(D, lower[pick], upper[pick], res.coeffs[pick], res.status[pick])
    assert c["infeasible(highs)"] > 0.02 * n_highs  # the set exercises infeasibility
    assert c["verdict"] <= 0.001 * n_highs
    assert c["objective>1e-4"] == 0
    assert c["constraint>1e-5"] == 0
    assert c["max_iter"] == 0


@pytest.mark.slow
def test_matches_highs_10k_pixels(genx_response):
    """All 10^4 pixels against HiGHS (~15-30 s of HiGHS)."""
    _check_against_highs(genx_response, 10_000, seed=0)


def test_raw_float32_and_float64_pivots_match_highs(genx_response, x64):
    D = _dict64(genx_response)
    y, sig = _observe(genx_response, 500, seed=2)
    lower, upper = (np.asarray(a) for a in bp.bounds(y, sig, 1.4, 1.0))
    for dt in (np.float32, np.float64):
        res = bp.solve_lp(D, lower, upper, dtype=dt)
        assert res.x.dtype == dt
        c = _compare_with_highs(D, lower, upper, res.x, res.status)
        assert c["verdict"] == 0
        tol = 1e-3 if dt == np.float32 else 0  # float32 pivots alone, before certification
        assert c["objective>1e-4"] <= tol * len(y)


@pytest.mark.slow
def test_driver_jax_equals_driver_highs_with_retries():
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 300, seed=3, exptime=0.5)
    jx = bp.solve(y, sig, resp, BASIS, tolfac=0.8)
    hi = bp.solve(y, sig, resp, BASIS, tolfac=0.8, solver=bp.HiGHS())
    assert set(np.unique(hi.tolfac)) >= {0.8, 0.8 * 1.5}  # retries happened
    np.testing.assert_array_equal(jx.status, hi.status)
    np.testing.assert_array_equal(jx.tolfac, hi.tolfac)
    np.testing.assert_allclose(jx.objective, hi.objective, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(jx.synthetic, hi.synthetic, rtol=1e-4, atol=1e-6)


def test_gaussian_dem_recovery():
    """Cheung et al. (2015)-style check on noiseless single Gaussians with AIA sigma (2 s).
    Total EM 1e29 cm^-5: BP minimises total EM within +-1.4 sigma, so at 1e28 cm^-5 hot wide
    DEMs come out up to ~28% low (measured), beyond the 20% asked here."""
    resp = default_response().regrid(DEEPEM_LOGT)
    peaks, widths = np.meshgrid(np.arange(5.8, 6.61, 0.1), [0.1, 0.2, 0.3], indexing="ij")
    em = gaussian_dem(DEEPEM_LOGT, 1e29, peaks.ravel(), widths.ravel())
    with jax.enable_x64(True):
        y = np.asarray(forward(resp.K, em))
    sig = aia_sigma(y * u.DN / (u.s * u.pix), 2.0 * u.s, resp.wavelength).value
    res = bp.solve(y, sig, resp, BASIS)
    assert np.all(res.status == bp.BPStatus.SOLVED)
    total = res.em.sum(-1)
    np.testing.assert_allclose(total, em.sum(-1), rtol=0.2)
    logt_w = (res.em * DEEPEM_LOGT).sum(-1) / total
    logt_true = (em * DEEPEM_LOGT).sum(-1) / em.sum(-1)
    assert np.max(np.abs(logt_w - logt_true)) < 0.2


def test_bad_input_is_flagged_not_raised():
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 8, seed=4)
    y[0, 1] = np.nan
    y[1, 2] = np.inf
    sig[2, 3] = 0.0
    sig[3, 0] = np.nan
    y[4] = 0.0  # no signal
    y[5, 0] = -50.0  # negative: clipped to 0 like SolarSoft
    res = bp.solve(y, sig, resp, BASIS)
    S = bp.BPStatus
    assert list(res.status[:5]) == [S.INVALID_INPUT] * 4 + [S.LOW_SIGNAL]
    assert np.all(np.isnan(res.coeffs[:4])) and np.all(np.isnan(res.em[:4]))
    assert np.all(res.coeffs[4] == 0)
    clipped = y[5:6].copy()
    clipped[0, 0] = 0.0
    ref = bp.solve(clipped, sig[5:6], resp, BASIS, solver=bp.HiGHS())
    np.testing.assert_allclose(res.objective[5], ref.objective[0], rtol=1e-4)
    assert all(s.message for s in S)


def test_solve_lp_flags_nonfinite_and_crossed_bounds():
    D = np.array([[1.0, 2.0], [3.0, 1.0]])
    lower = np.array([[1.0, 1.0], [np.nan, 1.0], [2.0, 1.0], [1.0, 1.0]])
    upper = np.array([[2.0, 2.0], [2.0, 2.0], [1.0, 2.0], [1.0, 1.0]])
    res = bp.solve_lp(D, lower, upper)
    assert list(res.status) == [0, bp.BPStatus.INVALID_INPUT, bp.BPStatus.INFEASIBLE, 0]
    # row 3: x = (0.2, 0.4) is the unique feasible point
    np.testing.assert_allclose(res.x[3], [0.2, 0.4], rtol=1e-5)
    assert np.all(res.x[1:3] == 0)
    with pytest.raises(ValueError, match="x64"):
        bp.solve_lp(D, lower, upper, dtype=np.float64)
    capped = bp.solve_lp(D, lower[:1] * 5, upper[:1] * 5, max_pivots=1)
    assert capped.status[0] == bp.BPStatus.MAX_ITER and np.all(capped.x == 0)


def test_errors_on_mismatch_and_units():
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 4, seed=5)
    with pytest.raises(ValueError, match="channels"):
        bp.solve(y[:, :5], sig[:, :5], resp, BASIS)
    with pytest.raises(ValueError, match="broadcast"):
        bp.solve(y, sig[:2], resp, BASIS)
    with pytest.raises(u.UnitConversionError, match="DN"):
        bp.solve(y * u.erg, sig, resp, BASIS)
    with pytest.raises(ValueError, match="grid"):
        bp.solve(y, sig, default_response(), BASIS)
    unit = u.DN / (u.s * u.pix)
    q = bp.solve(y * unit, (sig * unit).to(u.DN / (u.min * u.pix)), resp, BASIS)
    plain = bp.solve(y, sig, resp, BASIS)
    np.testing.assert_allclose(q.coeffs, plain.coeffs, rtol=1e-6)


@pytest.mark.parametrize("tolfac", [np.nan, np.inf, -np.inf, 0.0, -1.0])
def test_tolfac_must_be_finite_and_positive(tolfac):
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 2, seed=5)
    with pytest.raises(ValueError, match="tolfac must be finite and > 0"):
        bp.solve(y, sig, resp, BASIS, tolfac=tolfac)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: bp.DualSimplex(precision="float16"), "precision"),
        (lambda: bp.DualSimplex(max_pivots=0), "max_pivots"),
        (lambda: bp.DualSimplex(chunk_size=1.5), "chunk_size"),
        (lambda: bp.DualSimplex(chunk_size=True), "chunk_size"),
        (lambda: bp.ToleranceSchedule(symmbuff=np.nan), "symmbuff"),
        (lambda: bp.ToleranceSchedule(symmbuff=-1.0), "symmbuff"),
        (lambda: bp.ToleranceSchedule(min_signal=np.inf), "min_signal"),
        (lambda: bp.ToleranceSchedule(retry_factors=(1.5, 0.0)), "retry factor"),
        (lambda: bp.ToleranceSchedule(retry_factors=(np.nan,)), "retry factor"),
        (lambda: bp.ToleranceSchedule(retry_factors=1.5), "sequence"),
    ],
)
def test_solver_objects_reject_bad_options(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_solver_objects_are_frozen_and_checked_by_solve():
    sched = bp.ToleranceSchedule(retry_factors=[2, np.float32(3.0)])
    assert sched.retry_factors == (2.0, 3.0) and sched.factors == (1.0, 2.0, 3.0)
    assert hash(sched) == hash(bp.ToleranceSchedule(retry_factors=(2.0, 3.0)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        bp.DualSimplex().precision = "float64"  # type: ignore[misc]
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 2, seed=5)
    with pytest.raises(TypeError, match="solver"):
        bp.solve(y, sig, resp, BASIS, solver="highs")
    with pytest.raises(TypeError, match="schedule"):
        bp.solve(y, sig, resp, BASIS, schedule=(1.5, 2.25))


@pytest.mark.parametrize("solver", [bp.DualSimplex(chunk_size=64), bp.HiGHS()])
def test_progress_bar_ends_at_the_pixel_count_with_retries(monkeypatch, solver):
    import tqdm.auto

    bars = []

    class Recording(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recording)
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 150, seed=12, exptime=0.5)
    y[:40, 0] *= 6.0  # too much 94 A for the other channels: infeasible at tolfac 1.4
    y[140, 2] = np.nan  # flagged, not solved
    y[141] = 0.0
    with jax.enable_x64(True):
        lower, upper = (np.asarray(a) for a in bp.bounds(y[:140], sig[:140], 1.4, 1.0))
    first_pass = bp.highs_lp(_dict64(resp), lower, upper)
    assert np.sum(first_pass.status == bp.BPStatus.INFEASIBLE) >= 10  # retries will happen
    res = bp.solve(y, sig, resp, BASIS, solver=solver, progress=True)
    assert np.any(res.tolfac[:140] > 1.4)
    assert len(bars) == 1
    assert bars[0].total == 150 and bars[0].n == 150


def test_all_zero_dictionary_column_gets_zero():
    resp = default_response().regrid(DEEPEM_LOGT)
    K = np.array(resp.K)
    K[:, 0] = 0.0  # nothing sees log T 5.5: the delta basis function there is all zero
    dead = TemperatureResponse(K, resp.channels, resp.logt, "dead-bin")
    D = _dict64(dead)
    assert np.all(D[:, 0] == 0)
    y, sig = _observe(resp, 50, seed=6)
    res = bp.solve(y, sig, dead, BASIS)
    assert np.all(res.coeffs[..., 0] == 0)
    with jax.enable_x64(True):
        lower, upper = (np.asarray(a) for a in bp.bounds(np.maximum(y, 0), sig, 1.4, 1.0))
    ref = bp.highs_lp(D[:, 1:], lower, upper)
    solved = res.status == 0
    np.testing.assert_array_equal(solved, ref.status == 0)
    np.testing.assert_allclose(res.objective[solved], ref.objective[solved], rtol=1e-4)


def test_batch_shapes_and_float32():
    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 12, seed=7)
    flat = bp.solve(y, sig, resp, BASIS)
    img = bp.solve(y.reshape(3, 4, 6), sig.reshape(3, 4, 6), resp, BASIS)
    assert img.coeffs.shape == (3, 4, BASIS.n_basis) and img.status.shape == (3, 4)
    assert img.em.shape == (3, 4, len(DEEPEM_LOGT)) and img.synthetic.shape == (3, 4, 6)
    assert img.coeffs.dtype == np.float32 and img.status.dtype == np.int8
    np.testing.assert_array_equal(img.coeffs.reshape(12, -1), flat.coeffs)
    one = [bp.solve(y[i], sig[i], resp, BASIS) for i in (0, 5, 11)]
    for i, r in zip((0, 5, 11), one, strict=True):
        assert r.coeffs.shape == (BASIS.n_basis,)
        np.testing.assert_allclose(r.coeffs, flat.coeffs[i], rtol=1e-5, atol=1e-7)
    D = _dict64(resp)
    with jax.enable_x64(True):
        lower, upper = bp.bounds(np.maximum(y, 0), sig, 1.4, 1.0)
    lp = bp.solve_lp(D.astype(np.float32), lower.astype(np.float32), upper.astype(np.float32))
    assert lp.x.dtype == jnp.float32 and lp.objective.dtype == jnp.float32
    vm = jax.vmap(lambda lo, hi: bp.solve_lp(D, lo, hi))(
        lower.astype(np.float32), upper.astype(np.float32)
    )
    np.testing.assert_allclose(vm.x, lp.x, rtol=1e-6, atol=1e-8)


def test_five_channels():
    resp = default_response().regrid(DEEPEM_LOGT).select([131, 171, 193, 211, 335] * u.AA)
    y, sig = _observe(resp, 200, seed=8)
    res = bp.solve(y, sig, resp, BASIS)
    ref = bp.solve(y, sig, resp, BASIS, solver=bp.HiGHS())
    assert res.coeffs.shape == (200, BASIS.n_basis) and res.synthetic.shape == (200, 5)
    np.testing.assert_array_equal(res.status, ref.status)
    np.testing.assert_allclose(res.objective, ref.objective, rtol=1e-4, atol=1e-9)


@pytest.mark.slow
def test_gradient_matches_finite_differences(x64):
    resp = default_response().regrid(DEEPEM_LOGT)
    D = jnp.asarray(_dict64(resp))
    y, sig = _observe(resp, 40, seed=9)
    y = jnp.asarray(np.maximum(y, 0.0))
    sig = jnp.asarray(sig)
    w = jnp.asarray(np.random.default_rng(0).uniform(0.5, 1.5, BASIS.n_basis))

    def f(yy, ss, DD):
        return jnp.sum(bp.solve_jax(yy, ss, DD).x * w, -1)

    base = bp.solve_jax(y, sig, D)
    g_y = jax.vmap(jax.grad(f), (0, 0, None))(y, sig, D)
    h = 1e-6 * y
    checked = 0
    for i in range(len(y)):
        if base.status[i] != 0:
            continue
        for c in range(y.shape[1]):
            if y[i, c] == 0:
                continue  # max(y, 0) has a kink there
            e = jnp.zeros_like(y[i]).at[c].set(h[i, c])
            up, dn = bp.solve_jax(y[i] + e, sig[i], D), bp.solve_jax(y[i] - e, sig[i], D)
            if not (np.array_equal(up.basis, base.basis[i]) and np.array_equal(dn.basis, up.basis)):
                continue  # a basis change inside the step: not a smooth point
            fd = (jnp.sum(up.x * w) - jnp.sum(dn.x * w)) / (2 * h[i, c])
            atol = 1e-6 * float(jnp.max(jnp.abs(g_y[i])))  # FD round-off on zero entries
            np.testing.assert_allclose(g_y[i, c], fd, rtol=1e-5, atol=atol)
            checked += 1
    assert checked > 50
    # d/dD on one solved pixel, one entry in the basis
    i = int(np.flatnonzero(np.asarray(base.status) == 0)[0])
    j = int(base.basis[i][base.basis[i] < BASIS.n_basis][0])
    g_D = jax.grad(f, 2)(y[i], sig[i], D)
    dD = jnp.zeros_like(D).at[0, j].set(1e-7 * D[0, j])
    fd = (f(y[i], sig[i], D + dD) - f(y[i], sig[i], D - dD)) / (2e-7 * D[0, j])
    np.testing.assert_allclose(g_D[0, j], fd, rtol=1e-5)


@pytest.mark.slow
def test_gradient_zero_and_finite_on_failed_pixels(x64):
    resp = default_response().regrid(DEEPEM_LOGT)
    D = jnp.asarray(_dict64(resp))
    y = jnp.array([[np.nan] * 6, [0.0] * 6, [100.0, 0, 0, 0, 0, 0], [1.0, 5, 300, 500, 200, 10]])
    sig = jnp.full((4, 6), 0.5)
    res = bp.solve_jax(y, sig, D)
    S = bp.BPStatus
    assert list(res.status) == [S.INVALID_INPUT, S.LOW_SIGNAL, S.INFEASIBLE, S.SOLVED]
    g = jax.grad(lambda yy: jnp.sum(jnp.nan_to_num(bp.solve_jax(yy, sig, D).x)))(y)
    assert np.all(np.isfinite(g))
    assert np.all(g[:3] == 0) and np.any(g[3] != 0)


def test_host_blocks_match_highs(monkeypatch):
    """solve() in small host blocks (bounded memory) gives HiGHS's verdicts and objectives,
    with invalid pixels inside a block still flagged."""
    import deepem_jax.bp._solve as S

    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 300, seed=11)
    y[5, 0] = np.nan
    monkeypatch.setattr(S, "_BLOCK", 64)
    res = bp.solve(y, sig, resp, BASIS, solver=bp.DualSimplex(precision="float64"))
    ref = bp.solve(y, sig, resp, BASIS, solver=bp.HiGHS())
    np.testing.assert_array_equal(res.status, ref.status)
    assert res.status[5] == bp.BPStatus.INVALID_INPUT
    ok = ref.status == 0
    np.testing.assert_allclose(res.objective[ok], ref.objective[ok], rtol=1e-6)
    np.testing.assert_array_equal(res.tolfac[ok], ref.tolfac[ok])


def test_inputs_streamed_per_block_and_coeffs_opt_out(monkeypatch):
    """Inputs are converted to float64 block by block, so float32 and integer intensities give
    exactly what their float64 copies give; ``coeffs=False`` drops only the coefficients; a
    caller's bar is advanced across calls (and left to the caller)."""
    import deepem_jax.bp._solve as S

    resp = default_response().regrid(DEEPEM_LOGT)
    y, sig = _observe(resp, 200, seed=13)
    y32, s32 = y.astype(np.float32), sig.astype(np.float32)
    monkeypatch.setattr(S, "_BLOCK", 64)
    ref = bp.solve(y32.astype(np.float64), s32.astype(np.float64), resp, BASIS)
    res = bp.solve(y32, s32, resp, BASIS, coeffs=False)
    assert res.coeffs is None and ref.coeffs.shape == (200, BASIS.n_basis)
    for name in ("em", "status", "tolfac", "iterations", "synthetic", "objective"):
        np.testing.assert_array_equal(getattr(res, name), getattr(ref, name), err_msg=name)
    counts = np.round(y[:70]).astype(np.int32)
    a = bp.solve(counts, "sqrt", resp, BASIS)
    b = bp.solve(counts.astype(np.float64), "sqrt", resp, BASIS)
    np.testing.assert_array_equal(a.coeffs, b.coeffs)
    np.testing.assert_array_equal(a.status, b.status)

    class Bar:
        n, closed = 0, False

        def update(self, k):
            self.n += k

        def set_postfix_str(self, s):
            pass

        def close(self):
            self.closed = True

    bar = Bar()
    for sl in (slice(0, 120), slice(120, 200)):
        bp.solve(y[sl], sig[sl], resp, BASIS, progress=bar, coeffs=False)
    assert bar.n == 200 and not bar.closed
    bar = Bar()  # pixels starting at different bands: each still counted once
    bp.solve(y[:200], sig[:200], resp, BASIS, progress=bar, start=np.arange(200) % 3)
    assert bar.n == 200
