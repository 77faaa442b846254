"""Train the network weights shipped in ``deepem_jax/weights/`` (see MODEL_CARD.md there).

    DEEPEM_JAX_DATA=../shared/data python examples/train_pretrained.py --channels 6 \
        --out deepem_jax/weights
    DEEPEM_JAX_DATA=../shared/data python examples/train_pretrained.py --channels 5 \
        --out deepem_jax/weights
    python examples/train_pretrained.py --channels 6 --out DIR --evaluate   # DIR holds weights

Targets are deepem_jax's own Basis Pursuit solutions (:func:`deepem_jax.train.build_dataset`,
which runs :func:`deepem_jax.invert`: default basis, tolfac 1.4 with retries) on the embedded
response (demregpy's table) regridded to DeepEM's grid (log T 5.5-7.2, 18 bins):

* synthetic pixels from the documented prior (:func:`deepem_jax.forward.random_dems`: 1-3
  Gaussian components, total EM log-uniform 1e26-1e29 cm^-5, peaks log T 5.6-7.1, widths
  0.05-0.3), and pixels synthesised from a real-DEM prior: the BP solutions of the real
  observations of ``--prior-dates`` (2024-10-04 synoptic, 2011-02-15 cutouts; through
  ``invert``, i.e. calibrated), both seen at real noise levels
  (:func:`deepem_jax.prior.realistic_observations`: n_sample 1-64, exposures 0.005-3 s,
  degradation of a random epoch; the network sees degradation-corrected intensities). No pixel
  of a real date enters training itself: hold a date out by leaving it out of
  ``--prior-dates`` (the default holds out the date each network is scored on) and score it
  with ``examples/evaluate_by_date.py``.

10% of the pixels are held out for validation (early stopping) and 10% for the test metrics the
script prints (markdown), writes to ``<out>/<model>.metrics.md`` and stores in the checkpoint:
the network alone (``invert(..., consistency=False)``) and with the consistency step.
``--figure`` draws Figure 1 (AIA 171 Å | BP EM | network EM at log T 5.9) on the 2011-02-15
01:44 cutouts shipped with deepem_jax (a held-out date for the six-channel network; the
five-channel one's default prior comes from that date). ``--pixels``, ``--epochs`` and
``--rebin`` make small runs (e.g. ``--pixels 2000 --epochs 2 --model small_gnt --rebin 16``).
"""

import argparse
import json
import tempfile
from pathlib import Path

import astropy.units as u
import numpy as np

from deepem_jax import invert, load_aia
from deepem_jax.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from deepem_jax.data import reference_observations, sample_observation
from deepem_jax.forward import random_dems
from deepem_jax.metrics import evaluate_fidelity, format_metrics_table
from deepem_jax.prior import real_dem_prior, realistic_observations
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.train import TrainConfig, build_dataset, train_and_evaluate

EXPTIME = {94: 2.9, 131: 2.9, 171: 2.0, 193: 2.0, 211: 2.9, 335: 2.9}
CHANNELS = {6: [94, 131, 171, 193, 211, 335], 5: [131, 171, 193, 211, 335]}
NAMES = {6: "deepem_aia6.msgpack", 5: "deepem_aia5_no94.msgpack"}
#: Default real-DEM prior per network: six channels exist only on 2011-02-15, which the
#: six-channel network is scored on; the five-channel one is scored on 2024-10-04.
PRIOR_DATES = {6: "2024-10-04", 5: "2011-02-15"}
#: Epochs of the shipped weights (each chosen by its held-out date; see MODEL_CARD.md).
EPOCHS = {6: 160, 5: 640}


def synthetic_pixels(response, n, seed):
    """``n`` synthetic pixels of the documented prior at real noise levels
    (:func:`deepem_jax.prior.realistic_observations`): corrected intensities and sigma (n, C)."""
    rng = np.random.default_rng(seed)
    return realistic_observations(random_dems(DEEPEM_LOGT, n, rng), response, rng)


