"""Learn the tables of optimal Basis Pursuit bases that warm-start the dual simplex
(``deepem_jax.bp.DualSimplex(warm_start=...)``), and score them on dates they never saw.

    python examples/train_basis_table.py --channels 5 --out tables      # shipped cutouts only
    DEEPEM_JAX_DATA=../shared/data python examples/train_basis_table.py --channels 5 --out t5

A table holds the distinct optimal bases BP returned on training pixels, most frequent first,
and the Farkas rays that proved its infeasible pixels infeasible
(:class:`deepem_jax.bp.BasisTable`). Training pixels: the real observations of the training
dates (calibrated as :func:`deepem_jax.invert` does: sigma with the file's ``n_sample``,
degradation-corrected), pixels synthesised from their BP solutions at real noise levels
(:func:`deepem_jax.prior.realistic_observations`: n_sample 1-64, exposures 0.005-3 s, the
degradation of a random date) and synthetic DEMs of the documented prior at the same noise
levels. Every band is solved by the float64 dual simplex.

For each evaluation date the script learns a table from the *other* dates (plus the synthetic
pixels) and reports, over that date's bands: the fraction of the solved ones certified at the
first try (the table's basis for the pixel is primal feasible, so the float64 simplex takes no
pivot), the fraction of its infeasible pixels a ray of the table proves, the mean pivots from
the table's start and from the all-slack basis, and whether the warm-started answers equal the
cold ones (verdicts, objectives within 1e-9 relative). Then it learns the table from every date
and writes it (``--out``/``bp_bases_<channels>.npz``; the tables in ``deepem_jax/tables/`` were
written by this script with the default options and ``DEEPEM_JAX_DATA`` set), with a
``report.json`` of the scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import astropy.units as u
import jax
import numpy as np

from deepem_jax import DEMStatus, bp, invert
from deepem_jax.basis import cheung_basis, dictionary
from deepem_jax.data import REFERENCE_DATES, reference_observations
from deepem_jax.forward import random_dems
from deepem_jax.prior import real_dem_prior, realistic_observations
from deepem_jax.response import DEEPEM_LOGT, default_response

CHANNELS = {6: [94, 131, 171, 193, 211, 335], 5: [131, 171, 193, 211, 335]}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, choices=(5, 6), default=5)
    ap.add_argument("--out", required=True, help="directory for the table and report.json")
    ap.add_argument("--synthetic", type=int, default=300_000, help="synthetic-prior pixels")
    ap.add_argument(
        "--prior-pixels", type=int, default=300_000, help="pixels synthesised per real date"
    )
    ap.add_argument("--rebin", type=int, default=1, help="rebin the synoptic set by this")
    ap.add_argument("--max-size", type=int, default=4096, help="bases kept per table")
    ap.add_argument("--max-rays", type=int, default=128, help="Farkas rays kept per table")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


class Date:
    """One reference date: its BP results (any channels it has) and, if it has the table's
    channels, the bands (lower, upper) BP solved or proved infeasible: each pixel's band at
    its final tolerance factor, and the nominal band of the pixels solved only at a retry."""

    def __init__(self, name: str, channels: list[int], rebin: int) -> None:
        self.name = name
        self.results, bands = [], []
        for stack in reference_observations(name, rebin=rebin):
            res = invert(stack, "bp", progress=True)
            self.results.append(res)
            if not set(channels) <= set(res.channels):
                continue
            if list(res.channels) != channels:
                res = invert(stack, "bp", channels=channels * u.AA, progress=True)
            lower, upper = res.band()
            ok = (res.status == DEMStatus.SOLVED) | (res.status == DEMStatus.INFEASIBLE)
            bands.append((lower[ok], upper[ok]))
            nominal = float(res.provenance["TOLFAC"])
            retried = (res.status == DEMStatus.SOLVED) & (res.band_tolfac > nominal)
            with jax.enable_x64(True):
                lo, hi = bp.bounds(
                    res.corrected_intensities[retried],
                    res.corrected_sigma[retried],
                    nominal,
                )
            bands.append((np.asarray(lo), np.asarray(hi)))
        self.bands = (
            tuple(np.concatenate([b[i] for b in bands]) for i in range(2)) if bands else None
        )


def synthetic_bands(em: np.ndarray, response, rng) -> tuple[np.ndarray, np.ndarray]:
    """BP bands (tolfac 1.4) of EMs seen at real noise levels."""
    y, s = realistic_observations(em, response, rng)
    with jax.enable_x64(True):
        return tuple(np.asarray(a) for a in bp.bounds(y, s, 1.4))


def learn(dates: list[Date], D, response, args, rng) -> bp.BasisTable:
    """The table of the real bands of ``dates``, pixels synthesised from their BP solutions
    and synthetic-prior pixels."""
    lows, highs = [], []
    for d in dates:
        if d.bands is not None:
            lows.append(d.bands[0])
            highs.append(d.bands[1])
        em = real_dem_prior(d.results)
        lo, hi = synthetic_bands(em[rng.choice(len(em), args.prior_pixels)], response, rng)
        lows.append(lo)
        highs.append(hi)
    lo, hi = synthetic_bands(random_dems(DEEPEM_LOGT, args.synthetic, rng), response, rng)
    lows.append(lo)
    highs.append(hi)
    return bp.learn_table(
        D,
        np.concatenate(lows),
        np.concatenate(highs),
        response.channels,
        max_size=args.max_size,
        max_rays=args.max_rays,
    )


def score(table: bp.BasisTable, D, lower, upper) -> dict:
    """First-try certification and agreement with the cold simplex (float64) on bands."""
    with jax.enable_x64(True):
        warm = bp.solve_lp(D, lower, upper, dtype=np.float64, warm_start=table)
        cold = bp.solve_lp(D, lower, upper, dtype=np.float64)
    ws, cs = np.asarray(warm.status), np.asarray(cold.status)
    wo, co = np.asarray(warm.objective), np.asarray(cold.objective)
    solved, infeasible = cs == DEMStatus.SOLVED, cs == DEMStatus.INFEASIBLE
    rel = np.abs(wo - co)[solved] / np.maximum(co[solved], 1e-300)
    first_try = solved & (ws == DEMStatus.SOLVED) & (np.asarray(warm.iterations) == 0)
    by_ray = table.proves_infeasible(D, lower.astype(np.float32), upper.astype(np.float32))
    return {
        "pixels": int(len(lower)),
        "table_size": table.size,
        "rays": len(table.rays),
        "certified_first_try": float(first_try.sum() / max(solved.sum(), 1)),
        "infeasible": int(infeasible.sum()),
        "infeasible_proven_by_ray": float(by_ray[infeasible].sum()) / max(int(infeasible.sum()), 1),
        "mean_pivots_warm": float(np.mean(warm.iterations)),
        "mean_pivots_cold": float(np.mean(cold.iterations)),
        "same_verdicts": float(np.mean(ws == cs)),
        "objective_max_rel_diff": float(rel.max()) if rel.size else 0.0,
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    channels = CHANNELS[args.channels]
    response = default_response().regrid(DEEPEM_LOGT).select(channels * u.AA)
    with jax.enable_x64(True):
        D = np.asarray(dictionary(response, cheung_basis(response.logt_array)), np.float64)
    dates = [Date(name, channels, args.rebin) for name in REFERENCE_DATES]
    dates = [d for d in dates if d.results]
    rng = np.random.default_rng(args.seed)
    report = {"channels": channels, "held_out": {}}
    for d in dates:
        if d.bands is None:
            continue
        others = [o for o in dates if o is not d]
        table = learn(others, D, response, args, rng)
        row = score(table, D, *d.bands)
        row["learned_from"] = [o.name for o in others] + ["synthetic"]
        report["held_out"][d.name] = row
        print(f"held out {d.name}: {json.dumps(row)}")
    table = learn(dates, D, response, args, rng)
    path = out / ("bp_bases_" + "-".join(map(str, channels)) + ".npz")
    table.save(path)
    report["shipped"] = {"learned_from": [d.name for d in dates] + ["synthetic"]}
    report["shipped"]["table_size"] = table.size
    report["shipped"]["rays"] = len(table.rays)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    print(f"wrote {out / 'report.json'}")


if __name__ == "__main__":
    main()
