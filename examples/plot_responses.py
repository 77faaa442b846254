"""Load the three real AIA temperature-response tables and plot them side by side with the
embedded default (demregpy's table).

    DEEPEM_JAX_DATA=../shared/data python examples/plot_responses.py [out.png]
"""

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from deepem_jax.response import TemperatureResponse, default_response


def main(out: str = "aia_responses.png") -> None:
    root = Path(os.environ.get("DEEPEM_JAX_DATA", "../shared/data"), "deepem")
    tables = {
        "SSW GENX (2020)": TemperatureResponse.from_genx(
            root / "PaulJWright_DeepEM/DeepEM_Data/aia_temperature_resp.genx"
        ),
        "CSV (pi-DEM, 2022)": TemperatureResponse.from_csv(
            root / "RobertJaro_DeepEM/data/aia_temperature_response.csv"
        ),
        "DeepEM AIA_Resp.npy (6x18)": TemperatureResponse.from_deepem_npy(
            root / "HelioML_HelioML/book/04/DeepEM_Data/AIA_Resp.npy"
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
        ax.set_xlabel("log10 T [K]")
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
    main(*sys.argv[1:])
