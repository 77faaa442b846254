"""DEMs inside a larger model: per-channel calibration factors by gradient descent through the
DEM fit, on synthetic data with injected factors and on the real 2024-10-04 observation.

    python examples/calibrate_channels.py [--pixels N] [--out DIR]
    DEEPEM_JAX_DATA=../shared/data python examples/calibrate_channels.py --pixels 20000

The observed intensities are ``y = g * (K @ EM) + noise`` with ``K`` the undegraded response and
``g`` (C,) the unknown factors (AIA's degradation, or any calibration error). For a guess of
``g`` every pixel's DEM is fitted to the corrected intensities ``y / g``, ``sigma / g``
(:func:`deepem_jax.fit.fit`), and the outer loss is the mean over pixels of the fit's objective
``F = chi^2 / 2`` at its optimum, which equals ``1/2 sum_c ((g K EM - y) / sigma)_c^2``: the
negative log-likelihood profiled over the DEMs. Its gradient with respect to ``log g`` comes
from ``fit``'s implicit (custom VJP) gradients; the outer problem is solved with
``optax.lbfgs``, each step warm-starting the DEMs from the last ones.

Identifiability, which decides the design:

* a global scale of ``g`` is exactly degenerate with the EM scale, so ``g`` is estimated
  relative to a reference channel (171 Å: ``g_171 = 1``) and compared with aiapy's V10
  degradation factors in the same normalisation (``f / f_171``);
* a DEM with at least as many free non-negative parameters as channels fits (almost) any
  ``y / g`` exactly, whatever ``g`` (the data stay inside the cone of the response's columns):
  chi^2 cannot see ``g``. The DEM model here is therefore ``--components`` M < C fixed Gaussians
  in log T (unit-EM, equal widths) with non-negative weights, fitted through the (C, M)
  response of the components; each pixel then gives C - M constraints on ``g``. The estimate is
  only as good as that DEM model.

Three cases run: (1) synthetic pixels whose DEMs are drawn from the model (random weights),
seen through injected factors with AIA photon and read noise (``noisy_observation`` with
``--n-sample`` level-1 pixels per pixel) and sigma from the error model; the factors must be
recovered within 2 % (the script exits non-zero otherwise); (2) the same factors with DEMs from
the documented prior (:func:`deepem_jax.forward.random_dems`, not in the model): reported, not
required, it measures how much a wrong DEM model biases the estimate; (3) the real five-channel
synoptic set of 2024-10-04 (``$DEEPEM_JAX_DATA``; skipped when absent), ``--rebin``-averaged,
``--pixels`` random on-disk pixels (r < 0.9 R_sun, no flagged or non-positive channel), sigma
from the file's ``n_sample``, the undegraded response; the estimate is printed beside V10's
factors for the date, with the loss at both. Writes ``calibration.json`` (everything) and
``calibration_factors.csv`` (one row per case and channel) into ``--out`` (default: a new
temporary directory).

Measured with the defaults (``--pixels 20000``, 35 min on two busy CPU cores): injected factors
recovered within 0.16 %; with DEMs from the documented prior, errors up to 26 %; on 2024-10-04
the estimate (131, 193, 211, 335 Å: 0.88, 1.72, 1.92, 0.77 of 171 Å) is far from V10's (0.69,
0.67, 0.54, 0.23), and V10's factors give this DEM model a worse loss than no correction at
all. Other component sets (M = 2-4, peaks within log T 5.6-7.0; 2,000 pixels) move the
estimate but keep 193 and 211 Å at 1.5-2.4 of 171 Å. Yet a free 18-bin DEM fits every one of
2,000 sampled pixels exactly with V10's factors, and 99.75 % of them with the estimate
(without any correction 54 % have chi^2 > 1): the data do not contradict V10, and what the
estimate measures is how the component model misses the real DEMs, not the instrument.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import optax

from deepem_jax.calibration import degradation
from deepem_jax.data import DataFileNotFoundError, fetch
from deepem_jax.fit import Fitter, fit
from deepem_jax.forward import forward, gaussian_dem, noisy_observation, random_dems
from deepem_jax.prior import NOMINAL_EXPTIME
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.status import DEMStatus
from deepem_jax.uncertainty import sigma_values

CHANNELS = [131, 171, 193, 211, 335]
REFERENCE = 171
DATE = "2024-10-04"
#: Required synthetic recovery (max relative error of g / g_171).
LIMIT = 0.02
#: The inner DEM fits: L-BFGS to a tight gradient tolerance (the outer gradient is implicit);
#: softplus weights, whose line-search trials cannot overflow as ``exp`` can.
FITTER = Fitter(parametrisation="softplus", gtol=1e-7, max_steps=300)


def components(n: int, logt_range: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, float]:
    """(Phi (M, n_T) unit-EM Gaussians on DEEPEM_LOGT, their peaks, their common width): peaks
    evenly spaced over ``logt_range``, width two thirds of the spacing."""
    lo, hi = logt_range
    peaks = np.linspace(lo, hi, n) if n > 1 else np.array([(lo + hi) / 2])
    width = (hi - lo) / max(n - 1, 1) * 2 / 3
    phi = np.stack([gaussian_dem(DEEPEM_LOGT, 1.0, p, width) for p in peaks])
    return phi, peaks, float(width)


def factors(phi_free: jax.Array, ref: int) -> jax.Array:
    """g (C,) from the free log-factors (C - 1,), with g[ref] = 1."""
    return jnp.exp(jnp.insert(phi_free, ref, 0.0))


def loss(phi_free, em0, y, sigma, weight, K, ref):
    """Weighted mean over pixels of the fit's F = chi^2 / 2 of ``y / g`` through ``K``;
    aux: the fitted component EMs (warm start of the next call) and the fit statuses."""
    g = factors(phi_free, ref)
    res = fit(y / g, sigma / g, K, FITTER, em0=em0)
    f = jnp.where(weight > 0, res.objective, 0.0)
    return jnp.sum(weight * f) / jnp.sum(weight), (res.em, res.status)


_value_and_grad = jax.value_and_grad(loss, has_aux=True)
_OPT = optax.lbfgs()


@partial(jax.jit, static_argnames="ref")
def lbfgs_step(phi_free, state, em0, y, sigma, weight, K, ref):
    """One outer L-BFGS step (its zoom line search refits every pixel from ``em0``)."""
    (value, (em, status)), grad = _value_and_grad(phi_free, em0, y, sigma, weight, K, ref)
    value_fn = lambda p: loss(p, em0, y, sigma, weight, K, ref)[0]  # noqa: E731
    upd, state = _OPT.update(grad, state, phi_free, value=value, grad=grad, value_fn=value_fn)
    return optax.apply_updates(phi_free, upd), state, value, grad, em, status


def calibrate(y, sigma, weight, K, ref, max_steps, gtol, g0=None) -> dict:
    """Factors g / g_ref (C,) minimising the loss from ``g0`` (default 1; ``max_steps=0``: the
    loss at ``g0``), with the loss there, the L-BFGS
    steps taken, whether the gradient tolerance ``max |dL/dlog g| <= gtol (1 + |L|)`` was met,
    the inner fits' status counts (weighted pixels) and the pixels dropped.

    A pixel whose inner fit ends non-finite (DEMStatus.NONFINITE_OUTPUT: rare, an L-BFGS line
    search overflowing) would make the loss and every gradient NaN: it is dropped (weight 0,
    its data replaced by a copy of a kept pixel) and the step redone."""
    y, sigma, weight = (np.array(a, np.float64) for a in (y, sigma, weight))
    phi = jnp.zeros(y.shape[1] - 1) if g0 is None else jnp.log(jnp.delete(g0 / g0[ref], ref))
    state = _OPT.init(phi)
    em = jnp.full((y.shape[0], K.shape[1]), jnp.nan)
    steps, converged, dropped, value = 0, False, 0, np.nan
    while True:
        args = [jnp.asarray(a) for a in (y, sigma, weight, K)]
        new, new_state, val, grad, new_em, status = lbfgs_step(phi, state, em, *args, ref=ref)
        status = np.asarray(status)
        bad = (status == int(DEMStatus.NONFINITE_OUTPUT)) & (weight > 0)
        if bad.any() and bad.sum() < (weight > 0).sum():
            keep = np.flatnonzero((weight > 0) & ~bad)[0]
            y[bad], sigma[bad], weight[bad] = y[keep], sigma[keep], 0.0
            em = jnp.where(bad[:, None], jnp.nan, em)
            dropped += int(bad.sum())
            continue
        if not (np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(grad)))):
            break  # keep the last finite factors (not converged)
        value, em = float(val), new_em  # the loss and the fits at ``phi``
        converged = float(jnp.max(jnp.abs(grad))) <= gtol * (1 + abs(value))
        if converged or steps == max_steps or not np.all(np.isfinite(np.asarray(new))):
            break
        phi, state, steps = new, new_state, steps + 1
    counts = np.bincount(status[weight > 0], minlength=len(DEMStatus))
    return {
        "g": np.asarray(factors(phi, ref)),
        "loss": value,
        "steps": steps,
        "converged": bool(converged),
        "fit_status": {s.name: int(counts[s]) for s in DEMStatus if counts[s]},
        "dropped": dropped,
    }


def outer(res: dict) -> str:
    """How the outer optimisation went, for the printed summaries."""
    state = "converged" if res["converged"] else "not converged"
    drop = f", {res['dropped']} pixels dropped (non-finite fit)" if res["dropped"] else ""
    return f"{res['steps']} L-BFGS steps ({state}{drop})"


def synthetic(em, g_true, n_sample, rng, K):
    """Noisy observed intensities and their sigma (N, C) of EMs (N, n_T) through ``g_true * K``
    at nominal exposures, ``n_sample`` level-1 pixels per pixel."""
    t = np.array([NOMINAL_EXPTIME[c] for c in CHANNELS])
    y = noisy_observation(np.asarray(forward(K, em)) * g_true, t, CHANNELS, rng, n_sample=n_sample)
    return y, sigma_values(y, t, CHANNELS, n_sample)


def real_pixels(n, rebin, rng):
    """(intensities, sigma, weight (N,), info) of up to ``n`` random on-disk pixels of the
    2024-10-04 synoptic set, padded to ``n`` rows of weight 0; None without the data."""
    from sunpy.map.maputils import all_coordinates_from_map

    from deepem_jax.io import load_aia

    try:
        files = [fetch(f"aia/synoptic_{DATE}/AIAsynoptic{c:04d}.fits") for c in CHANNELS]
    except DataFileNotFoundError as err:
        print(f"real date {DATE}: skipped ({str(err).split('. ')[0]})")
        return None
    stack = load_aia(files, np.array(CHANNELS) * u.AA, rebin=rebin)
    ref_map = stack.reference_map()
    xy = all_coordinates_from_map(ref_map)
    r = np.hypot(xy.Tx, xy.Ty).to_value(u.arcsec) / ref_map.rsun_obs.to_value(u.arcsec)
    good = (r < 0.9) & ~stack.mask & np.all(stack.data > 0, axis=-1)
    candidates = int(good.sum())
    idx = np.sort(rng.choice(np.flatnonzero(good), min(n, candidates), replace=False))
    # n rows (the shapes of the synthetic cases: no new compilation); padding rows repeat
    # real pixels with weight 0
    rows = idx[np.arange(n) % len(idx)]
    y = stack.data.reshape(-1, len(CHANNELS))[rows]
    s = stack.sigma().reshape(-1, len(CHANNELS))[rows]
    weight = (np.arange(n) < len(idx)).astype(np.float64)
    info = {
        "obstime": [t[:19] for t in stack.obstime.isot],
        "pixels": len(idx),
        "on_disk_candidates": candidates,
        "rebin": rebin,
        "n_sample": int(stack.n_sample),
    }
    return y, s, weight, info, stack.obstime


def table(rows: list[tuple], head: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def compare(name: str, est: np.ndarray, ref: np.ndarray, ref_name: str) -> tuple[str, list]:
    """Markdown table of an estimate against reference factors (both / their 171 Å value) and
    the CSV rows."""
    rel = est / ref - 1
    rows = [
        (f"{c} Å", f"{r:.4f}", f"{e:.4f}", f"{100 * d:+.2f} %")
        for c, r, e, d in zip(CHANNELS, ref, est, rel, strict=True)
    ]
    head = ("channel", f"{ref_name} / {REFERENCE} Å", f"estimate / {REFERENCE} Å", "difference")
    csv_rows = [
        [name, c, f"{r:.6f}", f"{e:.6f}", f"{d:.6f}"]
        for c, r, e, d in zip(CHANNELS, ref, est, rel, strict=True)
    ]
    return table(rows, head), csv_rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pixels", type=int, default=20_000, help="pixels per case")
    ap.add_argument("--components", type=int, default=3, help="Gaussians of the DEM model (< 5)")
    ap.add_argument(
        "--logt-range",
        type=float,
        nargs=2,
        default=(5.8, 6.6),
        help="log T of the first and last component's peak",
    )
    ap.add_argument(
        "--n-sample",
        type=float,
        default=256,
        help="level-1 pixels per synthetic pixel (256: a synoptic image, rebinned 4x4)",
    )
    ap.add_argument("--rebin", type=int, default=4, help="n x n averaging of the real images")
    ap.add_argument("--steps", type=int, default=100, help="most outer L-BFGS steps")
    ap.add_argument("--gtol", type=float, default=1e-6, help="outer gradient tolerance")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output directory (default: a new temporary one)")
    args = ap.parse_args()
    if not 1 <= args.components < len(CHANNELS):
        ap.error(f"--components must be 1..{len(CHANNELS) - 1} (fewer than the channels)")
    return args


def main() -> None:
    args = parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="deepem_calibrate_"))
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    ref = CHANNELS.index(REFERENCE)
    response = default_response().regrid(DEEPEM_LOGT).select(np.array(CHANNELS) * u.AA)
    K = np.asarray(response.K, np.float64)
    phi, peaks, width = components(args.components, tuple(args.logt_range))
    K_model = K @ phi.T  # (C, M): the response of each component
    n = args.pixels
    report: dict = {
        "channels": CHANNELS,
        "normalisation": f"factors divided by the {REFERENCE} A factor",
        "response": response.name,
        "dem_model": {
            "components": args.components,
            "logt_peaks": peaks.round(4).tolist(),
            "width_logt": round(width, 4),
        },
    }
    csv_rows: list[list] = []
    print(
        f"DEM model: {args.components} Gaussians in log T (peaks "
        f"{', '.join(f'{p:.2f}' for p in peaks)}; width {width:.3f}) with non-negative weights; "
        f"factors relative to {REFERENCE} Å (a global scale is degenerate with the EM)"
    )
    fit_args = dict(ref=ref, max_steps=args.steps, gtol=args.gtol)

    # (1) and (2): synthetic pixels with injected factors
    g_true = np.exp(rng.uniform(np.log(0.15), 0.0, len(CHANNELS)))
    g_norm = g_true / g_true[ref]
    totals = 10 ** rng.uniform(26.5, 28.5, n)
    em_model = (totals[:, None] * rng.dirichlet(np.ones(args.components), n)) @ phi
    cases = {
        "synthetic": ("DEMs from the model", em_model),
        "synthetic_prior": ("DEMs from the documented prior, not in the model", None),
    }
    failed = None
    for key, (label, em) in cases.items():
        if em is None:
            em = random_dems(DEEPEM_LOGT, n, rng)
        t0 = time.perf_counter()
        y, s = synthetic(em, g_true, args.n_sample, rng, K)
        res = calibrate(y, s, np.ones(n), K_model, **fit_args)
        err = float(np.max(np.abs(res["g"] / g_norm - 1)))
        text, rows = compare(key, res["g"], g_norm, "injected")
        csv_rows += rows
        print(
            f"\n{key} ({label}; {n:,} pixels, n_sample {args.n_sample:g}): "
            f"{outer(res)}, {time.perf_counter() - t0:.1f} s, mean chi2/2 per pixel "
            f"{res['loss']:.4g}, inner fits {res['fit_status']}\n{text}"
        )
        report[key] = {
            "description": label,
            "pixels": n,
            "n_sample": args.n_sample,
            "injected": dict(zip(CHANNELS, g_norm.tolist(), strict=True)),
            "estimate": dict(zip(CHANNELS, res["g"].tolist(), strict=True)),
            "max_relative_error": err,
            "loss": res["loss"],
            "steps": res["steps"],
            "converged": res["converged"],
            "fit_status": res["fit_status"],
            "dropped": res["dropped"],
        }
        if key == "synthetic":
            print(
                f"synthetic recovery: max relative error {100 * err:.2f} % "
                f"(limit {100 * LIMIT:g} %)"
            )
            if not (err <= LIMIT and res["converged"]):
                failed = f"synthetic recovery failed: max relative error {100 * err:.2f} %"
        else:
            print(
                f"synthetic with a wrong DEM model: max relative error {100 * err:.1f} % "
                "(how far a DEM model that does not fit can pull the estimate)"
            )

    # (3): the real date
    print()
    real = real_pixels(n, args.rebin, rng)
    if real is not None:
        y, s, weight, info, obstime = real
        t0 = time.perf_counter()
        res = calibrate(y, s, weight, K_model, **fit_args)
        v10 = degradation(np.array(CHANNELS) * u.AA, obstime)
        v10_norm = v10.factors / v10.factors[ref]
        at = partial(calibrate, y, s, weight, K_model, **{**fit_args, "max_steps": 0})
        losses = {
            "estimate": res["loss"],
            "V10": at(g0=v10_norm)["loss"],
            "undegraded": at(g0=np.ones(len(CHANNELS)))["loss"],
        }
        text, rows = compare("real", res["g"], v10_norm, "V10")
        csv_rows += rows
        print(
            f"real {DATE} (T_OBS {info['obstime'][0]}..): {info['pixels']:,} on-disk pixels "
            f"(rebin {info['rebin']}, n_sample {info['n_sample']}): {outer(res)}, "
            f"{time.perf_counter() - t0:.1f} s, inner fits {res['fit_status']}\n{text}"
        )
        print(
            "mean chi2/2 per pixel with the fitted factors {estimate:.4g}, with V10's "
            "{V10:.4g}, undegraded {undegraded:.4g}".format(**losses)
        )
        print(
            "(an estimate under this DEM model: the wrong-model synthetic case above shows how "
            "far the model alone moves the factors)"
        )
        report["real"] = {
            **info,
            "date": DATE,
            "estimate": dict(zip(CHANNELS, res["g"].tolist(), strict=True)),
            "v10": dict(zip(CHANNELS, v10_norm.tolist(), strict=True)),
            "v10_absolute": dict(zip(CHANNELS, v10.factors.tolist(), strict=True)),
            "v10_table": v10.table,
            "loss": losses,
            "steps": res["steps"],
            "converged": res["converged"],
            "fit_status": res["fit_status"],
            "dropped": res["dropped"],
        }

    path = out / "calibration.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    path = out / "calibration_factors.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["case", "channel_A", "reference", "estimate", "relative_difference"])
        writer.writerows(csv_rows)
    print(f"wrote {path}")
    if failed:
        raise SystemExit(failed)


if __name__ == "__main__":
    with jax.enable_x64(True):
        main()
