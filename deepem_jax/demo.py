"""``deepem-jax demo``: the whole chain on data the package can reach.

With ``$DEEPEM_JAX_DATA`` holding the real AIA synoptic observation of 2024-10-04 (five
channels, 131--335 Å; its 94 Å file is corrupt as published), the demo inverts it with
five-channel BP and the shipped five-channel network. Otherwise it builds a six-channel
synthetic observation from the embedded response and inverts that. It writes
``demo_figure1.png`` (AIA 171 | BP EM at log T 5.9, failed pixels black | network EM) and
``demo_report.md`` (timings, BP status counts, network-vs-BP fidelity table).
"""

import time
from collections.abc import Callable
from pathlib import Path

import astropy.units as u
import numpy as np

from ._atomic import atomic_write

SYNOPTIC = "aia/synoptic_2024-10-04"
FIVE = [131, 171, 193, 211, 335] * u.AA


def _real_observation_dir() -> Path | None:
    """The folder of the five real synoptic files if the data registry finds all of them
    (``$DEEPEM_JAX_DATA`` or the user cache; sha256-checked, never downloaded here)."""
    from .data import fetch

    try:
        paths = [fetch(f"{SYNOPTIC}/AIAsynoptic{int(c):04d}.fits") for c in FIVE.value]
    except FileNotFoundError:
        return None
    return paths[0].parent


def run_demo(out: Path, log: Callable[[str], None] = print, rebin: int = 1) -> str:
    """Run the demo into ``out``; returns the markdown report (also written to a file)."""
    from . import bp
    from .basis import cheung_basis
    from .metrics import evaluate_fidelity, format_metrics_table
    from .pretrained import load_default_predictor
    from .products import figure1
    from .response import DEEPEM_LOGT, default_response
    from .uncertainty import sigma_values

    out = Path(out)
    real = _real_observation_dir()
    wcs = None
    if real is not None:
        from .io import load_aia

        log(f"real AIA synoptic observation in {real} (5 channels, rebin {rebin})")
        stack = load_aia(
            [real / f"AIAsynoptic{int(c):04d}.fits" for c in FIVE.value], FIVE, rebin=rebin
        )
        y = stack.masked_data
        exptime, n_sample, channels = stack.exptime.to_value(u.s), stack.n_sample, FIVE
        wcs = stack.wcs
        source = (
            f"real AIA synoptic level-1.5 images, {stack.obstime.min().isot}, channels "
            f"131-335 Å (94 Å file corrupt as published), rebinned {rebin}x{rebin}; "
            "the shipped five-channel network was trained on pixels of this observation "
            "(deepem_jax/weights/MODEL_CARD.md), so the comparison below is in-sample"
        )
    else:
        from .forward import synthetic_scene

        log("no real observation under $DEEPEM_JAX_DATA: synthetic six-channel scene")
        channels = [94, 131, 171, 193, 211, 335] * u.AA
        resp6 = default_response().regrid(DEEPEM_LOGT)
        _, y = synthetic_scene(resp6, (256, 256), np.random.default_rng(0), 2.0)
        exptime, n_sample = np.full(6, 2.0), 1
        source = "synthetic 256x256 six-channel scene (deepem_jax.forward.synthetic_scene)"
    response = default_response().regrid(DEEPEM_LOGT).select(channels)
    sigma = sigma_values(y, exptime, channels, n_sample)
    basis = cheung_basis(DEEPEM_LOGT)

    log(f"Basis Pursuit on {y.shape[0]}x{y.shape[1]} pixels...")
    t0 = time.perf_counter()
    res = bp.solve(y, sigma, response, basis, progress=True)
    t_bp = time.perf_counter() - t0
    net = load_default_predictor(channels)
    em_raw = net.predict(y)
    net.predict(y, sigma=sigma, response=response)  # compile; the timed call runs compiled code
    t0 = time.perf_counter()
    em_net = net.predict(y, sigma=sigma, response=response)
    t_net = time.perf_counter() - t0
    status = np.asarray(res.status)
    tolfac = np.where(np.isfinite(res.tolfac), res.tolfac, 1.4)[..., None]
    lower, upper = bp.bounds(np.nan_to_num(y), sigma, tolfac)
    fid, fid_raw = (
        evaluate_fidelity(
            em,
            np.asarray(res.em),
            status,
            np.nan_to_num(y),
            sigma,
            np.asarray(response.K),
            DEEPEM_LOGT,
            np.asarray(lower),
            np.asarray(upper),
        )
        for em in (em_net, em_raw)
    )
    i171 = [int(c) for c in channels.to_value(u.AA)].index(171)
    fig_path = out / "demo_figure1.png"
    figure1(
        y[..., i171],
        np.asarray(res.em),
        status,
        em_net,
        DEEPEM_LOGT,
        at_logt=5.9,
        wcs=wcs,
        path=str(fig_path),
        title=source,
    )
    n = status.size
    counts = {s.name: int((status == s).sum()) for s in bp.BPStatus}
    lines = [
        "# deepem_jax demo report",
        "",
        f"Data: {source}.",
        "",
        f"Pixels: {n:,}. Basis Pursuit (float32, JAX): {t_bp:.2f} s ({n / t_bp:,.0f} px/s, "
        "including compilation). "
        f"Network ({net.config.hidden}) with the consistency step: {t_net:.3f} s "
        f"({n / t_net:,.0f} px/s).",
        "",
        "BP status counts: " + ", ".join(f"{k} {v:,}" for k, v in counts.items() if v),
        "",
        "Network + consistency step vs BP (tolerance band: each pixel's BP tolerance factor):",
        "",
        format_metrics_table(fid),
        "",
        "The network alone (no consistency step) has its resynthesis inside BP's band on "
        f"{100 * fid_raw['bp_solved'].frac_in_band:.1f} % of the pixels BP solved.",
        "",
        f"Figure: {fig_path.name}",
    ]
    report = "\n".join(lines) + "\n"
    with atomic_write(out / "demo_report.md") as fh:
        fh.write(report.encode())
    return report
