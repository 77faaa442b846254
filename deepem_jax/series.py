"""``invert_series``: many observations, one task each, on Dask; resumable and fault tolerant.

Each task loads one observation, inverts it with :func:`deepem_jax.invert` and writes its DEM
cube atomically, as ``deepem-jax invert`` does for one observation (same file name, same
content). A task first looks for its own output: a cube that exists, whose data match the
sha256 recorded in its header (``DATASHA``) and that was made with this run's settings
(``RUNSHA``, :func:`settings_sha256`) is kept and the observation reported as skipped; a
missing, partial or corrupt one is (re)computed; one made with other settings (another
tolfac, rebin, weights, ...) is neither reused nor replaced: the observation fails saying so,
unless ``overwrite``. A failing observation is reported with its
reason and does not stop the others; a worker that dies loses only the observation it was
working on, which Dask runs again elsewhere (up to ``distributed.scheduler.allowed-failures``
times) or a rerun completes. At the end the driver writes one FITS table with a row of
summary statistics per observation and a PNG of their evolution.

Where the tasks run: an embedded ``dask.distributed.LocalCluster`` of single-threaded worker
processes (default), an existing Dask cluster (a ``distributed.Client`` or a scheduler
address; inputs and output directory must then be paths every worker can read and write), or
``"synchronous"``: this process, one observation after another (for debugging).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import time
import unicodedata
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np

from .status import DEMStatus

__all__ = [
    "ObservationOutcome",
    "ProductError",
    "SeriesResult",
    "data_sha256",
    "group_files",
    "invert_series",
    "plot_series",
    "product_stem",
    "settings_sha256",
    "summarise",
    "verify_product",
    "write_product",
    "write_series_table",
]

#: Header card of a DEM cube holding the sha256 of its data (see :func:`data_sha256`).
CHECKSUM_CARD = "DATASHA"
#: Header card with the first 16 hex digits of the sha256 of the settings a cube was made
#: with (:func:`settings_sha256`): a rerun with other settings never takes the cube as its own.
SETTINGS_CARD = "RUNSHA"


class ProductError(ValueError):
    """A DEM cube on disk is incomplete, corrupt, or does not carry its data checksum."""


@dataclasses.dataclass(frozen=True)
class ObservationOutcome:
    """What became of one observation of a series.

    Attributes
    ----------
    label : str
        The input: a directory, or the first file of a set (and how many more).
    state : str
        ``"ok"`` (inverted and written), ``"skipped"`` (its output existed and verified) or
        ``"failed"``.
    reason : str
        Why it failed or was skipped; for ``"ok"``, why an existing output was replaced (empty
        when there was none).
    time : str or None
        Observation time (ISO, UTC): the earliest channel's ``T_OBS``/``DATE-OBS``; None when
        the headers could not be read.
    output : str or None
        Path of the DEM cube (None when failed).
    counts : dict
        Pixels per :class:`DEMStatus` name (all names, zeros included; empty when failed).
    stats : dict
        ``em_sum`` (total EM summed over the pixels with an EM, cm^-5), ``em_median`` (median
        per-pixel total EM, cm^-5), ``logt_emw`` (EM-weighted mean log10(T / K) of the whole
        field), ``logt_median``, ``logt_p10``, ``logt_p90`` (of the per-pixel EM-weighted
        log10(T / K) map); NaN when no pixel has a positive EM; empty when failed.
    logt : (n_T,) ndarray or None
        log10(T / K) of the DEM bins.
    dem_mean : (n_T,) ndarray or None
        Mean EM per bin over the pixels with an EM, cm^-5.
    seconds : float
        Wall-clock time of the task (s).
    """

    label: str
    state: str
    reason: str = ""
    time: str | None = None
    output: str | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    logt: np.ndarray | None = None
    dem_mean: np.ndarray | None = None
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class SeriesResult:
    """Outcomes of :func:`invert_series` in the order of the observations, and the series
    products (FITS table, PNG)."""

    outcomes: tuple[ObservationOutcome, ...]
    table: Path
    plot: Path

    def counts(self) -> dict[str, int]:
        """Number of observations per state (``ok``, ``skipped``, ``failed``)."""
        return {s: sum(o.state == s for o in self.outcomes) for s in ("ok", "skipped", "failed")}

    @property
    def failed(self) -> tuple[ObservationOutcome, ...]:
        """The observations that failed."""
        return tuple(o for o in self.outcomes if o.state == "failed")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything a task needs besides its inputs (sent with each task: data scattered to
    workers once can be lost with one of them, since Dask's memory manager keeps one replica)."""

    method: str
    channels: tuple[int, ...]
    rebin: int
    options: dict[str, Any]  # keyword arguments of invert
    out_dir: str
    overwrite: bool
    png: bool
    settings: str  # settings_sha256(method, channels, rebin, options)[:16]


