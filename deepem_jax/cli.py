"""The ``deepem-jax`` command: a thin layer that parses arguments and calls the library.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage (bad options, an output directory
that cannot be written, a training directory whose checkpoint is corrupt or does not fit);
3 bad input data (unreadable, corrupt or inconsistent AIA files, missing channels, unreadable
or corrupt weights or response tables); 4 output already
exists (use ``--overwrite``); 5 training stopped on a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path

import astropy.units as u
import click
import numpy as np

from .model import CONFIGS

EXIT_INPUT = 3
EXIT_EXISTS = 4
EXIT_DIVERGED = 5
EXIT_PARTIAL = 6

_EXAMPLES_INVERT = """
\b
Examples:
  deepem-jax invert /data/aia/2024-10-04/ --method net --out out/
  deepem-jax invert aia.lev1.{94,131,171,193,211,335}A.fits --method bp --out out/ --png
  deepem-jax invert /data/aia/synoptic/ --method bp --channels 131,171,193,211,335 --out out/
  deepem-jax invert /data/aia/obs_*/ --method bp --out out/ --workers 2        # a series
  deepem-jax invert /data/aia/day/*.fits --out out/ --scheduler tcp://host:8786  # on a cluster
"""


class _InputError(click.ClickException):
    exit_code = EXIT_INPUT


class _ExistsError(click.ClickException):
    exit_code = EXIT_EXISTS


class _DivergedError(click.ClickException):
    exit_code = EXIT_DIVERGED


def _channels(text: str | None):
    if text is None:
        return None
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(
            f"channels must be comma-separated integers, got {text!r}", param_hint="--channels"
        ) from None
    if not vals:
        raise click.BadParameter(f"no channel given in {text!r}", param_hint="--channels")
    from .pipeline import MIN_CHANNELS

    if len(set(vals)) != len(vals):
        raise click.BadParameter(f"duplicate channels: {vals}", param_hint="--channels")
    if len(vals) < MIN_CHANNELS:
        raise click.BadParameter(
            f"a DEM needs at least {MIN_CHANNELS} channels, got {vals}", param_hint="--channels"
        )
    return np.array(vals) * u.AA


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deepem_jax")
def main() -> None:
    """DEM inversion of SDO/AIA images: exact Basis Pursuit and the DeepEM network in JAX."""


def _finite_positive(ctx, param, value):
    if value is not None and not (np.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number > 0, got {value}")
    return value


def _writable_dir(path: str) -> Path:
    """``path`` created if needed and checked writable before any work (exit 2 otherwise)."""
    import tempfile

    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".deepem_probe_"):
            pass
    except OSError as err:
        raise click.BadParameter(
            f"cannot write to {out}: {err.strerror or err}", param_hint="--out"
        ) from None
    return out


def _load_response(path: str | None):
    """The response table at ``path`` (by suffix), or None for the embedded default; every
    failure is bad input naming the file."""
    from .response import TemperatureResponse

    if path is None:
        return None
    loaders = {
        ".genx": TemperatureResponse.from_genx,
        ".csv": TemperatureResponse.from_csv,
        ".npy": TemperatureResponse.from_deepem_npy,
    }
    loader = loaders.get(Path(path).suffix.lower(), TemperatureResponse.from_idl_save)
    try:
        return loader(path)
    except Exception as err:  # each table format fails with its own exception types
        raise _InputError(
            f"--response {path}: not a readable temperature response table "
            f"({type(err).__name__}: {err or 'no details'})"
        ) from err


def _load_weights(path: str | None, channels):
    """The network at ``path`` (.msgpack checkpoint or original .pth), or the shipped one for
    ``channels`` (usage error when none takes them)."""
    from .checkpoint import load_predictor
    from .io import load_pytorch_deepem
    from .pretrained import weights_path

    what = f"--weights {path}"
    if path is None:
        try:
            path = weights_path(channels)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--channels") from err
        except OSError as err:  # an installation without its weight files
            raise _InputError(f"shipped weights: {err}") from err
        what = "shipped weights"
    try:
        if str(path).endswith((".pth", ".pt")):
            return load_pytorch_deepem(path)
        return load_predictor(path)
    except (ValueError, OSError, pickle.UnpicklingError) as err:
        raise _InputError(f"{what}: {err}") from err


def _check_response_channels(channels, response) -> None:
    """Usage error for ``--channels`` the response (default: embedded) has no row for."""
    from .response import AIA_CHANNELS

    if channels is None:
        return
    known = (AIA_CHANNELS if response is None else response.wavelength).to_value(u.AA)
    unknown = [int(c) for c in channels.to_value(u.AA) if c not in known]
    if unknown:
        raise click.BadParameter(
            f"no temperature response for {unknown} Å; the response has "
            f"{[int(c) for c in known]} Å",
            param_hint="--channels",
        )


def _observations(files: tuple[str, ...]) -> list:
    """Each directory is one observation; loose files are grouped into co-temporal sets, one
    observation each (:func:`deepem_jax.series.group_files`)."""
    from .series import group_files

    dirs = [f for f in files if os.path.isdir(f)]
    loose = [f for f in files if not os.path.isdir(f)]
    missing = [f for f in loose if not os.path.exists(f)]
    if missing:
        raise _InputError(f"no such file: {', '.join(missing)}")
    return [Path(d) for d in dirs] + group_files(loose)


def _label(obs) -> str:
    return str(obs) if not isinstance(obs, list) else f"{obs[0]} (+{len(obs) - 1} files)"


@main.command(epilog=_EXAMPLES_INVERT)
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--method",
    type=click.Choice(["net", "bp"]),
    default="net",
    show_default=True,
    help="DeepEM network (with its consistency step) or exact Basis Pursuit.",
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
    help="Comma-separated channels in Å (default: all six; BP accepts a subset of >= 3).",
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
    "--net-dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "bfloat16", "float32"]),
    help="Operands of the network's matrix products (float32 accumulation either way); "
    "auto: bfloat16 where the hardware multiplies it natively, else float32.",
)
@click.option(
    "--response",
    "response_path",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Undegraded temperature response (.genx, .csv, .npy, IDL save); default: embedded.",
)
@click.option(
    "--correction-table",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="aiapy degradation correction table; default: the one shipped with deepem_jax.",
)
@click.option(
    "--no-degradation",
    is_flag=True,
    help="Do not correct for the instrument's degradation at the observation time.",
)
@click.option(
    "--tolfac",
    default=1.4,
    show_default=True,
    type=float,
    callback=_finite_positive,
    help="Tolerance band max(y - tolfac*sigma, 0) <= K EM <= y + tolfac*sigma: BP solves in "
    "it; the network's EM is moved into it (pixels left outside: STATUS 5).",
)
@click.option("--png/--no-png", default=False, help="Also write PNG maps.")
@click.option("--overwrite", is_flag=True, help="Replace existing outputs.")
@click.option(
    "--scheduler",
    default=None,
    help="Where a series runs: default an embedded Dask LocalCluster of --workers processes "
    "(one observation alone runs in this process); 'synchronous': in this process, one "
    "observation after another; or a Dask scheduler address (tcp://host:8786).",
)
@click.option(
    "--workers",
    default=None,
    type=click.IntRange(min=1),
    help="Worker processes of the embedded cluster  [default: one per core]",
)
def invert(
    files,
    method,
    out_dir,
    channels,
    rebin,
    weights,
    net_dtype,
    response_path,
    correction_table,
    no_degradation,
    tolfac,
    png,
    overwrite,
    scheduler,
    workers,
):
    """Invert AIA images (six channel FITS files, or one directory per observation) to DEM
    cubes: FITS (T x y x with WCS, cm^-5 per log T bin) plus STATUS and CHI2 maps.

    Several observations (directories, or loose files of several times, grouped by time into
    co-temporal sets) run as a series on Dask, one task each: outputs that exist and verify
    are kept (a rerun finishes an interrupted series), a failing observation is reported and
    the others go on, and a table and a plot of the series are written (series_*.fits/.png).
    """
    from .response import AIA_CHANNELS

    chans = _channels(channels)
    if no_degradation and correction_table:
        raise click.BadParameter("--correction-table contradicts --no-degradation")
    if workers is not None and scheduler is not None:
        raise click.BadParameter(
            "only for the embedded cluster (no --scheduler)", param_hint="--workers"
        )
    observations = _observations(files)
    out = _writable_dir(out_dir)
    response = _load_response(response_path)
    _check_response_channels(chans, response)
    predictor = None
    if method == "net":
        predictor = dataclasses.replace(_load_weights(weights, chans), dtype=net_dtype)
    want = chans
    if want is None:
        want = np.array(predictor.channels) * u.AA if predictor is not None else AIA_CHANNELS
    degradation = False if no_degradation else (correction_table or True)
    options = {"response": response, "predictor": predictor, "tolfac": tolfac}
    if scheduler is None and len(observations) == 1:
        _invert_alone(
            observations[0], method, out, want, rebin, degradation, options, png, overwrite
        )
        return
    _invert_series(
        observations,
        method,
        out,
        want,
        rebin,
        degradation,
        options,
        png,
        overwrite,
        scheduler,
        workers,
    )


def _invert_alone(obs, method, out, want, rebin, degradation, options, png, overwrite):
    """One observation in this process: exit 3 on bad input, 4 if its output exists."""
    from .io import AIAFileError, load_aia
    from .pipeline import invert as invert_one
    from .series import product_stem, write_product

    try:
        stack = load_aia(obs, want, rebin=rebin)
    except (AIAFileError, OSError, ValueError) as err:
        raise _InputError(str(err)) from err
    stem = product_stem(method, stack.sources, stack.obstime)
    fits_path, png_path = out / f"{stem}.fits", out / f"{stem}.png"
    existing = [p for p in (fits_path, png_path if png else None) if p and p.exists()]
    if existing and not overwrite:
        raise _ExistsError(
            f"{existing[0]} exists; pass --overwrite to replace it "
            "(nothing was written for this observation)"
        )
    try:
        result = invert_one(stack, method, degradation=degradation, progress=True, **options)
    except ValueError as err:
        raise _InputError(f"{_label(obs)}: {err}") from err
    write_product(result, fits_path, png_path if png else None, overwrite=overwrite)
    counts = ", ".join(f"{k} {v}" for k, v in result.status_counts().items())
    click.echo(f"wrote {fits_path} ({result.shape[0]}x{result.shape[1]} px: {counts})")


def _invert_series(
    observations, method, out, want, rebin, degradation, options, png, overwrite, client, workers
):
    """Many observations on Dask, a summary line per observation; exit 6 if any failed."""
    from .series import invert_series

    try:
        res = invert_series(
            observations,
            method,
            out_dir=out,
            client=client,
            workers=workers,
            channels=want,
            rebin=rebin,
            degradation=degradation,
            overwrite=overwrite,
            png=png,
            progress=True,
            **options,
        )
    except ConnectionError as err:
        raise click.BadParameter(str(err), param_hint="--scheduler") from None
    for o in res.outcomes:
        click.echo(_summary_line(o))
    n = res.counts()
    click.echo(
        f"{len(res.outcomes)} observations: {n['ok']} ok, {n['skipped']} skipped, "
        f"{n['failed']} failed; series table {res.table}, plot {res.plot}"
    )
    if n["failed"]:
        click.get_current_context().exit(EXIT_PARTIAL)


def _summary_line(o) -> str:
    """``state  time  output (or input)  (details)`` of one observation of a series."""
    where = Path(o.output).name if o.output else o.label
    if o.state == "failed":
        detail = o.reason
    else:
        counts = ", ".join(f"{k} {v}" for k, v in o.counts.items() if v)
        detail = f"{counts}; {o.reason}" if o.reason else counts
    return f"{o.state:<8} {o.time or '-':<23}  {where}  ({detail})"


def _finite_nonnegative(ctx, param, value):
    if value is not None and not (np.isfinite(value) and value >= 0):
        raise click.BadParameter(f"must be a finite number >= 0, got {value}")
    return value


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
    help="Observation directory (AIA FITS files of --channels); repeatable. Default: synthetic.",
)
@click.option(
    "--channels",
    default="94,131,171,193,211,335",
    show_default=True,
    help="Comma-separated input channels of the network in Å.",
)
@click.option(
    "--synthetic",
    "n_synthetic",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Number of synthetic scenes when no --data is given.",
)
@click.option(
    "--synthetic-size",
    default=128,
    show_default=True,
    type=click.IntRange(min=8),
    help="Side of each synthetic scene (pixels).",
)
@click.option(
    "--model",
    default="small",
    show_default=True,
    type=click.Choice(list(CONFIGS)),
    help="Architecture: 'deepem' is the original 6-300-300-18, 'small' 6-64-64-18; '_gn' adds "
    "five learned Gauss-Newton steps, '_gnt' with band targets (the shipped weights).",
)
@click.option(
    "--epochs",
    default=30,
    show_default=True,
    type=click.IntRange(min=1),
    help="Passes over the training pixels (a rerun continues up to this number).",
)
@click.option(
    "--batch-size",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Pixels per optimisation step.",
)
@click.option(
    "--physics-weight",
    default=0.0,
    show_default=True,
    type=float,
    callback=_finite_nonnegative,
    help="Weight of the chi^2 term of the resynthesised intensities in the loss.",
)
@click.option(
    "--seed",
    default=0,
    show_default=True,
    type=int,
    help="Seed of the synthetic scenes, the validation split and the initialisation.",
)
def train(
    workdir,
    data_dirs,
    channels,
    n_synthetic,
    synthetic_size,
    model,
    epochs,
    batch_size,
    physics_weight,
    seed,
):
    """Train the network on deepem_jax's own BP targets (resumable: rerun to continue).

    \b
    Example:
      deepem-jax train --out runs/small --synthetic 8 --epochs 50
    """
    from .checkpoint import CheckpointError
    from .response import DEEPEM_LOGT, default_response
    from .train import (
        TrainConfig,
        build_dataset,
        observations_from_dirs,
        synthetic_observations,
        train_and_evaluate,
    )

    try:
        response = default_response().regrid(DEEPEM_LOGT).select(_channels(channels))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--channels") from None
    try:
        obs = (
            observations_from_dirs(data_dirs, response)
            if data_dirs
            else synthetic_observations(response, n_synthetic, (synthetic_size,) * 2, seed)
        )
        click.echo(f"BP targets for {len(obs)} observation(s)...", err=True)
        data = build_dataset(obs, response, progress=True)
    except (OSError, ValueError) as err:
        raise _InputError(str(err)) from err
    tr, va = data.split(0.1, seed=seed)
    try:
        cfg = TrainConfig(
            model=model,
            epochs=epochs,
            batch_size=batch_size,
            physics_weight=physics_weight,
            seed=seed,
        )
    except ValueError as err:
        raise click.UsageError(str(err)) from err
    try:
        _, hist = train_and_evaluate(cfg, tr, va, response, workdir, log=click.echo)
    except CheckpointError as err:
        raise click.UsageError(str(err)) from err
    except FloatingPointError as err:
        raise _DivergedError(str(err)) from err
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
@click.option(
    "--fit-pixels",
    default=4096,
    show_default=True,
    type=click.IntRange(min=0),
    help="Pixels of the fit row per size (0: no fit row).",
)
@click.option(
    "--full-disk",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Side of a full-disk BP run on the real synoptic image tiled (e.g. 4096; needs "
    "$DEEPEM_JAX_DATA; minutes; 0: skip).",
)
@click.option(
    "--real",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Side of the central crop of the real 2024-10-04 synoptic image (1024: all of it) on "
    "which HiGHS, BP-JAX and the shipped five-channel model run, calibrated as invert does; "
    "the six-channel model also runs on the 2011-02-15 flare cutouts (needs $DEEPEM_JAX_DATA; "
    "0: skip).",
)
@click.option(
    "--repeats",
    default=3,
    show_default=True,
    type=click.IntRange(min=1),
    help="Timed calls per row after its warm-up call; the median is reported.",
)
def bench(sizes, tiled, out_dir, highs_pixels, fit_pixels, full_disk, real, repeats):
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
    report = run_suite(
        size_list,
        tiled or None,
        highs_pixels=highs_pixels,
        fit_pixels=fit_pixels,
        full_disk=full_disk,
        repeats=repeats,
        real=real,
        log=click.echo,
    )
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
    the real 2011-02-15 cutouts shipped with deepem_jax.
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
