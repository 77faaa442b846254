"""Train the network weights shipped in ``deepem_jax/weights/`` (see MODEL_CARD.md there).

    python examples/train_pretrained.py --channels 6 --out deepem_jax/weights
    DEEPEM_JAX_DATA=../shared/data python examples/train_pretrained.py --channels 5 \
        --out deepem_jax/weights

Targets are deepem_jax's own Basis Pursuit solutions (default basis, tolfac 1.4 with retries)
on the embedded response (demregpy's table) regridded to DeepEM's grid (log T 5.5-7.2, 18 bins):

* synthetic pixels from the documented prior (:func:`deepem_jax.forward.random_dems`: 1-3
  Gaussian components, total EM log-uniform 1e26-1e29 cm^-5, peaks log T 5.6-7.1, widths
  0.05-0.3) with AIA photon and read noise at exposure times 2.9 s (94, 131, 211, 335 Å) and
  2.0 s (171, 193 Å);
* for the five-channel model, also every pixel of the real AIA synoptic observation of
  2024-10-04 (131-335 Å) when ``$DEEPEM_JAX_DATA`` has it.

10% of the pixels are held out for validation (early stopping) and 10% for the test metrics the
script prints (markdown) and stores in the checkpoint.
"""

import argparse
import json
import os
from pathlib import Path

import astropy.units as u
import numpy as np

from deepem_jax.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from deepem_jax.forward import forward, noisy_observation, random_dems
from deepem_jax.metrics import evaluate_fidelity, format_metrics_table
from deepem_jax.response import DEEPEM_LOGT, default_response
from deepem_jax.train import TrainConfig, build_dataset, train_and_evaluate
from deepem_jax.uncertainty import sigma_values

EXPTIME = {94: 2.9, 131: 2.9, 171: 2.0, 193: 2.0, 211: 2.9, 335: 2.9}
CHANNELS = {6: [94, 131, 171, 193, 211, 335], 5: [131, 171, 193, 211, 335]}
NAMES = {6: "deepem_aia6.msgpack", 5: "deepem_aia5_no94.msgpack"}


def synthetic_pixels(response, n, seed):
    rng = np.random.default_rng(seed)
    t = np.array([EXPTIME[c] for c in response.channels])
    y_true = np.asarray(forward(np.asarray(response.K), random_dems(DEEPEM_LOGT, n, rng)))
    y = noisy_observation(y_true, t, response.channels, rng)
    return y, sigma_values(y, t, response.wavelength)