def settings_sha256(method: str, channels: Sequence[int], rebin: int, options: dict) -> str:
    """sha256 (hex) of what a series cube depends on besides its input files: the method,
    channels, rebin factor, the saturation level the files are loaded with and
    :func:`deepem_jax.invert` options. Arrays and networks enter by their contents (a
    predictor by its weights and dtype), a degradation table given as a path by the file's
    contents, responses by their :class:`~deepem_jax.checkpoint.ResponseId`, other objects by
    their fields or ``repr``."""
    from .io import _aia

    described = {k: _describe(v) for k, v in sorted(options.items())}
    table = options.get("degradation")
    if isinstance(table, str | os.PathLike) and Path(table).is_file():
        described["degradation"] = ["file", hashlib.sha256(Path(table).read_bytes()).hexdigest()]
    saturation = float(_aia._DEFAULT_SATURATION.to_value(u.DN))
    text = json.dumps([method, list(channels), int(rebin), described, saturation])
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(value: Any) -> Any:
    """A JSON-able description of an option's value that changes when the value does."""
    import jax

    from .checkpoint import ResponseId
    from .pipeline import _params_sha256
    from .predictor import Predictor
    from .response import TemperatureResponse

    if isinstance(value, Predictor):  # by its weights, as the cube's WEIGHTS card
        return [
            "predictor",
            _params_sha256(value.params),
            repr(value.config),
            list(value.channels),
            value.dtype,
        ]
    if isinstance(value, TemperatureResponse):
        return ["response", ResponseId.of(value).sha256]
    if isinstance(value, u.Quantity):
        return ["quantity", _describe(value.value), str(value.unit)]
    if isinstance(value, np.ndarray | jax.Array):
        a = np.ascontiguousarray(value)
        return ["array", str(a.dtype), list(a.shape), hashlib.sha256(a.tobytes()).hexdigest()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return [type(value).__name__, fields]
    if isinstance(value, list | tuple):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return repr(value)


# -- naming, grouping ---------------------------------------------------------------------------


def product_stem(method: str, sources: Sequence[str | os.PathLike], times) -> str:
    """``dem_<method>_<time>_<id>``: ``<time>`` the earliest of ``times`` (astropy Time, UTC,
    to the second), ``<id>`` the first 8 hex digits of the sha256 of the sources' sorted
    absolute paths, so two inputs never share a name and the same input always gets it."""
    from astropy.time import Time

    paths = "\n".join(sorted(str(Path(s).resolve()) for s in sources))
    digest = hashlib.sha256(paths.encode()).hexdigest()[:8]
    stamp = Time(times).min().strftime("%Y%m%dT%H%M%S")
    return f"dem_{method}_{stamp}_{digest}"


def _selected(inputs, channels: Sequence[int]) -> tuple[list[str], Any]:
    """The files ``load_aia(inputs, channels)`` would use and their observation times, from the
    headers alone (raises as ``load_aia`` does for unreadable headers and missing channels)."""
    from astropy.time import Time

    from .io._aia import _obstime, _select, _sources

    srcs = _select(_sources(inputs), list(channels))
    return [s.label for s in srcs], Time([_obstime(s) for s in srcs])


def group_files(
    files: Sequence[str | os.PathLike], *, tolerance: u.Quantity = 60 * u.s
) -> list[list[Path]]:
    """Loose AIA files grouped into co-temporal sets, one per observation, in time order.

    Each file has its header time (``T_OBS``, else ``DATE-OBS``). Every file of the channel
    seen most often starts a set, and each other file joins the set whose starting file is
    nearest to it in time, if within ``tolerance``, unless that set already has a file of its
    channel nearer to its start. So AIA's 12 s cadence, where the channels of one set are a few
    seconds apart, gives one set per cadence step, and a file missing at one step leaves that
    set without its channel (it fails alone when loaded) rather than taking the next step's
    file. Files left over (no set within ``tolerance``, or a nearer file of their channel)
    are grouped among themselves the same way. A file whose header cannot be read forms a set
    of its own, which then fails with the reason naming the file.
    """
    from .io._aia import _channel_of, _obstime, _sources

    dated, unreadable = [], []
    for f in files:
        try:
            (src,) = _sources([f])
            dated.append((_obstime(src).jd, _channel_of(src), Path(f)))
        except (OSError, ValueError):  # AIAFileError is a ValueError; load_aia will say why
            unreadable.append(Path(f))
    sets = _cotemporal(sorted(dated, key=lambda d: (d[0], str(d[2]))), tolerance.to_value(u.day))
    sets.sort(key=lambda group: min(d[0] for d in group))
    return [[d[2] for d in group] for group in sets] + [[p] for p in unreadable]


def _cotemporal(dated: list, tol_days: float) -> list[list]:
    """Sets of (julian date, channel, path) as :func:`group_files` describes them."""
    if not dated:
        return []
    counts = collections.Counter(d[1] for d in dated)
    anchor = max(sorted(counts), key=counts.__getitem__)
    sets = [[d] for d in dated if d[1] == anchor]
    starts = np.array([group[0][0] for group in sets])
    nearest: dict[tuple[int, int], tuple[float, Any]] = {}
    left = []
    for d in dated:
        if d[1] == anchor:
            continue
        i = int(np.argmin(np.abs(starts - d[0])))
        dt = abs(starts[i] - d[0])
        if dt > tol_days:
            left.append(d)
            continue
        held = nearest.get((i, d[1]))
        if held is not None and held[0] <= dt:
            left.append(d)
            continue
        if held is not None:
            left.append(held[1])
        nearest[i, d[1]] = (dt, d)
    for (i, _), (_, d) in nearest.items():
        sets[i].append(d)
    return sets + _cotemporal(sorted(left, key=lambda d: (d[0], str(d[2]))), tol_days)


def _label(inputs: str | tuple[str, ...]) -> str:
    if isinstance(inputs, str):
        return inputs
    return inputs[0] if len(inputs) == 1 else f"{inputs[0]} (+{len(inputs) - 1} files)"


def _normalise(observations) -> list[str | tuple[str, ...]]:
    """Each observation as an absolute directory path or a sorted tuple of absolute file
    paths; the same observation given twice is kept once."""
    seen, out = set(), []
    for obs in observations:
        if isinstance(obs, str | os.PathLike):
            key: str | tuple[str, ...] = str(Path(obs).resolve())
        elif isinstance(obs, Sequence) and all(isinstance(f, str | os.PathLike) for f in obs):
            key = tuple(sorted(str(Path(f).resolve()) for f in obs))
        else:
            raise TypeError(
                "each observation must be a directory or a list of FITS files (paths every "
                f"worker can read), got {type(obs).__name__}"
            )
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


# -- verified products ----------------------------------------------------------------------


def data_sha256(em: np.ndarray, status: np.ndarray, chi2: np.ndarray) -> str:
    """sha256 of a DEM cube's data as stored: EM (ny, nx, n_T) as float32, STATUS as int8,
    CHI2 as float32 (little-endian, C order, every NaN as the same bit pattern)."""
    h = hashlib.sha256()
    for a, dtype in ((em, "<f4"), (status, "i1"), (chi2, "<f4")):
        a = np.ascontiguousarray(np.asarray(a).astype(dtype))
        if a.dtype.kind == "f":
            a = np.where(np.isnan(a), np.float32(np.nan), a).astype(dtype)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def write_product(
    result, fits_path: str | os.PathLike, png_path=None, *, overwrite=False, settings=None
):
    """Write ``result`` (a :class:`~deepem_jax.DEMResult`) as a DEM cube at ``fits_path``
    atomically, with the sha256 of its data in the header card ``DATASHA`` (what
    :func:`verify_product` checks) and ``settings`` (if given; the run's
    :func:`settings_sha256`, shortened) in ``RUNSHA``, and, if ``png_path``, its total EM and
    log T maps (PNG, with the same ``DATASHA`` in a text chunk: :func:`png_matches`)."""
    from .products import dem_maps

    cards = {CHECKSUM_CARD: data_sha256(result.em, result.status, result.chi2)}
    if settings is not None:
        cards[SETTINGS_CARD] = settings
    stamped = dataclasses.replace(result, provenance={**result.provenance, **cards})
    stamped.to_fits(fits_path, overwrite=overwrite)
    if png_path is not None:
        dem_maps(
            result.em,
            result.logt,
            result.status,
            wcs=result.wcs,
            path=str(png_path),
            title=f"{result.method.upper()} DEM, {Path(fits_path).stem}",
            metadata={CHECKSUM_CARD: cards[CHECKSUM_CARD]},
        )


def png_matches(path: str | os.PathLike, datasha: str) -> bool:
    """True if the PNG at ``path`` reads completely and was drawn from the cube whose
    ``DATASHA`` is ``datasha`` (:func:`write_product`)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return getattr(im, "text", {}).get(CHECKSUM_CARD) == datasha  # PNG text chunks
    except (OSError, SyntaxError, ValueError):
        return False


def verify_product(path: str | os.PathLike):
    """The DEM cube at ``path`` (:class:`~deepem_jax.DEMCube`) if it reads completely, warning
    free, and its data match the sha256 in its ``DATASHA`` card; :class:`ProductError` saying
    why not otherwise."""
    from astropy.utils.exceptions import AstropyWarning

    from .io import read_dem_cube

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # astropy warns on truncated or damaged files
            cube = read_dem_cube(path)
        recorded = cube.header.get(CHECKSUM_CARD)
        status, chi2 = cube.extras["status"], cube.extras["chi2"]
    except (OSError, ValueError, TypeError, KeyError, IndexError) as err:
        raise ProductError(f"{path}: unreadable ({type(err).__name__}: {err})") from err
    caught = [w for w in caught if issubclass(w.category, AstropyWarning)]
    if caught:
        raise ProductError(
            f"{path}: unreadable ({caught[0].category.__name__}: {caught[0].message})"
        )
    if recorded is None:
        raise ProductError(f"{path}: no {CHECKSUM_CARD} card (not written by write_product)")
    if data_sha256(cube.em.value, status, chi2) != recorded:
        raise ProductError(f"{path}: data do not match its {CHECKSUM_CARD} checksum")
    return cube


def _remove_stale(out_dir: Path, names: Sequence[str]) -> None:
    """Remove the temporary files a killed writer of ``names`` left behind (``.<name>.*``,
    see :func:`deepem_jax._atomic.atomic_write`)."""
    for name in names:
        for tmp in out_dir.glob(f".{name}.*"):
            tmp.unlink(missing_ok=True)


# -- one observation ------------------------------------------------------------------------


def summarise(em: np.ndarray, logt: np.ndarray, status: np.ndarray) -> tuple[dict, np.ndarray]:
    """Statistics of one DEM cube (see :class:`ObservationOutcome`): ``stats`` and the mean EM
    per bin (n_T,) over the pixels with a positive total EM, cm^-5."""
    from .products import mean_logt

    e = np.asarray(em, np.float64).reshape(-1, np.shape(em)[-1])
    tot = e.sum(-1)
    has = np.isfinite(tot) & (tot > 0)
    nan = float("nan")
    if not has.any():
        keys = ("em_sum", "em_median", "logt_emw", "logt_median", "logt_p10", "logt_p90")
        return dict.fromkeys(keys, nan), np.full(e.shape[-1], nan)
    lt = np.asarray(logt, np.float64)
    lt_map = mean_logt(e[has], lt)
    p10, p50, p90 = np.percentile(lt_map, [10, 50, 90])
    em_sum = float(tot[has].sum())
    stats = {
        "em_sum": em_sum,
        "em_median": float(np.median(tot[has])),
        "logt_emw": float(e[has].sum(0) @ lt / em_sum),
        "logt_median": float(p50),
        "logt_p10": float(p10),
        "logt_p90": float(p90),
    }
    return stats, e[has].mean(0)


def _counts(status: np.ndarray) -> dict[str, int]:
    present = DEMStatus.counts(status)
    return {s.name: present.get(s.name, 0) for s in DEMStatus}


def _invert_one(inputs: str | tuple[str, ...], cfg: _Config) -> ObservationOutcome:
    """Load, invert and write one observation, or keep its verified output. Never raises for
    the observation's own faults: they come back as a failed outcome with the reason."""
    t0 = time.perf_counter()
    label, when = _label(inputs), None
    try:
        from .io import load_aia
        from .pipeline import invert

        sources, times = _selected(inputs, cfg.channels)
        when = times.min().isot
        out = Path(cfg.out_dir)
        stem = product_stem(cfg.method, sources, times)
        fits_path, png_path = out / f"{stem}.fits", out / f"{stem}.png"
        note = ""
        if fits_path.exists() and not cfg.overwrite:
            try:
                cube = verify_product(fits_path)
            except ProductError as err:
                note = f"redone: {err}"
            else:
                made_with = cube.header.get(SETTINGS_CARD)
                if made_with != cfg.settings:
                    # another run's result: never replaced without overwrite, never reused
                    raise FileExistsError(
                        f"{fits_path} exists and was made with other settings ({SETTINGS_CARD} "
                        f"{made_with or 'missing'}, this run {cfg.settings}: method, channels, "
                        "rebin or invert options differ); pass overwrite or another output "
                        "directory"
                    )
                if not cfg.png or png_matches(png_path, cube.header[CHECKSUM_CARD]):
                    stats, dem = summarise(cube.em.value, cube.logt, cube.extras["status"])
                    return ObservationOutcome(
                        label,
                        "skipped",
                        "output exists and its data checksum verifies",
                        when,
                        str(fits_path),
                        _counts(cube.extras["status"]),
                        stats,
                        cube.logt,
                        dem,
                        time.perf_counter() - t0,
                    )
                note = f"redone: {png_path.name} is missing, incomplete or of another cube"
        _remove_stale(out, [fits_path.name, png_path.name])
        stack = load_aia(sources, np.array(cfg.channels) * u.AA, rebin=cfg.rebin)
        result = invert(stack, cfg.method, **cfg.options)
        write_product(
            result,
            fits_path,
            png_path if cfg.png else None,
            overwrite=True,
            settings=cfg.settings,
        )
        if not cfg.png:  # a map of the cube just replaced
            png_path.unlink(missing_ok=True)
        stats, dem = summarise(result.em, result.logt, result.status)
        return ObservationOutcome(
            label,
            "ok",
            note,
            when,
            str(fits_path),
            _counts(result.status),
            stats,
            result.logt,
            dem,
            time.perf_counter() - t0,
        )
    except Exception as err:  # the fault boundary: one bad observation never stops the series
        return _failed(label, err, when, time.perf_counter() - t0)


def _failed(label: str, err: BaseException, when=None, seconds=0.0) -> ObservationOutcome:
    reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return ObservationOutcome(label, "failed", reason, when, seconds=seconds)


# -- executors ------------------------------------------------------------------------------


def _run_synchronous(items, cfg) -> Iterator[tuple[int, ObservationOutcome]]:
    for i, inputs in enumerate(items):
        yield i, _invert_one(inputs, cfg)


def _run_on_client(client, items, cfg) -> Iterator[tuple[int, ObservationOutcome]]:
    """One task per observation, submitted as worker threads become free (one task in flight
    per thread, so a dying worker takes only the observation it is working on with it; each
    task carries ``cfg``, so no observation depends on data held by another worker); outcomes
    in the order they finish. A task that errs in Dask itself (``KilledWorker``: its
    workers died ``allowed-failures + 1`` times) comes back as a failed outcome."""
    from distributed import as_completed

    todo = iter(enumerate(items))
    index: dict[str, int] = {}
    queue = as_completed()

    def fill():
        free = max(sum(client.nthreads().values()), 1) - len(index)
        for i, inputs in islice(todo, max(free, 0)):
            key = f"deepem_jax-invert-{i}-{uuid.uuid4().hex[:8]}"
            fut = client.submit(_invert_one, inputs, cfg, key=key, pure=False)
            index[fut.key] = i
            queue.add(fut)

    fill()
    for fut in queue:
        i = index.pop(fut.key)
        try:
            outcome = fut.result()
        except Exception as err:
            outcome = _failed(_label(items[i]), err)
        fut.release()
        yield i, outcome
        fill()


@contextlib.contextmanager
def _executor(client, workers: int | None) -> Iterator[Callable]:
    """The function running the tasks for ``client`` (see :func:`invert_series`); an embedded
    cluster or a client connected here is closed on exit."""
    if workers is not None and client is not None:
        raise ValueError("workers= is only for the embedded LocalCluster (client=None)")
    if isinstance(client, str) and client == "synchronous":
        yield _run_synchronous
        return
    from distributed import Client, LocalCluster

    if client is None:
        with (
            LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as c,
        ):
            yield partial(_run_on_client, c)
    elif isinstance(client, str):
        try:
            connected = Client(client, timeout="10s")
        except (OSError, TimeoutError, ValueError) as err:  # ValueError: not an address
            raise ConnectionError(f"cannot reach the Dask scheduler at {client}: {err}") from err
        with connected:
            yield partial(_run_on_client, connected)
    else:
        yield partial(_run_on_client, client)


# -- the series -----------------------------------------------------------------------------


def invert_series(
    observations: Sequence,
    method: str = "bp",
    *,
    out_dir: str | os.PathLike,
    client=None,
    workers: int | None = None,
    channels: u.Quantity | None = None,
    rebin: int = 1,
    overwrite: bool = False,
    png: bool = False,
    progress: bool = False,
    **options,
) -> SeriesResult:
    """DEM cubes of many observations, one Dask task each, written to ``out_dir``.

    Parameters
    ----------
    observations
        Each a directory of AIA FITS files or a list of files of one observation (see
        :func:`group_files` for loose files); paths, resolved to absolute ones here (on a
        remote cluster every worker must reach them). The same observation given twice runs
        once.
    method, channels, rebin
        As in :func:`deepem_jax.invert` (``channels`` default: the predictor's, else the six
        coronal channels): each observation is loaded with ``load_aia(files, channels,
        rebin=rebin)``.
    out_dir
        Directory of the DEM cubes (``dem_<method>_<time>_<id>.fits``, as ``deepem-jax
        invert`` names them) and of the series products; created if needed.
    client
        None: an embedded ``LocalCluster`` of ``workers`` single-threaded processes (default:
        one per core), closed at the end. A ``distributed.Client`` or a scheduler address
        (``"tcp://host:8786"``): that cluster. ``"synchronous"``: in this process, in order.
    overwrite
        Recompute every observation; otherwise an observation whose cube exists, verifies
        (:func:`verify_product`) and was made with the same settings is skipped and its
        statistics are read from the cube, and one whose cube was made with other settings
        fails (``FileExistsError``; the cube is kept).
    png
        Also write each cube's total EM and log T maps (``<stem>.png``).
    progress
        Show a progress bar over observations.
    **options
        Keyword arguments of :func:`deepem_jax.invert` for every observation (``response``,
        ``predictor``, ``tolfac``, ``consistency``, ``degradation``, ``solver``, ...), sent
        to each worker once; a path given as ``degradation`` is made absolute. Without a
        ``predictor``, a network method loads the shipped one for the channels here, so every
        worker runs the same network in the same operand dtype (:attr:`Predictor.dtype`).

    Returns
    -------
    SeriesResult
        One :class:`ObservationOutcome` per observation; the FITS table and PNG of the series
        (``series_<method>_<id>.fits``/``.png``, ``<id>`` from the inputs and the settings;
        rewritten atomically on every run).

    Raises
    ------
    ValueError
        Bad method, tolfac or channels, no observation, ``workers`` with another ``client``.
    TypeError
        An option that :func:`deepem_jax.invert` does not take (or that is set per
        observation: ``sigma``, ``obstime``).
    ConnectionError
        The scheduler at the address ``client`` cannot be reached (within 10 s).
    """
    from .pipeline import METHODS, MIN_CHANNELS, invert
    from .response import AIA_CHANNELS

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    per_observation = {"observation", "method", "sigma", "channels", "obstime", "rebin"}
    unknown = set(options) - (set(inspect.signature(invert).parameters) - per_observation)
    if unknown:
        raise TypeError(f"unknown option(s) of invert for a series: {sorted(unknown)}")
    tolfac = options.get("tolfac", 1.4)
    if not (isinstance(tolfac, int | float) and math.isfinite(tolfac) and tolfac > 0):
        raise ValueError(f"tolfac must be a finite number > 0, got {tolfac!r}")
    predictor = options.get("predictor")
    if channels is None:
        chans = predictor.channels if predictor is not None else AIA_CHANNELS.to_value(u.AA)
    else:
        chans = np.atleast_1d(channels.to_value(u.AA))
    chans = tuple(int(round(c)) for c in chans)
    if len(set(chans)) != len(chans):
        raise ValueError(f"duplicate channels: {list(chans)} Å")
    if len(chans) < MIN_CHANNELS:
        raise ValueError(f"a DEM needs at least {MIN_CHANNELS} channels, got {list(chans)} Å")
    uses_net = method == "net" or (method == "fit" and options.get("init") == "net")
    if predictor is None and uses_net:
        # chosen here, not on each worker: one network and operand dtype for the whole series
        from .pretrained import load_default_predictor

        options["predictor"] = load_default_predictor(np.array(chans) * u.AA)
    items = _normalise(observations)
    if not items:
        raise ValueError("no observation given")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(options.get("degradation"), str | os.PathLike):
        options["degradation"] = str(Path(options["degradation"]).resolve())
    cfg = _Config(
        method=method,
        channels=chans,
        rebin=int(rebin),
        options=options,
        out_dir=str(out),
        overwrite=bool(overwrite),
        png=bool(png),
        settings=settings_sha256(method, chans, int(rebin), options)[:16],
    )
    outcomes: list[ObservationOutcome | None] = [None] * len(items)
    with _executor(client, workers) as run:
        bar = _bar(progress, len(items))
        for i, outcome in run(items, cfg):
            outcomes[i] = outcome
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    done = tuple(o for o in outcomes if o is not None)
    name = _series_name(method, items, cfg.settings)
    table, plot = out / f"{name}.fits", out / f"{name}.png"
    write_series_table(done, table)
    plot_series(done, plot, title=f"{method.upper()} DEM series, {len(done)} observations")
    return SeriesResult(done, table, plot)


def _bar(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="obs", desc="observations")


def _series_name(method: str, items, settings: str) -> str:
    """``series_<method>_<hash>``, the hash of the inputs and the run's settings (a run with
    other settings, whose cubes are refused, never replaces this run's table)."""
    text = "\n".join(sorted(i if isinstance(i, str) else "\t".join(i) for i in items))
    text += "\n" + settings
    return f"series_{method}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


# -- series products ------------------------------------------------------------------------

_STATS = ("em_sum", "em_median", "logt_emw", "logt_median", "logt_p10", "logt_p90")


def _time_order(outcomes: Sequence[ObservationOutcome]) -> list[ObservationOutcome]:
    return sorted(outcomes, key=lambda o: (o.time is None, o.time or "", o.label))


def write_series_table(outcomes: Sequence[ObservationOutcome], path: str | os.PathLike) -> Path:
    """One FITS binary table (extension ``SERIES``) with a row per observation in time order,
    written atomically with astropy's CHECKSUM/DATASUM cards: ``TIME`` (ISO, UTC), ``MJD``,
    ``STATE``, ``REASON``, ``INPUT``, ``OUTPUT``, ``N_<STATUS>`` (pixels per
    :class:`DEMStatus`), ``EM_SUM``, ``EM_MEDIAN`` (cm-5), ``LOGT_EMW``, ``LOGT_MEDIAN``,
    ``LOGT_P10``, ``LOGT_P90`` (log10(T / K)), ``LOGT`` and ``DEM_MEAN`` (per bin, cm-5),
    ``SECONDS``. Failed rows hold NaN and zero counts. Text is stored as ASCII (FITS)."""
    from astropy.io import fits
    from astropy.table import Table
    from astropy.time import Time

    from ._atomic import atomic_write

    rows = _time_order(outcomes)
    n_t = max((len(o.logt) for o in rows if o.logt is not None), default=1)
    nan_vec = np.full(n_t, np.nan)
    t = Table()
    t["TIME"] = [o.time or "" for o in rows]
    t["MJD"] = [Time(o.time).mjd if o.time else np.nan for o in rows]
    t["STATE"] = [o.state for o in rows]
    t["REASON"] = [_ascii(o.reason) for o in rows]
    t["INPUT"] = [_ascii(o.label) for o in rows]
    t["OUTPUT"] = [Path(o.output).name if o.output else "" for o in rows]
    for s in DEMStatus:
        t[f"N_{s.name}"] = np.array([o.counts.get(s.name, 0) for o in rows], np.int64)
    for key in _STATS:
        t[key.upper()] = [o.stats.get(key, np.nan) for o in rows]
        t[key.upper()].unit = u.cm**-5 if key.startswith("em") else None
    t["LOGT"] = np.array([o.logt if o.logt is not None else nan_vec for o in rows])
    t["DEM_MEAN"] = np.array([o.dem_mean if o.dem_mean is not None else nan_vec for o in rows])
    t["DEM_MEAN"].unit = u.cm**-5
    t["SECONDS"] = [o.seconds for o in rows]
    hdu = fits.table_to_hdu(t)
    hdu.name = "SERIES"
    hdu.header["COMMENT"] = "deepem_jax.invert_series: one row per observation, time order"
    path = Path(path)
    with atomic_write(path) as fh:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(fh, checksum=True)
    return path


def _ascii(text: str) -> str:
    """``text`` as FITS table strings must be: ASCII (accents dropped, e.g. Å -> A)."""
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


def plot_series(
    outcomes: Sequence[ObservationOutcome], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """PNG (saved atomically) of the series against time: total EM of the field (cm^-5 summed
    over pixels with an EM), EM-weighted log T (field mean, and the median with the 10-90 %
    range of the per-pixel map), the share of pixels per status, and the mean DEM of each
    observation against log T coloured by time. Failed observations are left out."""
    from astropy.time import Time
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from ._atomic import save_figure

    rows = [o for o in _time_order(outcomes) if o.state != "failed" and o.time]
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (a_em, a_t), (a_st, a_dem) = fig.subplots(2, 2)
    fig.suptitle(title or "DEM series")
    when = [Time(o.time).to_datetime() for o in rows]
    stat = {k: np.array([o.stats[k] for o in rows]) for k in _STATS}
    a_em.plot(when, stat["em_sum"], "o-")
    a_em.set_yscale("log")
    a_em.set_ylabel("total EM of the field (cm$^{-5}$ summed over pixels)")
    a_t.fill_between(when, stat["logt_p10"], stat["logt_p90"], alpha=0.3, label="10-90 %")
    a_t.plot(when, stat["logt_median"], "o-", label="median of the map")
    a_t.plot(when, stat["logt_emw"], "s--", label="EM-weighted, whole field")
    a_t.set_ylabel("log$_{10}$(T / K)")
    a_t.legend(loc="best", fontsize="small")
    total = np.array([max(sum(o.counts.values()), 1) for o in rows])
    for s in DEMStatus:
        share = np.array([o.counts.get(s.name, 0) for o in rows]) / total
        if share.any():
            a_st.plot(when, 100 * share, "o-", label=s.name)
    a_st.set_ylabel("pixels (%)")
    if rows:  # every observation failed: no status to label
        a_st.legend(loc="best", fontsize="small")
    cmap = colormaps["viridis"]
    for k, o in enumerate(rows):
        a_dem.plot(o.logt, o.dem_mean, color=cmap(k / max(len(rows) - 1, 1)))
    a_dem.set_yscale("log")
    a_dem.set_xlabel("log$_{10}$(T / K)")
    a_dem.set_ylabel("mean EM per bin (cm$^{-5}$), early → late")
    for ax in (a_em, a_t, a_st):
        ax.set_xlabel("time (UTC)")
        for label in ax.get_xticklabels():
            label.set_rotation(30)
    if not rows:
        fig.text(0.5, 0.5, "no observation with a DEM", ha="center", fontsize="x-large")
    path = Path(path)
    save_figure(fig, path)
    return path
