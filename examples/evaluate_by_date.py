"""The shipped networks against Basis Pursuit on every real observation date, calibrated as
``deepem_jax.invert`` does by default (sigma with the file's ``n_sample``, every channel
corrected for degradation at its observation time).

    python examples/evaluate_by_date.py                       # shipped cutouts of 2011-02-15
    DEEPEM_JAX_DATA=../shared/data python examples/evaluate_by_date.py --pixels 100000

Dates: 2011-02-15 (the six-channel active-region cutouts: the two clean times shipped with
deepem_jax, plus every time under ``$DEEPEM_JAX_DATA/aia/flare_2011-02-15``; saturated pixels
are flagged, not scored) and 2024-10-04 (the five-channel synoptic set, when
``$DEEPEM_JAX_DATA`` has it). The six-channel network is scored where six channels exist, the
five-channel one on both dates. Per network, date and variant (the network alone,
``consistency=False``; projected onto BP's band, ``consistency=True``; the shipped model,
``consistency="exact"``: projected, and BP for the pixels the projection leaves outside),
over the pixels BP solved: fraction in BP's band, MSE of sqrt(EM/1e25) against BP, median
relative error of the total EM, median |delta <log T>|, median chi^2 of the network and of BP
(:func:`deepem_jax.metrics.compare_results`). Two reference rows per date score BP itself at
tolfac 1.4 x 1.01 and x 1.1 against BP at 1.4: the scale of each metric when BP's own band
widens by 1 % or 10 %. ``--weights6`` / ``--weights5`` score other
checkpoints (e.g. networks trained without one of the dates); ``--dtype`` sets the operands of
their matrix products (default: those native to the device, as ``invert`` uses them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import astropy.units as u
import numpy as np

from deepem_jax import invert, load_aia
from deepem_jax.checkpoint import load_predictor
from deepem_jax.data import sample_observation
from deepem_jax.metrics import compare_results
from deepem_jax.pretrained import load_default_predictor

SIX = [94, 131, 171, 193, 211, 335]
FIVE = [131, 171, 193, 211, 335]


def flare_sets() -> list[list[Path]]:
    """The six files of each 2011-02-15 cutout time: shipped ones, and the shared folder's."""
    sets = {"01-44": sample_observation("01:44"), "01-46": sample_observation("01:46")}
    root = os.environ.get("DEEPEM_JAX_DATA")
    folder = Path(root, "aia", "flare_2011-02-15") if root else None
    if folder is not None and folder.is_dir():
        for f in sorted(folder.glob("*.fits")):
            stamp = f.name.split("T")[1][:5]
            sets.setdefault(stamp, [])
            if stamp not in ("01-44", "01-46"):
                sets[stamp].append(f)
    return [v for _, v in sorted(sets.items())]


def synoptic_files() -> list[Path] | None:
    root = os.environ.get("DEEPEM_JAX_DATA")
    if not root:
        return None
    files = [Path(root, "aia", "synoptic_2024-10-04", f"AIAsynoptic{c:04d}.fits") for c in FIVE]
    return files if all(f.is_file() for f in files) else None


def observations(channels: list[int], n_pixels: int | None, seed: int):
    """{date: (intensities (N, C), sigma (N, C), obstime per channel)} of every date that has
    the channels; at most ``n_pixels`` random pixels with finite, unsaturated input."""
    want = np.array(channels) * u.AA
    ends = tuple(f"_{c:03d}.fits" for c in channels)
    flare = [[f for f in files if f.name.endswith(ends)] for files in flare_sets()]
    stacks: dict[str, list] = {"2011-02-15": [load_aia(files, want) for files in flare]}
    syn = synoptic_files()
    if syn is not None and set(channels) <= set(FIVE):
        stacks["2024-10-04"] = [load_aia(syn, want)]
    rng = np.random.default_rng(seed)
    out = {}
    for date, group in stacks.items():
        rows = []
        for st in group:
            good = ~st.mask.reshape(-1)
            y = st.data.reshape(-1, len(channels))[good]
            s = st.sigma().reshape(-1, len(channels))[good]
            rows.append((y, s, st.obstime))
        y = np.concatenate([r[0] for r in rows])
        s = np.concatenate([r[1] for r in rows])
        # one obstime per observation: score each observation's pixels with its own time
        owner = np.concatenate([np.full(len(r[0]), i) for i, r in enumerate(rows)])
        if n_pixels is not None and len(y) > n_pixels:
            keep = np.sort(rng.choice(len(y), n_pixels, replace=False))
            y, s, owner = y[keep], s[keep], owner[keep]
        out[date] = (y, s, owner, [r[2] for r in rows])
    return out


