"""The ``deepem-jax`` command: a thin layer that parses arguments and calls the library.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage (click); 3 bad input data (unreadable,
corrupt or inconsistent AIA files, missing channels); 4 output already exists (use
``--overwrite``).
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import click
import numpy as np

from ._atomic import save_figure

EXIT_INPUT = 3
EXIT_EXISTS = 4

_EXAMPLES_INVERT = """
\b
Examples:
  deepem-jax invert /data/aia/2024-10-04/ --method net --out out/
  deepem-jax invert aia.lev1.{94,131,171,193,211,335}A.fits --method bp --out out/ --png
  deepem-jax invert /data/aia/synoptic/ --method bp --channels 131,171,193,211,335 --out out/
"""


class _InputError(click.ClickException):
    exit_code = EXIT_INPUT


class _ExistsError(click.ClickException):
    exit_code = EXIT_EXISTS


def _channels(text: str | None):
    import astropy.units as u

    if text is None:
        return None
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"channels must be comma-separated integers, got {text!r}", param_hint="--channels"
        ) from None
    return np.array(vals) * u.AA


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deepem_jax")
def main() -> None:
    """DEM inversion of SDO/AIA images: exact Basis Pursuit and the DeepEM network in JAX."""


def _png_maps(path: Path, em, logt, status, wcs) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    from .products import mean_logt, total_em

    tot = total_em(em).value
    mt = mean_logt(em, logt)
    fig = Figure(figsize=(11, 4.6))
    ax1 = fig.add_subplot(1, 2, 1, projection=wcs)
    ax2 = fig.add_subplot(1, 2, 2, projection=wcs)
    bad = (status != 0) | ~(tot > 0)
    pos = tot[~bad]
    norm = LogNorm(*np.percentile(pos, [1, 99.5])) if pos.size else None
    im1 = ax1.imshow(np.ma.masked_where(bad, tot), norm=norm, cmap="inferno", origin="lower")
    fig.colorbar(im1, ax=ax1, label="total EM [cm$^{-5}$]", shrink=0.8)
    im2 = ax2.imshow(
        np.ma.masked_where(bad, mt),
        cmap="viridis",
        origin="lower",
        vmin=float(logt[0]),
        vmax=float(logt[-1]),
    )
    fig.colorbar(im2, ax=ax2, label="EM-weighted log T [K]", shrink=0.8)
    ax1.set_title("Total EM (flagged pixels masked)")
    ax2.set_title("EM-weighted mean log T")
    fig.tight_layout()
    save_figure(fig, path)


def _load_one(inputs, method, channels, rebin, weights, response_path):
    """Read one observation, the network (``net``) and the response; every failure here is
    bad input (exit 3). Returns (stack, predictor or None, response on the grid, logt)."""
    import astropy.units as u

    from .io import AIAFileError, load_aia
    from .pretrained import load_default_predictor
    from .response import AIA_CHANNELS, DEEPEM_LOGT, default_response

    predictor = None
    try:
        if method == "net":
            predictor = (
                load_default_predictor(channels) if weights is None else _load_weights(weights)
            )
            want = np.array(predictor.channels) * u.AA
            if channels is not None and list(channels.to_value(u.AA)) != list(predictor.channels):
                raise click.BadParameter(
                    f"the network takes channels {list(predictor.channels)} Å; got "
                    f"{list(channels.to_value(u.AA).astype(int))}",
                    param_hint="--channels",
                )
            logt = predictor.logt_array
        else:
            want = AIA_CHANNELS if channels is None else channels
            logt = DEEPEM_LOGT
        stack = load_aia(inputs, want, rebin=rebin)
        response = default_response() if response_path is None else _load_response(response_path)
        response = response.regrid(logt).select(stack.channels)
    except (AIAFileError, FileNotFoundError) as err:
        raise _InputError(str(err)) from err
    except (ValueError, pickle.UnpicklingError) as err:  # bad files, channels, weights, tables
        raise _InputError(f"{inputs}: {err}") from err
    return stack, predictor, response, logt


def _invert_one(stack, predictor, response, logt, method, tolfac, progress):
    """Invert a loaded stack; returns (em, status, chi2)."""
    from . import bp
    from .basis import cheung_basis
    from .forward import forward

    y = stack.masked_data  # NaN/saturated pixels -> INVALID_INPUT, NaN EM (never fitted)
    sigma = stack.sigma()
    if method == "bp":
        res = bp.solve(y, sigma, response, cheung_basis(logt), tolfac=tolfac, progress=progress)
        em = np.asarray(res.em, dtype=np.float64)
        status = np.asarray(res.status).astype(np.int16)
        synth = np.asarray(res.synthetic, dtype=np.float64)
    else:
        # the network's EM moved into BP's tolerance band (the consistency step); pixels it
        # cannot bring inside keep that EM and are flagged INFEASIBLE
        em, valid, in_band = predictor.predict(
            y,
            sigma=sigma,
            response=response,
            tolfac=tolfac,
            return_valid=True,
            return_in_band=True,
            progress=progress,
        )
        em = np.asarray(em, dtype=np.float64)
        status = np.where(in_band, 0, int(bp.BPStatus.INFEASIBLE))
        status = np.where(valid, status, int(bp.BPStatus.INVALID_INPUT)).astype(np.int16)
        synth = np.asarray(forward(np.asarray(response.K), np.nan_to_num(em)))
    with np.errstate(invalid="ignore"):
        chi2 = np.mean(((synth - y) / sigma) ** 2, axis=-1)
    chi2 = np.where(status == 0, chi2, np.nan)
    return em, status, chi2


def _load_response(path: str):
    from .response import TemperatureResponse

    p = str(path).lower()
    if p.endswith(".genx"):
        return TemperatureResponse.from_genx(path)
    if p.endswith(".csv"):
        return TemperatureResponse.from_csv(path)
    if p.endswith(".npy"):
        return TemperatureResponse.from_deepem_npy(path)
    return TemperatureResponse.from_idl_save(path)


def _load_weights(path: str):
    from .checkpoint import load_predictor
    from .io import load_pytorch_deepem

    if str(path).endswith((".pth", ".pt")):
        return load_pytorch_deepem(path)
    return load_predictor(path)


def _observations(files: tuple[str, ...]) -> list:
    """Each directory is one observation; loose files together form one observation."""
    dirs = [f for f in files if os.path.isdir(f)]
    loose = [f for f in files if not os.path.isdir(f)]
    missing = [f for f in loose if not os.path.exists(f)]
    if missing:
        raise _InputError(f"no such file: {', '.join(missing)}")
    obs: list = [Path(d) for d in dirs]
    if loose:
        obs.append([Path(f) for f in loose])
    return obs


@main.command(epilog=_EXAMPLES_INVERT)
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--method",
    type=click.Choice(["net", "bp"]),
    default="net",
    show_default=True,
    help="DeepEM network or exact Basis Pursuit.",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Output directory (created if needed).",
)
@click.option(
    "--channels",
    default=None,
    help="Comma-separated channels in Å (default: all six; BP accepts a subset).",
)
@click.option(
    "--rebin",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Average n x n pixel blocks before inverting.",
)
@click.option(
    "--weights",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Network weights (.msgpack checkpoint or original .pth); default: shipped.",
)
@click.option(
    "--response",
    "response_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Temperature response table (.genx, .csv, .npy, IDL save); default: embedded.",
)
@click.option(
    "--tolfac",
    default=1.4,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Tolerance factor of the band |K EM - y| <= tolfac sigma (BP; for the "
    "network, the band its EM is moved into; outside it: STATUS 1).",
)
@click.option("--png/--no-png", default=False, help="Also write PNG maps.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def invert(files, method, out_dir, channels, rebin, weights, response_path, tolfac, png, overwrite):
    """Invert AIA images (six channel FITS files, or one directory per observation) to DEM
    cubes: FITS (T x y x with WCS, cm^-5 per log T bin) plus STATUS and CHI2 maps."""
    import astropy.units as u

    from .io import write_dem_cube

    chans = _channels(channels)
    observations = _observations(files)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with click.progressbar(
        observations, label="observations", file=sys.stderr, show_pos=True
    ) as bar:
        for obs in bar:
            stack, predictor, response, logt = _load_one(
                obs, method, chans, rebin, weights, response_path
            )
            stamp = stack.obstime.min().strftime("%Y%m%dT%H%M%S")
            fits_path = out / f"dem_{method}_{stamp}.fits"
            png_path = out / f"dem_{method}_{stamp}.png"
            existing = [p for p in (fits_path, png_path if png else None) if p and p.exists()]
            if existing and not overwrite:
                raise _ExistsError(
                    f"{existing[0]} exists; pass --overwrite to replace it "
                    "(nothing was written for this observation)"
                )
            em, status, chi2 = _invert_one(
                stack, predictor, response, logt, method, tolfac, progress=True
            )
            write_dem_cube(
                fits_path,
                em * u.cm**-5,
                logt,
                stack.wcs,
                extras={"status": status, "chi2": chi2},
                meta={
                    "METHOD": method,
                    "CHANNELS": ",".join(str(int(c)) for c in stack.channels.to_value(u.AA)),
                },
                overwrite=overwrite,
            )
            if png:
                _png_maps(png_path, em, logt, status, stack.wcs)
            n_bad = int((status != 0).sum())
            click.echo(
                f"\nwrote {fits_path} ({em.shape[0]}x{em.shape[1]} px, "
                f"{n_bad} flagged = {100 * n_bad / status.size:.2f}%)"
            )


@main.command()
@click.option(
    "--out",
    "workdir",
    required=True,
    type=click.Path(file_okay=False),
    help="Work directory for checkpoints (training resumes from it).",
)
@click.option(
    "--data",
    "data_dirs",
    multiple=True,
    type=click.Path(exists=True),
    help="Observation directory (six AIA channels); repeatable. Default: synthetic.",
)
@click.option(
    "--synthetic",
    "n_synthetic",
    default=4,
    show_default=True,
    help="Number of synthetic scenes when no --data is given.",
)
@click.option(
    "--synthetic-size",
    default=128,
    show_default=True,
    type=click.IntRange(min=8),
    help="Side of each synthetic scene (pixels).",
)
@click.option("--model", default="small", show_default=True, type=click.Choice(["small", "deepem"]))
@click.option("--epochs", default=30, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=4096, show_default=True, type=click.IntRange(min=1))
@click.option("--physics-weight", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True)
def train(
    workdir, data_dirs, n_synthetic, synthetic_size, model, epochs, batch_size, physics_weight, seed
):
    """Train the network on deepem_jax's own BP targets (resumable: rerun to continue).

    \b
    Example:
      deepem-jax train --out runs/small --synthetic 8 --epochs 50
    """
    from .response import DEEPEM_LOGT, default_response
    from .train import (
        TrainConfig,
        build_dataset,
        observations_from_dirs,
        synthetic_observations,
        train_and_evaluate,
    )

    response = default_response().regrid(DEEPEM_LOGT)
    try:
        obs = (
            observations_from_dirs(data_dirs, response)
            if data_dirs
            else synthetic_observations(response, n_synthetic, (synthetic_size,) * 2, seed)
        )
    except (FileNotFoundError, ValueError) as err:
        raise _InputError(str(err)) from err
    click.echo(f"BP targets for {len(obs)} observation(s)...", err=True)
    data = build_dataset(obs, response, progress=True)
    tr, va = data.split(0.1, seed=seed)
    cfg = TrainConfig(
        model=model, epochs=epochs, batch_size=batch_size, physics_weight=physics_weight, seed=seed
    )
    from .checkpoint import CheckpointError

    try:
        _, hist = train_and_evaluate(cfg, tr, va, response, workdir, log=click.echo)
    except CheckpointError as err:
        raise click.UsageError(str(err)) from err
    if hist:
        click.echo(
            f"best val loss {min(h['val_loss'] for h in hist):.4f}; checkpoints in {workdir}"
        )


@main.command()
@click.option(
    "--sizes", default="64,256,1024", show_default=True, help="Comma-separated square image sizes."
)
@click.option(
    "--tiled", default=4096, show_default=True, help="Size of the tiled network run (0 to skip)."
)
@click.option(
    "--out", "out_dir", default="bench_results", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--highs-pixels", default=300, show_default=True)
def bench(sizes, tiled, out_dir, highs_pixels):
    """Benchmark network inference against Basis Pursuit (JAX and HiGHS) on the same pixels.

    \b
    Example:
      deepem-jax bench --sizes 64,256 --tiled 0 --out bench_results
    """
    from .bench import run_suite, to_markdown, write_report

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(
            f"sizes must be integers, got {sizes!r}", param_hint="--sizes"
        ) from None
    report = run_suite(size_list, tiled or None, highs_pixels=highs_pixels, log=click.echo)
    jpath, mpath = write_report(report, out_dir)
    click.echo(to_markdown(report))
    click.echo(f"wrote {jpath} and {mpath}")


@main.command()
@click.option(
    "--out", "out_dir", default="deepem_demo", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
def demo(out_dir, overwrite):
    """Run the whole chain on data the package can reach and write a figure and a report.

    Uses the real AIA synoptic observation under $DEEPEM_JAX_DATA when it is there, otherwise
    a synthetic observation built from the embedded response.
    """
    from .demo import run_demo

    out = Path(out_dir)
    targets = [out / "demo_figure1.png", out / "demo_report.md"]
    existing = [p for p in targets if p.exists()]
    if existing and not overwrite:
        raise _ExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    try:
        report = run_demo(out, log=lambda s: click.echo(s, err=True))
    except (FileNotFoundError, ValueError) as err:
        raise _InputError(str(err)) from err
    click.echo(report)


if __name__ == "__main__":  # pragma: no cover
    main()
