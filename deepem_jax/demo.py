"""``deepem-jax demo``: the whole chain on real AIA data the package can reach.

With ``$DEEPEM_JAX_DATA`` holding the real AIA synoptic observation of 2024-10-04 (five
channels, 131--335 Å; its 94 Å file is corrupt as published), the demo inverts it with
five-channel BP and the shipped five-channel network. Otherwise it inverts the six-channel
level-1 active-region cutouts of 2011-02-15 01:44 shipped inside the package. Both go through
:func:`deepem_jax.invert` (error model with the file's ``n_sample``, degradation at the
observation time). It writes ``demo_figure1.png`` (AIA 171 | BP EM at log T 5.9 | network EM)
and ``demo_report.md`` (timings, status counts, network-vs-BP fidelity table).
"""

import os
from collections.abc import Callable
from pathlib import Path

import astropy.units as u
import numpy as np

from ._atomic import atomic_write

SYNOPTIC = "aia/synoptic_2024-10-04"
FIVE = [131, 171, 193, 211, 335] * u.AA


def _synoptic_files() -> list[Path] | None:
    """The five real synoptic files if ``$DEEPEM_JAX_DATA`` holds all of them."""
    root = os.environ.get("DEEPEM_JAX_DATA")
    if not root:
        return None
    files = [Path(root, SYNOPTIC, f"AIAsynoptic{int(c):04d}.fits") for c in FIVE.value]
    return files if all(f.is_file() for f in files) else None


def _observation(rebin: int, log: Callable[[str], None]):
    """(stack, description, in-sample note) of the real observation the demo uses."""
    from .data import sample_observation
    from .io import load_aia

    files = _synoptic_files()
    if files is not None:
        log(f"real AIA synoptic observation in {files[0].parent} (5 channels, rebin {rebin})")
        stack = load_aia(files, FIVE, rebin=rebin)
        return stack, (
            f"real AIA synoptic level-1.5 images, {stack.obstime.min().isot}, channels "
            f"131-335 Å (94 Å file corrupt as published), rebinned {rebin}x{rebin}; "
            "the shipped five-channel network was trained on pixels of this observation "
            "(deepem_jax/weights/MODEL_CARD.md), so the comparison below is in-sample"
        )
    log("no synoptic observation under $DEEPEM_JAX_DATA: the shipped 2011-02-15 cutouts")
    stack = load_aia(sample_observation("01:44"), rebin=rebin)
    return stack, (
        f"real AIA level-1 six-channel cutouts of NOAA AR 11158, {stack.obstime.min().isot} "
        "(shipped with deepem_jax), co-registered onto one WCS"
    )


def run_demo(out: Path, log: Callable[[str], None] = print, rebin: int = 1) -> str:
    """Run the demo into ``out``; returns the markdown report (also written to a file)."""
    from .metrics import evaluate_fidelity
    from .pipeline import invert
    from .products import compare_figure

    out = Path(out)
    stack, source = _observation(rebin, log)
    log(f"Basis Pursuit on {stack.data.shape[0]}x{stack.data.shape[1]} pixels...")
    bp_res = invert(stack, "bp", progress=True)
    invert(stack, "net")  # compile; the timed call below runs compiled code
    net = invert(stack, "net")
    raw = invert(stack, "net", consistency=False)
    lower, upper = bp_res.band()
    fid, fid_raw = (
        evaluate_fidelity(
            res.em,
            bp_res.em,
            bp_res.status,
            np.nan_to_num(bp_res.corrected_intensities),
            bp_res.corrected_sigma,
            np.asarray(bp_res.response.K),
            bp_res.logt,
            lower,
            upper,
        )
        for res in (net, raw)
    )
    fig_path = out / "demo_figure1.png"
    compare_figure(bp_res, net, path=fig_path, title=source)
    lines = _report_lines(stack, source, bp_res, net, fid, fid_raw, fig_path)
    report = "\n".join(lines) + "\n"
    with atomic_write(out / "demo_report.md") as fh:
        fh.write(report.encode())
    return report


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items())


def _bp_failed_line(bp_res, net) -> str:
    """What the network answered where BP has no EM (nothing to score it against there)."""
    from .status import DEMStatus

    failed = ~bp_res.has_em
    if not failed.any():
        return "BP has an EM for every pixel."
    answered = failed & net.has_em
    line = (
        f"BP has no EM for {int(failed.sum()):,} pixels ("
        f"{_counts(DEMStatus.counts(bp_res.status[failed]))}); the network gives one for "
        f"{int(answered.sum()):,} of them"
    )
    if answered.any():
        line += f" ({_counts(DEMStatus.counts(net.status[answered]))})"
    return line + ", not scored against BP."


def _report_lines(stack, source, bp_res, net, fid, fid_raw, fig_path) -> list[str]:
    """The markdown lines of the demo report."""
    from .metrics import format_metrics_table
    from .status import DEMStatus

    n = bp_res.status.size
    t_bp, t_net = bp_res.timings["solve"], net.timings["solve"]
    lines = [
        "# deepem_jax demo report",
        "",
        f"Data: {source}.",
        "",
        f"Calibration: n_sample {stack.n_sample}; degradation factors "
        + ", ".join(
            f"{c} Å {f:.3f}" for c, f in zip(bp_res.channels, bp_res.degradation, strict=True)
        )
        + f" ({bp_res.provenance.get('DEGTABLE', ('none',))[0]}).",
        "",
        f"Pixels: {n:,}. Basis Pursuit (float32, JAX): {t_bp:.2f} s ({n / t_bp:,.0f} px/s, "
        "including compilation). "
        f"Network with the consistency step (projection onto BP's band, BP for the "
        f"{net.provenance['BPFALLBK']:,} pixels it left outside): {t_net:.3f} s "
        f"({n / t_net:,.0f} px/s).",
        "",
        "BP status: " + _counts(bp_res.status_counts()),
        "",
        "Network status: " + _counts(net.status_counts()),
        "",
        "Network + consistency step vs BP (tolerance band: each pixel's BP tolerance factor):",
        "",
        format_metrics_table({g: fid[g] for g in ("all", "bp_solved")}),
        "",
        _bp_failed_line(bp_res, net),
        "",
        "The network alone (no consistency step) has its resynthesis inside BP's band on "
        f"{100 * fid_raw['bp_solved'].frac_in_band:.1f} % of the pixels BP solved.",
        "",
        f"Status codes: {', '.join(f'{s.value} {s.name}' for s in DEMStatus)}.",
        "",
        f"Figure: {fig_path.name}",
    ]
    return lines
