"""Fidelity metrics against BP on a hand-computed three-pixel case."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepem_jax.metrics import GROUPS, evaluate_fidelity, format_metrics_table

LOGT = np.array([6.0, 7.0])
K = np.array([[1e-25, 0.0], [0.0, 2e-25]])  # so K @ EM with EM ~ 1e25 is O(1) DN/s/pix
# pixels 0, 1: BP solved; pixel 2: BP failed; pixel 3: solved, but no prediction (NaN input)
EM_PRED = np.array([[1, 4], [1, 1], [9, 0], [np.nan, np.nan]]) * 1e25
EM_BP = np.array([[4, 1], [1, 1], [1, 0], [1, 1]]) * 1e25
STATUS = np.array([0, 0, 2, 0])
Y = np.array([[2.0, 4.0], [1.0, 2.0], [1.0, 0.0], [1.0, 2.0]])
SIGMA = np.array([[1.0, 2.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
LOWER = np.array([[0.0, 0.0], [0.5, 1.5], [0.0, 0.0], [0.0, 0.0]])
UPPER = np.array([[1.0, 10.0], [1.5, 2.5], [5.0, 5.0], [5.0, 5.0]])


@pytest.fixture(scope="module")
def results():
    return evaluate_fidelity(EM_PRED, EM_BP, STATUS, Y, SIGMA, K, LOGT, LOWER, UPPER)


def test_hand_computed(results):
    assert list(results) == list(GROUPS)
    s, f, a = results["bp_solved"], results["bp_failed"], results["all"]
    assert (s.n_pixels, f.n_pixels, a.n_pixels) == (2, 1, 3)
    assert (s.n_invalid, f.n_invalid, a.n_invalid) == (1, 0, 1)
    # sqrt(EM/1e25): pixel 0 (1, 2) vs (2, 1); pixel 1 equal; pixel 2 (3, 0) vs (1, 0)
    np.testing.assert_allclose(s.mse_sqrt_per_bin, [0.5, 0.5])
    np.testing.assert_allclose(f.mse_sqrt_per_bin, [4.0, 0.0])
    np.testing.assert_allclose(a.mse_sqrt_per_bin, [5 / 3, 1 / 3])
    np.testing.assert_allclose([s.mse_sqrt, f.mse_sqrt, a.mse_sqrt], [0.5, 2.0, 1.0])
    # totals: 5 vs 5, 2 vs 2, 9 vs 1
    np.testing.assert_allclose([s.rel_err_total_em, f.rel_err_total_em], [0.0, 8.0])
    np.testing.assert_allclose(a.rel_err_total_em, 8 / 3)
    # <log T>: pixel 0 6.8 vs 6.2; pixels 1 and 2 agree
    np.testing.assert_allclose(s.rel_err_mean_logt, 0.6 / 6.2 / 2)
    np.testing.assert_allclose([f.rel_err_mean_logt, a.rel_err_mean_logt], [0.0, 0.6 / 6.2 / 3])
    # K @ EM_pred: (1, 8), (1, 2), (9, 0); K @ EM_bp: (4, 2), (1, 2), (1, 0)
    # (forward() runs in float32 unless x64 is on)
    chi2_pred, chi2_bp = [s.chi2_pred, f.chi2_pred, a.chi2_pred], [s.chi2_bp, f.chi2_bp, a.chi2_bp]
    np.testing.assert_allclose(chi2_pred, [1.25, 32.0, 11.5], rtol=1e-6)
    np.testing.assert_allclose(chi2_bp, [1.25, 0.0, 2.5 / 3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([s.frac_in_band, f.frac_in_band, a.frac_in_band], [1, 0, 2 / 3])
    np.testing.assert_allclose(s.mean_em_pred, [1e25, 2.5e25])
    np.testing.assert_allclose(s.mean_em_bp, [2.5e25, 1e25])
    np.testing.assert_allclose(a.mean_em_pred, [11e25 / 3, 5e25 / 3])


def test_image_shaped_input_and_no_band():
    lead = (2, 2)
    res = evaluate_fidelity(
        EM_PRED.reshape(*lead, 2),
        EM_BP.reshape(*lead, 2),
        STATUS.reshape(lead),
        Y.reshape(*lead, 2),
        SIGMA.reshape(*lead, 2),
        K,
        LOGT,
    )
    assert math.isnan(res["all"].frac_in_band)
    np.testing.assert_allclose(res["all"].chi2_pred, 11.5, rtol=1e-6)


def test_empty_group_is_nan():
    res = evaluate_fidelity(EM_PRED[:2], EM_BP[:2], STATUS[:2], Y[:2], SIGMA[:2], K, LOGT)
    f = res["bp_failed"]
    assert f.n_pixels == 0
    assert math.isnan(f.mse_sqrt) and math.isnan(f.chi2_pred) and math.isnan(f.rel_err_total_em)
    assert np.all(np.isnan(f.mean_em_pred))


def test_scalars(results):
    sc = results["all"].scalars()
    assert sc["n_pixels"] == 3 and sc["mse_sqrt"] == pytest.approx(1.0)
    assert "mse_sqrt_per_bin" not in sc and "mean_em_pred" not in sc


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape mismatch"):
        evaluate_fidelity(EM_PRED, EM_BP[:3], STATUS, Y, SIGMA, K, LOGT)
    with pytest.raises(ValueError, match="intensities"):
        evaluate_fidelity(EM_PRED, EM_BP, STATUS, Y[:, :1], SIGMA, K, LOGT)
    with pytest.raises(ValueError, match="both lower and upper"):
        evaluate_fidelity(EM_PRED, EM_BP, STATUS, Y, SIGMA, K, LOGT, lower=LOWER)
    with pytest.raises(ValueError, match="sigma must be positive"):
        evaluate_fidelity(EM_PRED, EM_BP, STATUS, Y, 0 * SIGMA, K, LOGT)


def test_tables(results):
    md = format_metrics_table(results).splitlines()
    assert [c.strip() for c in md[0].split("|")[1:-1]] == ["metric", *GROUPS]
    assert len(set(map(len, md))) == 1  # aligned columns
    assert set(md[1]) == {"|", "-"}
    row = [c.strip() for c in md[4].split("|")[1:-1]]
    assert row == ["MSE sqrt(EM/1e25)", "1", "0.5", "2"]
    plain = format_metrics_table(results, style="plain").splitlines()
    assert "|" not in "".join(plain) and plain[1].split() == ["pixels", "3", "2", "1"]
    with pytest.raises(ValueError, match="style"):
        format_metrics_table(results, style="html")


def test_compare_results_by_hand():
    """Network EM = 4x BP's on every SOLVED pixel: sqrt(EM/1e25) differs by exactly BP's own, so
    ``mse_sqrt`` is the mean of EM_bp/1e25 and ``rel_mse_sqrt`` is 1, at any EM scale."""
    import dataclasses

    from deepem_jax import invert
    from deepem_jax.metrics import compare_results
    from deepem_jax.response import default_response
    from deepem_jax.status import DEMStatus

    resp = default_response()
    rng = np.random.default_rng(0)
    y = rng.uniform(50, 500, (40, 6))
    bp = invert(y, "bp", sigma=0.1 * y, channels=resp.wavelength, degradation=False)
    ok = bp.status == DEMStatus.SOLVED
    assert 5 < ok.sum() < 40  # some pixels BP does not solve are left out
    for scale in (1.0, 1e3):
        ref = dataclasses.replace(bp, em=bp.em * scale)
        net = dataclasses.replace(ref, em=ref.em * 4)
        r = compare_results(net, ref)
        em = ref.em[ok].astype(np.float64) / 1e25
        assert r["pixels"] == ok.sum() and r["in_band"] == 1.0
        assert r["mse_sqrt"] == pytest.approx(em.mean(), rel=1e-5)
        assert r["mean_em_bp"] == pytest.approx(em.mean(), rel=1e-6)
        assert r["rel_mse_sqrt"] == pytest.approx(1.0, rel=1e-5)
        assert r["med_rel_total_em"] == pytest.approx(3.0, rel=1e-5)
        assert r["med_abs_dlogt"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="same pixels"):
        compare_results(net, dataclasses.replace(ref, channels=(94,)))