def real_pixels(response):
    from deepem_jax.io import load_aia

    root = os.environ.get("DEEPEM_JAX_DATA")
    d = Path(root or "", "aia", "synoptic_2024-10-04")
    if not root or not (d / "AIAsynoptic0171.fits").exists():
        return None
    stack = load_aia(
        [d / f"AIAsynoptic{c:04d}.fits" for c in response.channels], response.wavelength
    )
    n = response.n_channels
    return stack.masked_data.reshape(-1, n), stack.sigma().reshape(-1, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, choices=(5, 6), default=6)
    ap.add_argument("--out", default="deepem_jax/weights")
    ap.add_argument("--pixels", type=int, default=300_000, help="synthetic pixels")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--model", default="deepem")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--workdir", default=None, help="checkpoint dir (default: a temp dir)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--figure", default=None, help="write a Figure-1-style PNG here")
    ap.add_argument(
        "--physics",
        choices=("chi2", "band"),
        default="band",
        help="physics term on the resynthesised intensities (see deepem_jax.train)",
    )
    ap.add_argument(
        "--physics-weight", type=float, default=1.0, help="weight of the physics term in the loss"
    )
    ap.add_argument(
        "--evaluate",
        action="store_true",
        help="do not train: evaluate the weights in --out on the same held-out split",
    )
    args = ap.parse_args()

    response = default_response().regrid(DEEPEM_LOGT).select(CHANNELS[args.channels] * u.AA)
    observations = [synthetic_pixels(response, args.pixels, args.seed)]
    sources = [f"{args.pixels:,} synthetic pixels from the documented prior"]
    if args.channels == 5:
        real = real_pixels(response)
        if real is not None:
            observations.append(real)
            sources.append(
                f"{real[0].shape[0]:,} pixels of the real AIA synoptic observation "
                "2024-10-04 16:18 UTC (131-335 Å)"
            )
    print("data:", "; ".join(sources))
    data = build_dataset(observations, response, progress=True)
    print(f"BP solved {data.solved.mean():.4f} of {len(data):,} pixels")
    rest, test = data.split(0.1, seed=args.seed)
    train, val = rest.split(0.1 / 0.9, seed=args.seed + 1)
    out = Path(args.out) / NAMES[args.channels]
    if args.evaluate:
        ckpt = load_checkpoint(out, response=response, strict_response=True)
        pred, cfg_text, metrics = ckpt.predictor(), "(evaluated, not trained)", {}
    else:
        cfg = TrainConfig(
            model=args.model,
            epochs=args.epochs,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            schedule="cosine",
            patience=args.patience,
            seed=args.seed,
            physics_weight=args.physics_weight,
            physics=args.physics,
        )
        workdir = args.workdir or os.path.join("/tmp", f"deepem_pretrain_{args.channels}")
        pred, hist = train_and_evaluate(cfg, train, val, response, workdir)
        cfg_text = json.dumps(cfg.to_dict())
        metrics = {
            "epochs_run": float(len(hist)),
            "best_val_loss": float(min(h["val_loss"] for h in hist)),
        }

    tables = []
    for name, em in [
        ("network alone", pred.predict(test.intensity)),
        (
            "network + consistency step (tolfac 1.4)",
            pred.predict(test.intensity, sigma=test.sigma, response=response),
        ),
    ]:
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
        prefix = "" if name == "network alone" else "consistent."
        metrics |= {
            f"{prefix}{g}.{k}": float(v) for g, m in fid.items() for k, v in m.scalars().items()
        }
    table = "\n\n".join(tables)
    print(table)
    if not args.evaluate:
        save_checkpoint(out, Checkpoint.from_predictor(pred, response, metrics))
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    (Path(args.out) / f"{out.stem}.metrics.md").write_text(
        f"Data: {'; '.join(sources)}\n\nConfig: {cfg_text}\n\n{table}\n"
    )
    if args.figure:
        figure(args.figure, data, pred, response, real_shape=len(observations) > 1)


def figure(path, data, pred, response, real_shape: bool) -> None:
    """AIA 171 | BP EM at log T 5.9 (failed pixels black) | network EM at log T 5.9, on the real
    observation (the last group) when there is one, else on a synthetic scene."""
    from deepem_jax.forward import synthetic_scene
    from deepem_jax.products import figure1

    if real_shape:
        sel = data.group == data.group.max()
        side = int(round(np.sqrt(sel.sum())))
        shape = (side, side)
        y, sig = data.intensity[sel], data.sigma[sel]
        em_bp, status = data.em[sel], data.status[sel]
        title = "real AIA synoptic 2024-10-04 (pixels partly seen in training)"
    else:
        _, y = synthetic_scene(response, (256, 256), np.random.default_rng(123), 2.0)
        shape = y.shape[:2]
        t = np.array([EXPTIME[c] for c in response.channels])
        sig = sigma_values(y, t, response.wavelength)
        d = build_dataset([(y, sig)], response)
        y, sig, em_bp, status = d.intensity, d.sigma, d.em, d.status
        title = "synthetic scene (not seen in training)"
    i171 = list(response.channels).index(171)
    figure1(
        y[:, i171].reshape(shape),
        em_bp.reshape(*shape, -1),
        status.reshape(shape),
        pred.predict(y, sigma=sig, response=response).reshape(*shape, -1),
        DEEPEM_LOGT,
        at_logt=5.9,
        path=path,
        title=title,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
