"""Throughput of Basis Pursuit: JAX dual simplex (float32 / float64) vs SciPy HiGHS per pixel.

Plain script, not a test::

    python benchmarks/bench_bp.py --pixels 20000 --highs-pixels 500 --out bench_bp.json

Pixels are noisy observations (2 s exposures, AIA error model) of random DEMs synthesised with
the real SolarSoft response (``$DEEPEM_JAX_DATA``; falls back to the demregpy default table)
on DeepEM's 18-bin grid with widths (0, 0.1, 0.2) -> 54 basis functions. All rates go through
the full host driver ``bp.solve`` (tolfac 1.4, retries 1.5 and 2.25; float32 includes the
float64 certification and re-solves), measured warm (after one call that compiles).
HiGHS runs on the first ``--highs-pixels`` pixels only; its rate is extrapolated per pixel.
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

from deepem_jax import bp
from deepem_jax.basis import cheung_basis
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.response import DEEPEM_LOGT, TemperatureResponse, default_response
from deepem_jax.uncertainty import aia_sigma


def _response() -> TemperatureResponse:
    root = os.environ.get(
        "DEEPEM_JAX_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    genx = Path(root, "deepem", "PaulJWright_DeepEM", "DeepEM_Data", "aia_temperature_resp.genx")
    resp = TemperatureResponse.from_genx(genx) if genx.exists() else default_response()
    return resp.regrid(DEEPEM_LOGT)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pixels", type=int, default=20_000)
    ap.add_argument("--highs-pixels", type=int, default=500)
    ap.add_argument("--chunk-size", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = ap.parse_args()

    resp = _response()
    basis = cheung_basis(DEEPEM_LOGT)
    rng = np.random.default_rng(args.seed)
    em = random_dems(DEEPEM_LOGT, args.pixels, rng)
    with jax.enable_x64(True):
        y0 = np.asarray(forward(resp.K, em))
    y = noisy_observation(y0, 2.0, resp.channels, rng)
    unit = u.DN / (u.s * u.pix)
    sig = aia_sigma(np.maximum(y, 0) * unit, 2.0 * u.s, resp.wavelength).to_value(unit)

    out = {
        "response": resp.name,
        "pixels": args.pixels,
        "n_basis": basis.n_basis,
        "channels": list(resp.channels),
        "device": str(jax.devices()[0]),
        "jax": jax.__version__,
        "cpu_cores": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    results = {}
    for prec in ("float32", "float64"):
        solver = bp.DualSimplex(precision=prec, chunk_size=args.chunk_size)
        bp.solve(y, sig, resp, basis, solver=solver)  # compile every shape the run needs
        res, dt = _timed(lambda s=solver: bp.solve(y, sig, resp, basis, solver=s))
        results[prec] = res
        out[f"jax_{prec}_px_per_s"] = args.pixels / dt
        out[f"jax_{prec}_status_counts"] = np.bincount(res.status, minlength=5).tolist()
        out[f"jax_{prec}_mean_pivots"] = float(res.iterations.mean())
    m = min(args.highs_pixels, args.pixels)
    ref, dt = _timed(lambda: bp.solve(y[:m], sig[:m], resp, basis, solver=bp.HiGHS()))
    out["highs_pixels"] = m
    out["highs_px_per_s"] = m / dt
    for prec in ("float32", "float64"):
        out[f"ratio_{prec}_vs_highs"] = out[f"jax_{prec}_px_per_s"] / out["highs_px_per_s"]
        r = results[prec]
        rel = np.abs(r.objective[:m] - ref.objective) / np.maximum(ref.objective, 1e-30)
        out[f"{prec}_status_agree_with_highs"] = float(np.mean(r.status[:m] == ref.status))
        out[f"{prec}_max_rel_objective_diff"] = float(np.max(rel[ref.status == 0]))

    for k, v in out.items():
        print(f"{k:34s} {v:.4g}" if isinstance(v, float) else f"{k:34s} {v}")
    print(f"(HiGHS measured on {m} pixels and extrapolated per pixel)")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