def prior_pixels(response, dates, n, seed, rebin):
    """``n`` pixels synthesised from the BP solutions of the real observations of ``dates``
    (any channels they have), at real noise levels; ``None`` when no date is available."""
    results = []
    for date in dates:
        for stack in reference_observations(date, rebin=rebin):
            results.append(invert(stack, "bp", progress=True))
    if not results:
        return None
    em = real_dem_prior(results)
    rng = np.random.default_rng(seed + 7)
    pick = rng.choice(len(em), n, replace=len(em) < n)
    return realistic_observations(em[pick], response, rng), len(em)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, choices=(5, 6), default=6, help="input channels")
    ap.add_argument("--out", default="deepem_jax/weights", help="directory of the weights")
    ap.add_argument("--pixels", type=int, default=300_000, help="synthetic pixels")
    ap.add_argument(
        "--rebin", type=int, default=1, help="average n x n blocks of the real observation"
    )
    ap.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the data (default: the shipped weights', 160 for six channels, "
        "640 for five)",
    )
    ap.add_argument("--model", default="deepem_gnt", help="architecture (deepem_jax.model.CONFIGS)")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument(
        "--patience", type=int, default=None, help="early-stopping patience (default: none)"
    )
    ap.add_argument(
        "--workdir",
        default=None,
        help="checkpoint dir, resumed if it holds one "
        "(default: deepem_pretrain_<channels> in the temporary directory)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--prior-dates",
        default=None,
        help="comma-separated real dates whose BP solutions are the real-DEM prior "
        "(2024-10-04, 2011-02-15; empty: synthetic only; default: the date the network is not "
        "scored on, 2024-10-04 for six channels, 2011-02-15 for five)",
    )
    ap.add_argument("--prior-pixels", type=int, default=300_000, help="pixels from that prior")
    ap.add_argument("--figure", default=None, help="write a Figure-1-style PNG here")
    ap.add_argument(
        "--physics",
        choices=("chi2", "band"),
        default="band",
        help="physics term on the resynthesised intensities (see deepem_jax.train)",
    )
    ap.add_argument(
        "--physics-weight", type=float, default=3.0, help="weight of the physics term in the loss"
    )
    ap.add_argument(
        "--evaluate",
        action="store_true",
        help="do not train: evaluate the weights in --out on the same held-out split",
    )
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    response = default_response().regrid(DEEPEM_LOGT).select(CHANNELS[args.channels] * u.AA)
    observations = [synthetic_pixels(response, args.pixels, args.seed)]
    sources = [f"{args.pixels:,} synthetic pixels from the documented prior, real noise levels"]
    prior_dates = args.prior_dates
    if prior_dates is None:
        prior_dates = PRIOR_DATES[args.channels]
    dates = [d for d in prior_dates.split(",") if d]
    prior = (
        prior_pixels(response, dates, args.prior_pixels, args.seed, args.rebin) if dates else None
    )
    if prior is not None:
        observations.append(prior[0])
        sources.append(
            f"{args.prior_pixels:,} pixels synthesised from {prior[1]:,} BP solutions of the "
            f"real observations of {', '.join(dates)} (rebin {args.rebin}), real noise levels"
        )
    print("data:", "; ".join(sources))
    data = build_dataset(observations, response, progress=True)
    print(f"BP solved {data.solved.mean():.4f} of {len(data):,} pixels")
    rest, test = data.split(0.1, seed=args.seed)
    train, val = rest.split(0.1 / 0.9, seed=args.seed + 1)
    out = out_dir / NAMES[args.channels]
    if args.evaluate:
        ckpt = load_checkpoint(out, response=response, strict_response=True)
        pred, cfg_text, metrics = ckpt.predictor(), "(evaluated, not trained)", {}
    else:
        pred, cfg_text, metrics = train_network(args, train, val, response)

    table, test_metrics = evaluate(pred, test, response)
    metrics |= test_metrics
    print(table)
    if not args.evaluate:
        save_checkpoint(out, Checkpoint.from_predictor(pred, response, metrics))
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    report = out_dir / f"{out.stem}.metrics.md"
    report.write_text(f"Data: {'; '.join(sources)}\n\nConfig: {cfg_text}\n\n{table}\n")
    print(f"wrote {report}")
    if args.figure:
        figure(args.figure, pred, response, held_out="2011-02-15" not in dates)


def evaluate(pred, test, response):
    """Markdown tables and flat metrics of the network against BP on ``test``, alone and with
    the consistency step."""
    tables, metrics = [], {}
    for name, prefix, consistency in [
        ("network alone", "", False),
        ("network + consistency step (tolfac 1.4)", "consistent.", True),
    ]:
        em = invert(
            test.intensity,
            "net",
            sigma=test.sigma,
            channels=response.wavelength,
            response=response,
            predictor=pred,
            consistency=consistency,
            degradation=False,
        ).em
        fid = evaluate_fidelity(
            em,
            test.em,
            test.status,
            test.intensity,
            test.sigma,
            np.asarray(response.K),
            DEEPEM_LOGT,
            *test.band(),
        )
        tables.append(f"### {name}\n\n{format_metrics_table(fid)}")
        metrics |= {
            f"{prefix}{g}.{k}": float(v) for g, m in fid.items() for k, v in m.scalars().items()
        }
    return "\n\n".join(tables), metrics


def train_network(args, train_data, val_data, response):
    """Train a network: (predictor with the best validation loss, config JSON, metrics)."""
    cfg = TrainConfig(
        model=args.model,
        epochs=args.epochs or EPOCHS[args.channels],
        batch_size=args.batch_size,
        learning_rate=args.lr,
        schedule="cosine",
        patience=args.patience,
        seed=args.seed,
        physics_weight=args.physics_weight,
        physics=args.physics,
    )
    workdir = args.workdir or Path(tempfile.gettempdir(), f"deepem_pretrain_{args.channels}")
    pred, hist = train_and_evaluate(cfg, train_data, val_data, response, workdir)
    metrics = {
        "epochs_run": float(len(hist)),
        "best_val_loss": float(min(h["val_loss"] for h in hist)),
    }
    return pred, json.dumps(cfg.to_dict()), metrics


def figure(path, pred, response, held_out: bool) -> None:
    """Figure 1 (AIA 171 Å | BP EM at log T 5.9 | network EM at log T 5.9) of the shipped
    2011-02-15 01:44 cutouts, through :func:`deepem_jax.invert` with both methods."""
    from deepem_jax.products import compare_figure

    files = dict(zip(CHANNELS[6], sample_observation("01:44"), strict=True))
    stack = load_aia([files[c] for c in response.channels], response.wavelength)
    bp = invert(stack, "bp", response=response)
    net = invert(stack, "net", response=response, predictor=pred)
    compare_figure(
        bp,
        net,
        path=path,
        title="NOAA AR 11158, AIA 2011-02-15 01:44 UTC"
        + (" (not seen in training)" if held_out else " (its date gave the DEM prior)"),
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
