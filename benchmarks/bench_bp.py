"""Throughput of exact Basis Pursuit on real pixels: the JAX dual simplex, cold and warm-started
from the shipped basis tables, against one ``scipy.optimize.linprog(method="highs")`` call per
pixel on the same pixels in the same run.

Plain script, not a test::

    DEEPEM_JAX_DATA=../shared/data python benchmarks/bench_bp.py --pixels 200000 --out bp.json

Pixel sets: the real 2024-10-04 synoptic image (131-335 Å, ``--pixels`` random pixels), the
real 2011-02-15 flare cutouts (six channels, every unsaturated pixel of the ten times) and
synthetic pixels (random DEMs of the documented prior, n_sample 16, 2 s exposures). Each is
calibrated as :func:`deepem_jax.invert` does (sigma with the file's n_sample, intensities and
sigma corrected for degradation at each channel's time) and solved at tolfac 1.4 without
retries, so every method sees exactly the same LPs.

Rows, each the median of at least ``--repeats`` calls after one call that compiles (more
until ``--min-seconds`` are timed: the small flare set needs many calls for a stable median
on a shared machine):

* ``linprog(highs)``: :func:`deepem_jax.bp.highs_lp`, one call per pixel, on the first
  ``--highs-pixels`` pixels (the reference every ratio is taken against);
* ``solve_lp cold`` / ``solve_lp warm``: the bare float32 :func:`deepem_jax.bp.solve_lp` from
  the all-slack basis / from the shipped :class:`deepem_jax.bp.BasisTable`;
* ``bp.solve cold`` / ``bp.solve warm``: the host driver (float32 pivots, every basis
  certified in float64, uncertified pixels re-solved in float64): what ``invert`` runs.

Agreement with HiGHS (verdicts; objectives within 1e-4 relative) is checked for every row on
the HiGHS pixels, and the fractions of pixels whose table basis is optimal at once (no
pivot) and of pixels a ray of the table proves infeasible (float32 test) are reported. The shipped
tables were learned from both real dates: for dates a table never saw, see
``examples/train_basis_table.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import astropy.units as u
import jax
import numpy as np

from deepem_jax import bp, invert
from deepem_jax.basis import cheung_basis, dictionary
from deepem_jax.data import reference_observations
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.uncertainty import aia_sigma

BASIS = cheung_basis(DEEPEM_LOGT)
ONCE = bp.ToleranceSchedule(retry_factors=(), min_signal=0.0)


def _corrected(stacks, channels, n: int | None, rng):
    """Degradation-corrected intensities and sigma (N, C) of the valid pixels of stacks."""
    ys, ss = [], []
    for st in stacks:
        r = invert(st, "bp", channels=channels * u.AA)
        ok = np.all(np.isfinite(r.corrected_intensities), -1) & (r.status != 4) & (r.status != 6)
        ys.append(r.corrected_intensities[ok])
        ss.append(r.corrected_sigma[ok])
    y, s = np.concatenate(ys), np.concatenate(ss)
    if n is not None and len(y) > n:
        pick = rng.choice(len(y), n, replace=False)
        y, s = y[pick], s[pick]
    return y, s


def pixel_sets(n: int, rng) -> dict[str, tuple]:
    """{name: (channels, y, sigma)}; the real sets only when their files are present."""
    five, six = [131, 171, 193, 211, 335], [94, 131, 171, 193, 211, 335]
    sets = {}
    synoptic = reference_observations("2024-10-04")
    if synoptic:
        sets["synoptic 2024-10-04"] = (five, *_corrected(synoptic, five, n, rng))
    sets["flare 2011-02-15"] = (six, *_corrected(reference_observations("2011-02-15"), six, n, rng))
    resp = default_response().regrid(DEEPEM_LOGT).select(six * u.AA)
    em = random_dems(DEEPEM_LOGT, n, rng)
    with jax.enable_x64(True):
        y0 = np.asarray(forward(resp.K, em))
    y = noisy_observation(y0, 2.0, six, rng, n_sample=16)
    dn = u.DN / (u.s * u.pix)
    s = aia_sigma(np.maximum(y, 0) * dn, 2.0 * u.s, resp.wavelength, n_sample=16).to_value(dn)
    sets["synthetic"] = (six, y, s)
    return sets


def _median_time(fn, repeats: int, min_seconds: float):
    out = fn()  # compiles
    jax.block_until_ready(out)
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def _agreement(status, objective, ref) -> dict:
    st, obj = np.asarray(status)[: len(ref.status)], np.asarray(objective, np.float64)
    obj = obj[: len(ref.status)]
    both = (st == 0) & (ref.status == 0)
    rel = np.abs(obj - ref.objective)[both] / np.maximum(ref.objective[both], 1e-30)
    bad = np.flatnonzero((st == 0) != (ref.status == 0))
    if bad.size:
        print(f"    verdicts differing from HiGHS at pixels {bad[:10].tolist()}")
    return {
        "verdicts_equal": float(np.mean((st == 0) == (ref.status == 0))),
        "objective_within_1e-4": float(np.mean(rel <= 1e-4)) if rel.size else 1.0,
    }


def bench_set(name, channels, y, s, args) -> list[dict]:
    resp = default_response().regrid(DEEPEM_LOGT).select(channels * u.AA)
    with jax.enable_x64(True):
        D = np.asarray(dictionary(resp, BASIS), np.float64)
        lower, upper = (np.asarray(a) for a in bp.bounds(y, s, 1.4))
    table = bp.default_table(channels)
    m = min(args.highs_pixels, len(y))
    t0 = time.perf_counter()
    ref = bp.highs_lp(D, lower[:m], upper[:m])
    highs_rate = m / (time.perf_counter() - t0)
    rows = [
        {"set": name, "method": "linprog(highs) per pixel", "pixels": m, "px_per_s": highs_rate}
    ]
    lo32, hi32, D32 = lower.astype(np.float32), upper.astype(np.float32), D.astype(np.float32)
    ray_proven = float(np.mean(table.proves_infeasible(D32, lo32, hi32)))
    runs = {
        "solve_lp cold (float32)": lambda: bp.solve_lp(D32, lo32, hi32),
        "solve_lp warm (float32)": lambda: bp.solve_lp(D32, lo32, hi32, warm_start=table),
        "bp.solve cold (certified)": lambda: bp.solve(
            y, s, resp, BASIS, solver=bp.DualSimplex(warm_start=None), schedule=ONCE, coeffs=False
        ),
        "bp.solve warm (certified)": lambda: bp.solve(
            y, s, resp, BASIS, solver=bp.DualSimplex(warm_start=table), schedule=ONCE, coeffs=False
        ),
    }
    for method, fn in runs.items():
        out, dt = _median_time(fn, args.repeats, args.min_seconds)
        its = np.asarray(out.iterations)
        row = {
            "set": name,
            "method": method,
            "pixels": len(y),
            "px_per_s": len(y) / dt,
            "x_linprog": len(y) / dt / highs_rate,
            "mean_pivots": float(its.mean()),
            **_agreement(out.status, out.objective, ref),
        }
        if "warm" in method:
            row["no_pivot"] = float(np.mean((its == 0) & (np.asarray(out.status) == 0)))
            row["ray_proven"] = ray_proven
        rows.append(row)
        print(f"  {method:28s} {row['px_per_s']:>10,.0f} px/s  {row['x_linprog']:6.0f}x linprog")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=100_000, help="pixels per set (at most)")
    ap.add_argument("--highs-pixels", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="repeat each timed call until at least this many seconds are timed",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    rows = []
    for name, (channels, y, s) in pixel_sets(args.pixels, rng).items():
        print(f"{name}: {len(y):,} pixels, {len(channels)} channels")
        rows.extend(bench_set(name, channels, y, s, args))
    meta = {
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
    }
    print(json.dumps(meta))
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
