"""Load the three real AIA temperature-response tables and plot them side by side with the
embedded default (demregpy's table).

    DEEPEM_JAX_DATA=../shared/data python examples/plot_responses.py [OUT.png]

The tables are registered data files (:func:`deepem_jax.data.fetch`: the data directory is
``$DEEPEM_JAX_DATA``, else the user cache). Writes the PNG to OUT.png (default
``aia_responses.png`` in the temporary directory) and prints, per channel, the range of the
ratio of DeepEM's matrix to the GENX table on DeepEM's grid.
"""

import argparse
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from deepem_jax.data import fetch
from deepem_jax.response import TemperatureResponse, default_response


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "out",
        nargs="?",
        default=str(Path(tempfile.gettempdir(), "aia_responses.png")),
        help="PNG to write (default: aia_responses.png in the temporary directory)",
    )
    out = ap.parse_args().out
    tables = {
        "SSW GENX (2020)": TemperatureResponse.from_genx(
            fetch("deepem/PaulJWright_DeepEM/DeepEM_Data/aia_temperature_resp.genx")
        ),
        "CSV (pi-DEM, 2022)": TemperatureResponse.from_csv(
            fetch("deepem/RobertJaro_DeepEM/data/aia_temperature_response.csv")
        ),
        "DeepEM AIA_Resp.npy (6x18)": TemperatureResponse.from_deepem_npy(
            fetch("deepem/HelioML_HelioML/book/04/DeepEM_Data/AIA_Resp.npy")
        ),
        "default: demregpy aia_tresp_en": default_response(),
    }
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.8), sharey=True)
    for ax, (title, r) in zip(axes, tables.items(), strict=True):
        for ch, row in zip(r.channels, np.asarray(r.K), strict=True):
            ax.semilogy(r.logt_array, row, label=f"{ch} Å", marker="." if r.K.shape[1] < 30 else "")
        ax.set_xlim(5.0, 7.6)
        ax.set_ylim(1e-28, 3e-24)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("log$_{10}$(T / K)")
    axes[0].set_ylabel("K [DN cm$^5$ s$^{-1}$ pix$^{-1}$]")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    g, n = tables["SSW GENX (2020)"], tables["DeepEM AIA_Resp.npy (6x18)"]
    ratio = np.asarray(n.K) / np.asarray(g.regrid(n.logt).K)
    for ch, row in zip(n.channels, ratio, strict=True):
        print(f"DeepEM/GENX {ch:3d} Å: min {row.min():.3f} max {row.max():.3f}")


if __name__ == "__main__":
    main()
