"""Fidelity of DeepEM predictions against Basis Pursuit (BP), split by BP's own status.

Every metric is computed three times: on all pixels, on pixels where BP solved
(``status == 0``) and on pixels where BP failed (any other status). Pixels whose predicted or
BP EM is not finite (invalid input: :meth:`deepem_jax.predictor.Predictor.predict`,
``BPStatus.INVALID_INPUT``) are left out of every group and counted in ``n_invalid``.
Arrays are channels-last: EM (..., n_T) in cm^-5 per bin, intensities and sigma
(..., n_channels) in DN s^-1 pix^-1, status (...,).

Definitions (means are over the pixels of a group):

* ``mse_sqrt_per_bin`` -- mean of ``(sqrt(EM_pred/1e25) - sqrt(EM_bp/1e25))**2`` per bin, the
  original DeepEM loss space (negative EM counts as 0 there); ``mse_sqrt`` is its mean over
  bins, i.e. over all pixels and bins, comparable with the original's test-set 0.216.
* ``rel_err_total_em`` -- mean of ``|sum EM_pred - sum EM_bp| / sum EM_bp`` over pixels with
  ``sum EM_bp > 0``.
* ``rel_err_mean_logt`` -- mean of ``|<logT>_pred - <logT>_bp| / <logT>_bp`` with the
  EM-weighted ``<logT> = sum(EM logT) / sum(EM)``, over pixels where both sums are positive.
* ``chi2_pred`` / ``chi2_bp`` -- mean over pixels of the reduced chi^2
  ``mean_c ((K @ EM - y) / sigma)**2`` of the resynthesised intensities
  (:func:`deepem_jax.forward.forward`).
* ``frac_in_band`` -- fraction of pixels whose resynthesis ``K @ EM_pred`` lies within
  ``lower <= . <= upper`` in every channel (BP's tolerance band); NaN when no band is given.
* ``mean_em_pred`` / ``mean_em_bp`` -- mean EM(T) curves (cm^-5 per bin).

A group without pixels has NaN metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np

from .forward import chi2, forward

__all__ = [
    "GROUPS",
    "FidelityMetrics",
    "compare_results",
    "evaluate_fidelity",
    "format_metrics_table",
]

#: Pixel groups, in report order.
GROUPS = ("all", "bp_solved", "bp_failed")
_SQRT_SCALE = 1e25


@dataclasses.dataclass(frozen=True)
class FidelityMetrics:
    """Metrics of one pixel group (see the module docstring for definitions)."""

    n_pixels: int
    n_invalid: int
    mse_sqrt: float
    mse_sqrt_per_bin: np.ndarray
    rel_err_total_em: float
    rel_err_mean_logt: float
    chi2_pred: float
    chi2_bp: float
    frac_in_band: float
    mean_em_pred: np.ndarray
    mean_em_bp: np.ndarray

    def scalars(self) -> dict[str, float]:
        """The scalar metrics as a flat dict (e.g. for logging or a checkpoint)."""
        return {
            f.name: float(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if np.ndim(getattr(self, f.name)) == 0
        }


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan


def _weighted_logt(em: np.ndarray, logt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = em.sum(axis=-1)
    ok = total > 0
    return np.where(ok, (em * logt).sum(axis=-1) / np.where(ok, total, 1.0), np.nan), ok


def _group_metrics(
    em_pred: np.ndarray,
    em_bp: np.ndarray,
    y: np.ndarray,
    sigma: np.ndarray,
    y_pred: np.ndarray,
    y_bp: np.ndarray,
    in_band: np.ndarray | None,
    logt: np.ndarray,
    n_invalid: int,
) -> FidelityMetrics:
    n, n_t = em_pred.shape
    sq = np.sqrt(np.maximum(em_pred, 0) / _SQRT_SCALE) - np.sqrt(np.maximum(em_bp, 0) / _SQRT_SCALE)
    per_bin = (sq**2).mean(axis=0) if n else np.full(n_t, np.nan)
    tot_p, tot_b = em_pred.sum(axis=-1), em_bp.sum(axis=-1)
    pos = tot_b > 0
    rel_total = np.abs(tot_p[pos] - tot_b[pos]) / tot_b[pos]
    lt_p, ok_p = _weighted_logt(em_pred, logt)
    lt_b, ok_b = _weighted_logt(em_bp, logt)
    both = ok_p & ok_b
    rel_lt = np.abs(lt_p[both] - lt_b[both]) / np.abs(lt_b[both])
    return FidelityMetrics(
        n_pixels=n,
        n_invalid=n_invalid,
        mse_sqrt=_mean(per_bin) if n else math.nan,
        mse_sqrt_per_bin=per_bin,
        rel_err_total_em=_mean(rel_total),
        rel_err_mean_logt=_mean(rel_lt),
        chi2_pred=_mean(chi2(y_pred, y, sigma)),
        chi2_bp=_mean(chi2(y_bp, y, sigma)),
        frac_in_band=math.nan if in_band is None else _mean(in_band.astype(float)),
        mean_em_pred=em_pred.mean(axis=0) if n else np.full(n_t, np.nan),
        mean_em_bp=em_bp.mean(axis=0) if n else np.full(n_t, np.nan),
    )


def _flat_inputs(em_pred, em_bp, bp_status, intensities, sigma, K, logt, lower, upper):
    """The inputs of :func:`evaluate_fidelity` checked and flattened to N pixels, as float64:
    ``em_pred``, ``em_bp`` (N, n_T) cm^-5, ``status`` (N,), ``y``, ``sigma`` (N, C)
    DN s^-1 pix^-1, ``logt`` (n_T,), and the band ``(lower, upper)`` (N, C) or None.
    ValueError on mismatched shapes, one band edge without the other, or sigma <= 0."""
    em_pred = np.asarray(em_pred, dtype=np.float64)
    em_bp = np.asarray(em_bp, dtype=np.float64)
    n_t = em_pred.shape[-1]
    lead = em_pred.shape[:-1]
    logt = np.asarray(logt, dtype=np.float64)
    n_c = np.shape(K)[0]
    status = np.asarray(bp_status)
    if em_bp.shape != em_pred.shape or status.shape != lead or logt.shape != (n_t,):
        raise ValueError(
            f"shape mismatch: em_pred {em_pred.shape}, em_bp {em_bp.shape}, status "
            f"{status.shape}, logt {logt.shape}"
        )
    y = np.asarray(intensities, dtype=np.float64)
    sig = np.asarray(sigma, dtype=np.float64)
    if y.shape != (*lead, n_c) or sig.shape != y.shape or np.shape(K) != (n_c, n_t):
        raise ValueError(
            f"intensities {y.shape} and sigma {sig.shape} must be {(*lead, n_c)}; K {np.shape(K)}"
        )
    if (lower is None) != (upper is None):
        raise ValueError("give both lower and upper bounds of the tolerance band, or neither")
    if np.any(sig <= 0):
        raise ValueError("sigma must be positive")
    band = None
    if lower is not None:
        band = tuple(
            np.broadcast_to(np.asarray(b, np.float64), (*lead, n_c)).reshape(-1, n_c)
            for b in (lower, upper)
        )
    return (
        em_pred.reshape(-1, n_t),
        em_bp.reshape(-1, n_t),
        status.reshape(-1),
        y.reshape(-1, n_c),
        sig.reshape(-1, n_c),
        logt,
        band,
    )


def evaluate_fidelity(
    em_pred: np.ndarray,
    em_bp: np.ndarray,
    bp_status: np.ndarray,
    intensities: np.ndarray,
    sigma: np.ndarray,
    K: np.ndarray | jax.Array,
    logt: np.ndarray,
    lower: np.ndarray | None = None,
    upper: np.ndarray | None = None,
) -> dict[str, FidelityMetrics]:
    """Compare predicted EM with BP EM; returns ``{"all", "bp_solved", "bp_failed"}`` metrics.

    Parameters
    ----------
    em_pred, em_bp : (..., n_T) EM in cm^-5 per bin (predicted; BP's).
    bp_status : (...,) BP status per pixel, 0 = solved.
    intensities, sigma : (..., n_channels) data and its 1-sigma error, DN s^-1 pix^-1.
    K : (n_channels, n_T) response in DN cm^5 s^-1 pix^-1.
    logt : (n_T,) log10(T / K) of the bins.
    lower, upper : (..., n_channels) BP's tolerance band in DN s^-1 pix^-1 (both or neither).
    """
    em_pred, em_bp, status, y, sig, logt, band = _flat_inputs(
        em_pred, em_bp, bp_status, intensities, sigma, K, logt, lower, upper
    )
    valid = np.all(np.isfinite(em_pred), axis=-1) & np.all(np.isfinite(em_bp), axis=-1)
    y_pred = np.full_like(y, np.nan)
    y_pred[valid] = np.asarray(forward(K, em_pred[valid]), dtype=np.float64)
    y_bp = np.asarray(forward(K, em_bp), dtype=np.float64)
    in_band = None
    if band is not None:
        in_band = np.all((band[0] <= y_pred) & (y_pred <= band[1]), axis=-1)
    solved = status == 0
    masks = {"all": valid, "bp_solved": valid & solved, "bp_failed": valid & ~solved}
    invalid = {"all": ~valid, "bp_solved": ~valid & solved, "bp_failed": ~valid & ~solved}
    return {
        g: _group_metrics(
            em_pred[m],
            em_bp[m],
            y[m],
            sig[m],
            y_pred[m],
            y_bp[m],
            None if in_band is None else in_band[m],
            logt,
            int(invalid[g].sum()),
        )
        for g, m in masks.items()
    }


_ROWS = (
    ("pixels", "n_pixels", "{:d}"),
    ("invalid pixels", "n_invalid", "{:d}"),
    ("MSE sqrt(EM/1e25)", "mse_sqrt", "{:.4g}"),
    ("mean rel. err. total EM", "rel_err_total_em", "{:.4g}"),
    ("mean rel. err. <log T>", "rel_err_mean_logt", "{:.4g}"),
    ("mean chi2 DeepEM", "chi2_pred", "{:.4g}"),
    ("mean chi2 BP", "chi2_bp", "{:.4g}"),
    ("in BP band", "frac_in_band", "{:.4g}"),
)


def format_metrics_table(results: Mapping[str, FidelityMetrics], style: str = "markdown") -> str:
    """The scalar metrics as a table with one column per group: ``style`` is ``"markdown"``
    (a pipe table) or ``"plain"`` (aligned text)."""
    if style not in ("markdown", "plain"):
        raise ValueError(f"style must be 'markdown' or 'plain', got {style!r}")
    groups = list(results)
    rows = [["metric", *groups]]
    for label, field, fmt in _ROWS:
        vals = [getattr(results[g], field) for g in groups]
        rows.append([label, *("nan" if v != v else fmt.format(v) for v in vals)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if style == "plain":
        return "\n".join(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        )
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), sep, *(line(r) for r in rows[1:])])


def compare_results(net, bp) -> dict[str, float]:
    """Issue-12 fidelity of a network :class:`~deepem_jax.DEMResult` against BP's on the same
    pixels, over the pixels BP solved (and the network got valid input):

    ``pixels``; ``in_band`` -- fraction whose network resynthesis lies in BP's band (network
    status SOLVED); ``mse_sqrt`` -- mean over pixels and bins of
    ``(sqrt(EM_net/1e25) - sqrt(EM_bp/1e25))**2``; ``rel_mse_sqrt`` -- ``mse_sqrt`` divided by
    the mean of ``EM_bp/1e25`` over the same pixels and bins (the mean square of BP's
    ``sqrt(EM/1e25)``, ``mean_em_bp``): the same error without the EM scale, so that quiet-Sun
    and active-region pixels compare; ``med_rel_total_em`` -- median of
    ``|sum EM_net / sum EM_bp - 1|``; ``med_abs_dlogt`` -- median ``|<log T>_net - <log T>_bp|``
    (EM-weighted); ``med_chi2`` and ``med_chi2_bp`` -- median chi^2 of each on those pixels.
    """
    from .status import DEMStatus

    if net.shape != bp.shape or net.channels != bp.channels:
        raise ValueError("the two results must cover the same pixels and channels")
    sel = (bp.status == DEMStatus.SOLVED) & net.has_em
    em_n, em_b = net.em[sel].astype(np.float64), bp.em[sel].astype(np.float64)
    tot_n, tot_b = em_n.sum(-1), em_b.sum(-1)
    lt_n, ok_n = _weighted_logt(em_n, net.logt)
    lt_b, ok_b = _weighted_logt(em_b, bp.logt)
    sq = np.sqrt(np.maximum(em_n, 0) / _SQRT_SCALE) - np.sqrt(np.maximum(em_b, 0) / _SQRT_SCALE)
    pos = tot_b > 0
    nan = math.nan
    mean_b = float(np.mean(np.maximum(em_b, 0) / _SQRT_SCALE)) if sel.any() else nan
    return {
        "pixels": int(sel.sum()),
        "in_band": float(np.mean(net.status[sel] == DEMStatus.SOLVED)) if sel.any() else nan,
        "mse_sqrt": float(np.mean(sq**2)) if sel.any() else nan,
        "mean_em_bp": mean_b,
        "rel_mse_sqrt": float(np.mean(sq**2) / mean_b) if pos.any() else nan,
        "med_rel_total_em": float(np.median(np.abs(tot_n[pos] / tot_b[pos] - 1)))
        if pos.any()
        else nan,
        "med_abs_dlogt": float(np.median(np.abs(lt_n - lt_b)[ok_n & ok_b]))
        if (ok_n & ok_b).any()
        else nan,
        "med_chi2": float(np.median(net.chi2[sel])) if sel.any() else nan,
        "med_chi2_bp": float(np.median(bp.chi2[sel])) if sel.any() else nan,
    }
