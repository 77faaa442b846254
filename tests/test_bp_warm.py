"""Warm-started Basis Pursuit (deepem_jax.bp.BasisTable): same answers as HiGHS and as the cold
dual simplex, fewer pivots, any row scaling of the dictionary, bad tables rejected."""

from __future__ import annotations

import astropy.units as u
import jax
import numpy as np
import pytest

from deepem_jax import bp
from deepem_jax.basis import cheung_basis, dictionary
from deepem_jax.bp._warm import prove_infeasible
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.uncertainty import aia_sigma

BASIS = cheung_basis(DEEPEM_LOGT)
FIVE = [131, 171, 193, 211, 335]


@pytest.fixture(scope="module")
def response():
    return default_response().regrid(DEEPEM_LOGT).select(FIVE * u.AA)


@pytest.fixture(scope="module")
def D(response):
    with jax.enable_x64(True):
        return np.asarray(dictionary(response, BASIS), np.float64)


def _observations(response, n, seed):
    """Intensities and sigma (N, C) of noisy random-DEM pixels (n_sample 16, exposures 2 s)."""
    rng = np.random.default_rng(seed)
    em = random_dems(DEEPEM_LOGT, n, rng)
    with jax.enable_x64(True):
        y0 = np.asarray(forward(response.K, em))
    y = noisy_observation(y0, 2.0, response.channels, rng, n_sample=16)
    dn = u.DN / (u.s * u.pix)
    sig = aia_sigma(np.maximum(y, 0) * dn, 2.0 * u.s, response.wavelength, n_sample=16).value
    return y, sig


def _bands(response, n, seed, tolfac=1.4):
    """BP bands (N, C) of :func:`_observations`."""
    y, sig = _observations(response, n, seed)
    with jax.enable_x64(True):
        return tuple(np.asarray(a) for a in bp.bounds(y, sig, tolfac))


@pytest.fixture(scope="module")
def table(response, D):
    """Learned on pixels other than the ones the tests solve."""
    return bp.learn_table(D, *_bands(response, 20_000, seed=100), FIVE)


def _same_as_highs(D, lower, upper, res):
    ref = bp.highs_lp(D, lower, upper)
    st = np.asarray(res.status)
    both = (st == 0) & (ref.status == 0)
    obj = np.asarray(res.objective, np.float64)
    rel = np.abs(obj - ref.objective)[both] / np.maximum(ref.objective[both], 1e-30)
    print("verdict disagreements:", int(np.sum((st == 0) != (ref.status == 0))))
    print("max relative objective difference:", rel.max())
    assert np.array_equal(st == 0, ref.status == 0)
    return rel


def test_warm_start_matches_highs_with_fewer_pivots(response, D, table, x64):
    lower, upper = _bands(response, 1000, seed=1, tolfac=1.0)  # some infeasible pixels
    cold = bp.solve_lp(D, lower, upper, dtype=np.float64)
    warm = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=table)
    assert np.sum(np.asarray(cold.status) == 1) > 10
    assert _same_as_highs(D, lower, upper, warm).max() < 1e-9
    assert np.array_equal(np.asarray(warm.status), np.asarray(cold.status))
    first_try = np.mean((np.asarray(warm.iterations) == 0) & (np.asarray(warm.status) == 0))
    print("certified at the first try:", first_try)
    assert first_try > 0.5
    assert np.mean(warm.iterations) < 0.5 * np.mean(cold.iterations)


def test_warm_start_float32_matches_highs(response, D, table):
    lower, upper = _bands(response, 1000, seed=2)
    warm = bp.solve_lp(D, lower, upper, dtype=np.float32, warm_start=table)
    assert np.mean(_same_as_highs(D, lower, upper, warm) > 1e-4) < 1e-3


def test_rows_scaled_like_a_degraded_response(response, D, table, x64):
    """A degraded response is the undegraded one with rows scaled: the table serves it."""
    f = np.array([0.51, 0.74, 0.49, 0.40, 0.17])
    lower, upper = _bands(response, 2000, seed=3, tolfac=1.0)  # some infeasible pixels
    Df, lo_f, hi_f = f[:, None] * D, lower * f, upper * f
    warm = bp.solve_lp(Df, lo_f, hi_f, dtype=np.float64, warm_start=table)
    _same_as_highs(Df, lo_f, hi_f, warm)
    same = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=table)
    np.testing.assert_array_equal(np.asarray(warm.status), np.asarray(same.status))
    np.testing.assert_array_equal(np.asarray(warm.iterations), np.asarray(same.iterations))
    by_ray = np.asarray(prove_infeasible(table.prepare(Df, np.float64)["rays"], lo_f, hi_f))
    assert by_ray.sum() > 5  # the rays serve the scaled rows too
    assert np.all(np.asarray(warm.status)[by_ray] == 1)