#: Reference rows: BP itself at the default tolfac times these factors, scored against BP at the
#: default tolfac (how far BP's own answer moves when its band widens by 1 % or 10 %).
BP_REFERENCE = {"BP, tolfac x1.01": 1.01, "BP, tolfac x1.1": 1.1}


def score(predictor, channels, data) -> list[dict]:
    """BP and the network (alone, projected, shipped) on each date's pixels, and BP at a wider
    tolerance (:data:`BP_REFERENCE`); one row per variant."""
    rows = []
    want = np.array(channels) * u.AA
    variants = ("alone", "projected", "shipped", *BP_REFERENCE)
    for date, (y, s, owner, times) in data.items():
        parts: dict[str, list] = {"bp": [], **{v: [] for v in variants}}
        for i, t in enumerate(times):
            sel = owner == i
            if not sel.any():
                continue
            kw = dict(sigma=s[sel], channels=want, obstime=t)
            parts["bp"].append(invert(y[sel], "bp", **kw))
            for variant, consistency in (("alone", False), ("projected", True)):
                parts[variant].append(
                    invert(y[sel], "net", predictor=predictor, consistency=consistency, **kw)
                )
            parts["shipped"].append(invert(y[sel], "net", predictor=predictor, **kw))
            for variant, factor in BP_REFERENCE.items():
                parts[variant].append(invert(y[sel], "bp", tolfac=1.4 * factor, **kw))
        for variant in variants:
            for net, bp in zip(parts[variant], parts["bp"], strict=True):
                rows.append({"date": date, "variant": variant, **compare_results(net, bp)})
    return _merge(rows)


def _merge(rows: list[dict]) -> list[dict]:
    """Pixel-weighted means per (date, variant) of rows from several observations."""
    out = []
    for key in sorted({(r["date"], r["variant"]) for r in rows}):
        group = [r for r in rows if (r["date"], r["variant"]) == key]
        w = np.array([r["pixels"] for r in group], float)
        merged = {"date": key[0], "variant": key[1], "pixels": int(w.sum())}
        for k in group[0]:
            if k not in merged:
                v = np.array([r[k] for r in group], float)
                ok = np.isfinite(v) & (w > 0)
                merged[k] = float(np.average(v[ok], weights=w[ok])) if ok.any() else np.nan
        out.append(merged)
    return out


def table(name: str, rows: list[dict]) -> str:
    head = (
        "| network | date | variant | pixels | in BP band | MSE sqrt(EM/1e25) | "
        "med. rel. err. total EM | med. abs. Δ⟨log T⟩ | med. χ² net / BP | MSE / mean EM_BP | "
        "mean EM_BP / 1e25 |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        # a BP reference row is SOLVED in its own, wider band: no in-band fraction
        band = "—" if r["variant"] in BP_REFERENCE else f"{100 * r['in_band']:.2f} %"
        lines.append(
            f"| {name} | {r['date']} | {r['variant']} | {r['pixels']:,} | "
            f"{band} | {r['mse_sqrt']:.3g} | {r['med_rel_total_em']:.3f} | "
            f"{r['med_abs_dlogt']:.3f} | {r['med_chi2']:.2f} / {r['med_chi2_bp']:.2f} | "
            f"{r['rel_mse_sqrt']:.3g} | {r['mean_em_bp']:.3g} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights6", default=None, help="six-channel checkpoint (default: shipped)")
    ap.add_argument("--weights5", default=None, help="five-channel checkpoint (default: shipped)")
    ap.add_argument("--pixels", type=int, default=None, help="random pixels per date (all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--networks", default="6,5", help="which networks to score (6, 5 or 6,5)")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="operands of the networks' matrix products (auto: native to the device)",
    )
    args = ap.parse_args()
    which = {int(n) for n in args.networks.split(",")}
    for channels, path in ((SIX, args.weights6), (FIVE, args.weights5)):
        if len(channels) not in which:
            continue
        pred = load_predictor(path) if path else load_default_predictor(np.array(channels) * u.AA)
        pred = dataclasses.replace(pred, dtype=args.dtype)
        rows = score(pred, channels, observations(channels, args.pixels, args.seed))
        name = f"{len(channels)} ch" + ("" if path is None else f" ({Path(path).name})")
        name += f", {pred.dtype}"
        print(table(name, rows), end="\n\n", flush=True)


if __name__ == "__main__":
    main()
