"""Where level-1 AIA pixels saturate, and what BP makes of the pixels a saturation level lets
through.

    DEEPEM_JAX_DATA=../shared/data python examples/saturation_plateaus.py
    python examples/saturation_plateaus.py DIR --levels 13500,15000

``DIR`` holds AIA FITS files in DN per exposure of one or more times, six channels per time
(default: ``$DEEPEM_JAX_DATA/aia/flare_2011-02-15``, ten times of an X2 flare), grouped into
observations by :func:`deepem_jax.series.group_files`. A saturated
region is a *plateau*: the ADC's limit (16383 DN) after the dark and flat-field corrections, so
its pixels agree with their neighbours far more closely than solar structure does. Here a pixel
is on a plateau when its whole 3x3 neighbourhood is at least ``--floor`` DN and agrees within
``--flat`` (max < (1 + flat) min). Prints, per channel, the plateau pixels, the lowest and
median of their values, and how many of them each saturation level (``--levels``, DN per
exposure) would leave unflagged; then, per level, the pixels :func:`deepem_jax.load_aia` leaves
usable over all times and how many of those Basis Pursuit finds INFEASIBLE.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections import defaultdict
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from scipy import ndimage

from deepem_jax import invert, load_aia
from deepem_jax.series import group_files
from deepem_jax.status import DEMStatus


def raw_dn(path: Path) -> tuple[int, np.ndarray]:
    """The file's channel (Å) and image in DN per exposure (float64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=False) as hdul:
            hdu = next(h for h in hdul if h.data is not None)
            return int(hdu.header["WAVELNTH"]), hdu.data.astype(np.float64)


def plateau(raw: np.ndarray, floor: float, flat: float) -> np.ndarray:
    """(ny, nx) bool: pixels whose 3x3 neighbourhood is >= floor and agrees within flat."""
    lo = ndimage.minimum_filter(raw, 3, mode="nearest")
    hi = ndimage.maximum_filter(raw, 3, mode="nearest")
    return (lo >= floor) & (hi < (1 + flat) * lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(os.environ.get("DEEPEM_JAX_DATA", "../shared/data"))
    ap.add_argument("folder", nargs="?", type=Path, default=root / "aia" / "flare_2011-02-15")
    ap.add_argument("--levels", default="13500,15000", help="saturation levels, DN per exposure")
    ap.add_argument("--floor", type=float, default=10000.0, help="plateau floor, DN")
    ap.add_argument("--flat", type=float, default=0.03, help="plateau flatness (fraction)")
    args = ap.parse_args()
    if not args.folder.is_dir():
        raise SystemExit(f"no folder {args.folder} (set DEEPEM_JAX_DATA or pass DIR)")
    levels = [float(v) for v in args.levels.split(",")]
    sets = group_files(sorted(args.folder.glob("*.fits")))

    values: dict[int, list[np.ndarray]] = defaultdict(list)
    for files in sets:
        for path in files:
            chan, raw = raw_dn(path)
            values[chan].append(raw[plateau(raw, args.floor, args.flat)])
    print(f"{len(sets)} times; plateau: 3x3 >= {args.floor:.0f} DN, flat within {args.flat:.0%}")
    head = " | ".join(f"unflagged at {v:.0f}" for v in levels)
    print(f"| channel | plateau pixels | lowest DN | median DN | {head} |")
    print("|---" * (4 + len(levels)) + "|")
    for chan in sorted(values):
        v = np.concatenate(values[chan])
        low, med = (f"{np.min(v):.0f}", f"{np.median(v):.0f}") if v.size else ("—", "—")
        left = " | ".join(str(int(np.sum(v < lev))) for lev in levels)
        print(f"| {chan} Å | {v.size} | {low} | {med} | {left} |")

    print("\n| saturation level | usable pixels | BP INFEASIBLE |")
    print("|---|---|---|")
    for level in levels:
        usable = infeasible = 0
        for files in sets:
            stack = load_aia(files, saturation_level=level * u.DN)
            status = invert(stack, "bp").status
            usable += int(np.sum(~stack.mask))
            infeasible += int(np.sum(status == DEMStatus.INFEASIBLE))
        share = infeasible / max(usable, 1)
        print(f"| {level:.0f} DN | {usable:,} | {infeasible:,} ({share:.1%}) |")


if __name__ == "__main__":
    main()
