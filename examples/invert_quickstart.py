"""The README quick start as a script: DEMs of a real AIA observation by Basis Pursuit and by the
shipped network, with one call each.

    python examples/invert_quickstart.py [OUT_DIR]

Inverts the six-channel level-1 cutouts of NOAA AR 11158 on 2011-02-15 01:44 UTC that ship with
deepem_jax (:func:`deepem_jax.data.sample_observation`; :func:`deepem_jax.invert` co-registers
them, computes sigma with the AIA error model and corrects the degradation at the observation
time), prints per method the pixel count of each status and the median chi^2, and writes to
OUT_DIR (default: a new temporary directory; files of an earlier run there are replaced):

* ``dem_bp.fits``, ``dem_net.fits``: EM cubes (log T, y, x) in cm^-5 with STATUS and CHI2
  extensions and the provenance header;
* ``figure1.png``: AIA 171 Å | BP EM | network EM at log T 5.9, failed and out-of-band pixels
  in colours of their own.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import deepem_jax as dj
from deepem_jax.data import sample_observation
from deepem_jax.products import compare_figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "out", nargs="?", default=None, help="output directory (default: a new temporary one)"
    )
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="deepem_quickstart_"))
    out.mkdir(parents=True, exist_ok=True)

    files = sample_observation("01:44")
    results = {method: dj.invert(files, method=method) for method in ("bp", "net")}
    for method, res in results.items():
        counts = ", ".join(f"{name} {n:,}" for name, n in res.status_counts().items())
        print(f"{method}: {res.status.size:,} pixels: {counts}")
        print(f"{method}: median chi2 {np.nanmedian(res.chi2):.3g} (pixels with an EM)")
        print(f"wrote {res.to_fits(out / f'dem_{method}.fits', overwrite=True)}")

    bp, net = results["bp"], results["net"]
    png = out / "figure1.png"
    compare_figure(bp, net, path=png, title="NOAA AR 11158, AIA 2011-02-15 01:44 UTC")
    print(f"wrote {png}")


if __name__ == "__main__":
    main()