def test_rays_prove_most_infeasible_pixels_without_a_pivot(response, D, table, x64):
    """The table's Farkas rays (learned from other pixels) prove most infeasible pixels, in
    float64 and float32 alike; each pixel they prove is infeasible for HiGHS and ends
    INFEASIBLE without a pivot."""
    assert len(table.rays) > 0
    lower, upper = _bands(response, 2000, seed=6, tolfac=1.0)
    ref = bp.highs_lp(D, lower, upper)
    by_ray = np.asarray(prove_infeasible(table.prepare(D, np.float64)["rays"], lower, upper))
    by_ray32 = table.proves_infeasible(D, lower.astype(np.float32), upper.astype(np.float32))
    infeasible = ref.status == 1
    print(f"{infeasible.sum()} infeasible, {by_ray.sum()} / {by_ray32.sum()} proven by a ray")
    assert np.all(infeasible[by_ray]) and np.all(by_ray[by_ray32])
    assert by_ray32.sum() > 0.5 * infeasible.sum()
    warm = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=table)
    assert np.all(np.asarray(warm.status)[by_ray] == 1)
    assert np.all(np.asarray(warm.iterations)[by_ray] == 0)
    np.testing.assert_array_equal(np.asarray(warm.status) == 0, ref.status == 0)


def test_any_ray_is_a_sound_test(response, D, x64):
    """The ray test is a proof whatever the rays: random rays never flag a band that a
    non-negative x meets, and every band they do flag is infeasible for HiGHS."""
    rng = np.random.default_rng(7)
    C, n = D.shape
    rays = rng.normal(size=(500, C)) * rng.random((500, C)) ** 4  # some nearly one-row rays
    junk = bp.BasisTable(
        np.zeros((0, C), np.int32),
        np.zeros((0, C), np.int8),
        np.zeros(0, np.int64),
        tuple(FIVE),
        n,
        rays,
    )
    prep = junk.prepare(D, np.float64)["rays"]
    x = rng.random((2000, n)) ** 8 * 1e3
    y = x @ D.T
    assert not np.any(np.asarray(prove_infeasible(prep, y, y)))  # a zero-width band, met
    lower, upper = _bands(response, 2000, seed=8, tolfac=0.5)
    flagged = np.asarray(prove_infeasible(prep, lower, upper))
    assert flagged.sum() > 0
    assert np.all(bp.highs_lp(D, lower[flagged], upper[flagged]).status == 1)


def test_certified_solve_uses_the_rays(response, D, table):
    """bp.solve (float32 pivots, float64 certificates) gives HiGHS's verdicts with the rays."""
    y, sig = _observations(response, 2000, seed=9)
    once = bp.ToleranceSchedule(retry_factors=(), min_signal=0.0)
    solver = bp.DualSimplex(warm_start=table)
    res = bp.solve(y, sig, response, BASIS, tolfac=1.0, solver=solver, schedule=once, coeffs=False)
    with jax.enable_x64(True):
        lower, upper = (np.asarray(a) for a in bp.bounds(y, sig, 1.0))
    ref = bp.highs_lp(D, lower, upper)
    np.testing.assert_array_equal(res.status, ref.status)


def test_ray_verdicts_stand_without_a_basis_certificate(response, D, table):
    """The float64 check of INFEASIBLE verdicts accepts a ray proof on its own: with the
    all-slack basis (no certificate) a ray-proven pixel stays INFEASIBLE, and without rays it
    is sent to the float64 re-solve (-1)."""
    from deepem_jax.bp._solvers import _certify_infeasible_verdicts

    lower, upper = _bands(response, 2000, seed=10, tolfac=1.0)
    with jax.enable_x64(True):
        by_ray = np.asarray(prove_infeasible(table.prepare(D, np.float64)["rays"], lower, upper))
    assert by_ray.sum() > 5
    C, n = D.shape
    slack = np.broadcast_to(n + np.arange(C, dtype=np.int32), lower.shape).copy()
    at_upper = np.zeros(lower.shape, bool)
    for tab, expected in ((table, 1), (None, -1)):
        status = np.where(by_ray, 1, 0).astype(np.int32)
        _certify_infeasible_verdicts(D, lower, upper, status, slack, at_upper, tab)
        assert np.all(status[by_ray] == expected)


def test_bases_that_are_not_dual_feasible_are_dropped(response, D, x64):
    """A table of arbitrary bases cannot change the answer: only dual feasible ones are kept."""
    rng = np.random.default_rng(4)
    C, n = D.shape
    basis = np.stack([rng.choice(n + C, C, replace=False) for _ in range(200)]).astype(np.int32)
    basic_slack = np.stack([np.isin(n + np.arange(C), b) for b in basis])
    stat = np.where(basic_slack, 0, rng.integers(1, 3, size=(200, C))).astype(np.int8)
    junk = bp.BasisTable(basis, stat, np.ones(200, np.int64), tuple(FIVE), n)
    kept = junk.prepare(D, np.float64)["full"]["basis"].shape[0]
    assert kept < 200
    lower, upper = _bands(response, 300, seed=5)
    warm = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=junk)
    assert _same_as_highs(D, lower, upper, warm).max() < 1e-9


def test_table_round_trip_and_bad_files(table, D, tmp_path):
    path = tmp_path / "t.npz"
    table.save(path)
    back = bp.BasisTable.load(path)
    np.testing.assert_array_equal(back.basis, table.basis)
    np.testing.assert_array_equal(back.slack_stat, table.slack_stat)
    np.testing.assert_array_equal(back.rays, table.rays)
    np.testing.assert_array_equal(back.ray_counts, table.ray_counts)
    without_rays = tmp_path / "old.npz"  # a table written before rays existed
    with np.load(path) as z:
        np.savez(without_rays, **{k: z[k] for k in ("basis", "slack_stat", "counts", "meta")})
    assert bp.BasisTable.load(without_rays).rays.shape == (0, len(table.channels))
    assert back.channels == table.channels and back.n_basis == table.n_basis
    bad = tmp_path / "bad.npz"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"bad\.npz"):
        bp.BasisTable.load(bad)
    with pytest.raises(ValueError, match="dictionary"):
        table.prepare(D[:4], np.float64)
    with pytest.raises(ValueError, match="indices"):
        bp.BasisTable(table.basis + 100, table.slack_stat, table.counts, table.channels, 54)


def test_head_size_follows_the_spread_of_the_counts():
    """The head is the candidate size with the fewest expected table columns per pixel:
    a table whose 256 most frequent bases cover every training pixel keeps 256, one whose
    counts are spread out gets a larger head, a small table is its own head."""
    from deepem_jax.bp._warm import head_size

    concentrated = np.r_[np.full(256, 1000.0), np.ones(7000)]  # 256 bases: 97 % of pixels
    assert head_size(concentrated) == 256
    spread = np.r_[np.full(1024, 100.0), np.ones(6000)]  # 256 bases: 23 %, 1024: 94 %
    assert head_size(spread) == 1024
    assert head_size(np.ones(100)) == 100 and head_size(np.zeros(0)) == 0


def test_ray_proven_pixels_can_start_at_a_retry(response, D, table):
    """The bands DualSimplex proves infeasible by a ray are infeasible for HiGHS; solved from
    the first retry (``start=1``, for all of them or per pixel among the others) they get the
    answers of the whole schedule."""
    y, sig = _observations(response, 2000, seed=6)
    with jax.enable_x64(True):
        lower, upper = (np.asarray(a) for a in bp.bounds(y, sig, 1.0))
    solver = bp.DualSimplex(warm_start=table)
    proven = solver._ray_proven(D, lower, upper)
    assert proven.sum() > 10
    assert np.all(bp.highs_lp(D, lower[proven], upper[proven]).status == 1)
    full = bp.solve(y, sig, response, BASIS, tolfac=1.0, solver=solver)
    late = bp.solve(y[proven], sig[proven], response, BASIS, tolfac=1.0, solver=solver, start=1)
    for name in ("status", "tolfac", "em"):
        np.testing.assert_array_equal(getattr(late, name), getattr(full, name)[proven])
    assert np.all(late.tolfac > 1.0)
    start = proven.astype(np.int64)
    mixed = bp.solve(y, sig, response, BASIS, tolfac=1.0, solver=solver, start=start)
    for name in ("status", "tolfac", "em"):
        np.testing.assert_array_equal(getattr(mixed, name), getattr(full, name))
    for bad in (3, True, start[:-1], start + 3, start.astype(float)):
        with pytest.raises(ValueError, match="start must be"):
            bp.solve(y, sig, response, BASIS, solver=solver, start=bad)


def test_a_reordered_table_serves_the_reordered_rows(response, D, table, x64):
    """The same LPs with the channels in another order: the reordered table starts them at the
    same bases (the same pixels need no pivot) and every answer is the same."""
    lower, upper = _bands(response, 1000, seed=6, tolfac=1.0)  # some infeasible pixels
    perm = [3, 0, 4, 2, 1]
    swapped = table.reordered([FIVE[i] for i in perm])
    assert swapped.channels == (211, 131, 335, 193, 171)
    ref = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=table)
    res = bp.solve_lp(D[perm], lower[:, perm], upper[:, perm], dtype=np.float64, warm_start=swapped)
    status = np.asarray(res.status)
    np.testing.assert_array_equal(status, np.asarray(ref.status))
    assert np.sum(status == 1) > 5
    ok = status == 0
    np.testing.assert_allclose(np.asarray(res.x)[ok], np.asarray(ref.x)[ok], rtol=1e-9, atol=1e-12)
    no_pivot = np.asarray(ref.iterations) == 0
    assert no_pivot.mean() > 0.5
    np.testing.assert_array_equal(np.asarray(res.iterations) == 0, no_pivot)
    assert swapped.reordered(FIVE).channels == table.channels
    np.testing.assert_array_equal(swapped.reordered(FIVE).basis, table.basis)
    with pytest.raises(ValueError, match="not a reordering"):
        table.reordered([131, 171, 193, 211, 94])


def test_the_shipped_table_serves_any_channel_order():
    six = [94, 131, 171, 193, 211, 335]
    shipped = bp.default_table(six)
    reverse = bp.default_table(six[::-1])
    assert reverse is bp.default_table(six[::-1])  # read once
    assert reverse.channels == tuple(six[::-1]) and reverse.size == shipped.size
    np.testing.assert_array_equal(reverse.rays, shipped.rays[:, ::-1])
    assert bp.default_table([94, 131, 171]) is None
