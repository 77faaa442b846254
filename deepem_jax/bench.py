"""The speed and fit benchmark suite: Basis Pursuit, the network and a regularised-inversion peer
on the same synthetic pixels, on one device, in one run.

Per image size, one synthetic six-channel scene (:func:`deepem_jax.forward.synthetic_scene`
with AIA noise; sigma from the AIA error model) is given to every method:

* ``bp_jax_f32`` / ``bp_jax_f64`` -- :func:`deepem_jax.invert` with ``method="bp"`` and
  ``solver=bp.DualSimplex(precision=...)``, all pixels;
* ``bp_highs`` -- :func:`deepem_jax.invert` with ``solver=bp.HiGHS()`` (one SciPy ``linprog``
  call per pixel), on a random subset of the pixels;
* ``net_<name>_bf16`` / ``net_<name>_f32`` -- :func:`deepem_jax.invert` with
  ``method="net"``, ``consistency=False`` (the network alone), its matrix products on bfloat16
  / float32 operands; ``net_<name>_consistent`` -- with the consistency step, in the operand
  dtype :attr:`deepem_jax.Predictor.dtype` defaults to on this device
  (:func:`deepem_jax.predictor.native_dtype`, the row's ``net_dtype``); for ``deepem``, the
  shipped model. ``deepem`` is the shipped six-channel network; ``small`` (6->64->64->18) is
  randomly initialised, so only its speed means anything;
* ``fit_bp_f32`` -- :func:`deepem_jax.fit.fit` (``Fitter()``: log EM, no regulariser,
  L-BFGS, float32, compacted rounds, as ``invert(method="fit")`` runs it) on a random subset of
  ``fit_pixels`` pixels (all when the scene has fewer; the HiGHS subset is a prefix of it),
  started from the ``bp_jax_f32`` row's EM of the same pixels (``init="bp"``), so its time is
  the fit alone (``pixels_per_s_with_init`` adds BP's per-pixel time). It also reports the
  optimiser steps (median, p99, max), and the median chi^2 of the fit and of BP over the
  pixels BP solved (``bp_solved``);
* ``demregpy`` -- ``demregpy.dn2dem`` (Hannah & Kontar 2012), when installed, on a random
  subset (the HiGHS subset is a prefix of it), in a subprocess with a timeout because it forks
  worker processes, which is unsafe in a process running JAX.

Each row reports the throughput of a second call on the same pixels (``pixels_per_s``), the
first call's time and the compile time derived from it (``compile_seconds``: first-call time
minus the second-call time for the same number of pixels), the peak resident-memory increase
during the measured call, and the fit: median chi^2 (:attr:`deepem_jax.DEMResult.chi2`'s
definition, mean over channels of ``((K EM - y) / sigma)**2``), the fraction of pixels with an
EM and the fraction of those with a negative bin, over the row's pixels and over the pixels
every method of that size ran on (``same_pixels``). Ratios of throughputs name both sides
(``reference``). An optional tiled run (a 256^2 scene tiled to e.g. 4096^2) times the networks
alone through :func:`deepem_jax.invert`, in their default operand dtype. An optional real scene
(``real``: a crop of the 2024-10-04 synoptic set under ``$DEEPEM_JAX_DATA``, five channels,
and the unsaturated pixels of the ten 2011-02-15 flare cutouts, six channels; both calibrated
as ``invert`` calibrates files) gets ``bp_highs``, ``bp_jax_f32`` and the shipped network of
its channels (``net_deepem5_*``, ``net_deepem_*``); the rows and ratios carry the scene's name.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from ._atomic import atomic_write

__all__ = ["matmul_peak_flops", "run_suite", "to_markdown", "write_report"]

#: Seconds before the demregpy subprocess is killed.
DEMREG_TIMEOUT = 900
#: Pixels of the warm-up call of the HiGHS row (compiles the JAX parts of the BP pipeline).
_HIGHS_WARMUP = 2

_DESCRIPTIONS = {
    "bp_highs": (
        "BP, one scipy linprog(method='highs') call per pixel (invert(method='bp', "
        "solver=bp.HiGHS()), retries included)"
    ),
    "bp_jax_f32": (
        "BP, batched dual simplex in JAX, float32 pivots with float64 certificates "
        "(invert(method='bp', solver=bp.DualSimplex(precision='float32')), retries included)"
    ),
    "bp_jax_f64": (
        "BP, batched dual simplex in JAX, float64 pivots (invert(method='bp', "
        "solver=bp.DualSimplex(precision='float64')), retries included)"
    ),
    "fit_bp_f32": (
        "fit.fit with Fitter() (log EM, no regulariser, L-BFGS, gtol 1e-3, max_steps 2000), "
        "float32, compacted rounds as invert(method='fit') runs it, started from the "
        "bp_jax_f32 row's EM (BP's time not included)"
    ),
    "demregpy": (
        "demregpy.dn2dem regularised inversion (Hannah & Kontar 2012), dem_norm0=ones, "
        "same K and log T bins, the call alone timed inside its subprocess"
    ),
}
_NET_WEIGHTS = {
    "deepem": "shipped six-channel weights",
    "deepem5": "shipped five-channel weights",
    "small": "random init, untrained",
}
#: Name of the synthetic scenes in the rows' ``scene`` field.
SYNTHETIC = "synthetic"
#: Names of the real scenes (:func:`_real_scene`, :func:`_flare_scene`) in the rows' ``scene``.
SYNOPTIC = "synoptic 2024-10-04"
FLARE = "flare 2011-02-15, 10 times"
#: The channels of the six-channel network and of the flare cutouts, Å.
SIX_CHANNELS = (94, 131, 171, 193, 211, 335)


def _describe(method: str) -> str:
    if method in _DESCRIPTIONS:
        return _DESCRIPTIONS[method]
    _, name, *rest = method.split("_")
    net = f"{name} network ({_NET_WEIGHTS[name]})"
    if rest == ["consistent"]:
        shipped = ", the shipped model" if name.startswith("deepem") else ""
        return (
            f"{net} + consistency step (projection onto BP's band, BP for the pixels it "
            "leaves outside), matrix products on the operands native to the device (row's "
            f"net_dtype) (invert(method='net'){shipped})"
        )
    if rest == ["bf16"]:
        return (
            f"{net} alone, matrix products on bfloat16 operands "
            "(invert(method='net', consistency=False), Predictor dtype='bfloat16')"
        )
    return (
        f"{net} alone, float32 throughout "
        "(invert(method='net', consistency=False), Predictor dtype='float32')"
    )


class _PeakRSS:
    """Context manager sampling this process's RSS; ``.peak_mb`` is the max increase."""

    def __enter__(self) -> _PeakRSS:
        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._peak = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._proc.memory_info().rss)
        self.peak_mb = (self._peak - self._base) / 2**20


def _measure(
    fn: Callable[[], Any],
    n_pixels: int,
    warmup: Callable[[], Any] | None = None,
    warm_pixels: int | None = None,
    repeats: int = 1,
) -> tuple[Any, dict[str, float]]:
    """``fn()``'s result and timing: a first call ``warmup`` (default ``fn``) on
    ``warm_pixels`` pixels (default ``n_pixels``), then ``repeats`` measured calls with the
    peak RSS increase sampled over them; ``seconds`` is their median (``seconds_each`` all of
    them). ``compile_seconds`` is the first call's time minus what the measured rate gives for
    its pixels."""
    warm_pixels = n_pixels if warm_pixels is None else warm_pixels
    t0 = time.perf_counter()
    (warmup or fn)()
    first = time.perf_counter() - t0
    times = []
    with _PeakRSS() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
    dt = float(np.median(times))
    return out, {
        "seconds": dt,
        "seconds_each": times,
        "pixels_per_s": n_pixels / dt,
        "first_call_seconds": first,
        "first_call_pixels": warm_pixels,
        "compile_seconds": first - warm_pixels * dt / n_pixels,
        "peak_rss_mb": mem.peak_mb,
    }


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    """Measured float32 matmul throughput (FLOP/s) of the default device: best of ``repeats``."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def _net_flops_per_pixel(config) -> float:
    """Multiply-adds x 2 of the MLP, plus those of the refinement's products (``J J.T``, the
    residual, ``J.T v``) and its C x C Cholesky solve."""
    widths = (config.n_channels, *config.hidden, config.n_outputs)
    C, T = config.n_channels, config.n_temperatures
    step = 2 * T * C * C + 4 * C * T + C**3 // 3 + 2 * C * C
    return float(sum(2 * a * b for a, b in itertools.pairwise(widths)) + config.refine_steps * step)


def _chi2(em: np.ndarray, K: np.ndarray, y: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """chi^2 of EMs (..., n_T) that do not come from :func:`deepem_jax.invert` (demregpy), as
    :attr:`deepem_jax.DEMResult.chi2` defines it without degradation."""
    from .forward import chi2

    return chi2(np.asarray(em, np.float64) @ np.asarray(K, np.float64).T, y, sigma)


def _fit_stats(em: np.ndarray, chi2: np.ndarray) -> dict[str, Any]:
    """Median chi^2 over pixels with an EM, the fraction with an EM (all bins finite), and the
    fraction of those with a negative bin; EM (k, n_T), chi2 (k,)."""
    has = np.all(np.isfinite(em), axis=-1)
    n_em = int(has.sum())
    neg = np.any(em < 0, axis=-1) & has
    return {
        "chi2_median": float(np.median(chi2[has])) if n_em else None,
        "em_fraction": n_em / max(len(has), 1),
        "negative_em_fraction": float(neg.sum() / n_em) if n_em else None,
    }


@dataclasses.dataclass(frozen=True, eq=False)
class _Scene:
    """One synthetic scene and the pixel subsets of the slow methods (flat indices: the HiGHS,
    demregpy and fit subsets are prefixes of ``subset``; ``common`` is the shorter of the first
    two)."""

    size: int
    y: np.ndarray  # (size, size, C) DN s^-1 pix^-1; (1, n, C) for the flare's pixels
    sigma: np.ndarray
    subset: np.ndarray
    n_highs: int
    n_demreg: int
    n_fit: int = 0
    name: str = SYNTHETIC

    @property
    def n(self) -> int:
        return self.y.shape[0] * self.y.shape[1]

    @property
    def common(self) -> np.ndarray:
        return self.subset[: min(self.n_highs, self.n_demreg or self.n_highs)]

    def flat(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Intensities and sigma (len(idx), C) of the flat pixels ``idx``."""
        C = self.y.shape[-1]
        return self.y.reshape(-1, C)[idx], self.sigma.reshape(-1, C)[idx]


def run_suite(
    sizes: Sequence[int] = (64, 256, 1024),
    tiled_size: int | None = 4096,
    highs_pixels: int = 300,
    demreg_pixels: int = 1024,
    f64_max_size: int = 1024,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
    fit_pixels: int = 4096,
    full_disk: int = 0,
    repeats: int = 3,
    real: int = 0,
) -> dict[str, Any]:
    """Run the suite; a JSON-ready dict with ``meta``, ``results`` (one row per method and
    size), ``ratios``, ``methods`` (what each row ran) and ``full_disk``. ``fit_pixels`` caps
    the pixels of the fit row per size (0: no fit row; e.g. 100000 for 10^5 pixels at 1024^2:
    two calls of ~85 s each on a 2-core CPU). ``full_disk``: side of the real-image BP run
    (:func:`deepem_jax.bench_disk.full_disk_bp`, once with the inputs as ``load_aia`` returns
    them and once in float32; each in a fresh process, minutes at 4096); 0 skips it, and so
    does a missing synoptic data set (recorded in ``meta["errors"]``). ``real``: side of the
    central crop of the real synoptic image (:func:`_real_scene`; 1024: all of it) on which
    HiGHS (``highs_pixels`` random pixels), BP-JAX in float32 and the shipped five-channel
    network (``net_deepem5_*``) run, and the same methods with the six-channel network on the
    flare cutouts' pixels (:func:`_flare_scene`); 0 skips both, and a missing data set is
    recorded in ``meta["errors"]``. Every per-size row times ``repeats`` calls after its
    warm-up call and reports their median (the tiled run: one call)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    from .forward import synthetic_scene
    from .predictor import Predictor
    from .pretrained import load_default_predictor
    from .response import DEEPEM_LOGT, default_response
    from .uncertainty import sigma_values

    say = log or (lambda s: None)
    response = default_response().regrid(DEEPEM_LOGT)
    channels = np.asarray(response.wavelength.to_value(u.AA)) * u.AA
    exptime = 2.0
    rng = np.random.default_rng(seed)
    nets = {
        "deepem": load_default_predictor(channels),
        "small": Predictor.init(jax.random.PRNGKey(seed), "small"),
    }
    peak = matmul_peak_flops()
    demregpy_version = _demregpy_version() if demreg_pixels else None
    meta = {**_run_meta(response, exptime, peak, demregpy_version), "repeats": repeats}
    say(
        f"device {meta['device']} ({meta['platform']}), jax {meta['jax_version']}, "
        f"{meta['cpu_count']} cores, matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    ctx = _Context(response, channels, nets, peak, [], {}, say, repeats)
    for size in sizes:
        say(f"size {size}x{size}")
        n_demreg = demreg_pixels if demregpy_version else 0
        scene = _make_scene(response, size, rng, exptime, highs_pixels, n_demreg, fit_pixels)
        _bench_size(ctx, scene, size <= f64_max_size)
    if tiled_size:
        _, y = synthetic_scene(response, (256, 256), rng, exptime)
        _bench_tiled(ctx, y, sigma_values(y, exptime, response.wavelength), tiled_size)
    if real:
        _bench_real(ctx, real, highs_pixels, rng)
    disk = _bench_full_disk(ctx, full_disk) if full_disk else []
    for key, msg in ctx.errors.items():
        say(f"  {key} failed: {msg}")
    meta["errors"] = ctx.errors
    methods = {r["method"]: _describe(r["method"]) for r in ctx.results}
    return {
        "meta": meta,
        "results": ctx.results,
        "ratios": _ratios(ctx.results),
        "methods": methods,
        "full_disk": disk,
    }


def _real_scene(size: int, highs_pixels: int, rng: np.random.Generator) -> _Scene:
    """The central ``size`` x ``size`` crop (at most the whole 1024^2 image) of the real
    2024-10-04 synoptic set (:mod:`deepem_jax.bench_disk`'s five channels), calibrated as
    :func:`deepem_jax.invert` calibrates files by default (:func:`_calibrated`). The methods
    get these arrays with ``degradation=False``, so none of them times the calibration;
    ``highs_pixels`` random pixels of the crop form the HiGHS subset."""
    from .bench_disk import CHANNELS, _default_data_dir, _tiled

    y, s = _calibrated(_default_data_dir(), CHANNELS)
    size = min(size, *y.shape[:2])
    n_highs = min(highs_pixels, size * size)
    return _Scene(
        size,
        _tiled(y, size),
        _tiled(s, size),
        rng.permutation(size * size)[:n_highs],
        n_highs,
        0,
        name=SYNOPTIC,
    )


def _calibrated(files, channels: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Intensities and sigma (ny, nx, C) of AIA ``files`` (anything ``load_aia`` takes) in
    ``channels`` (Å), as :func:`deepem_jax.invert` calibrates files: sigma from the error
    model with the file's ``n_sample``, both divided by each channel's degradation at its
    observation time, invalid and saturated pixels NaN."""
    from .io import load_aia
    from .pipeline import _corrected, _degradation, _stack_observation

    obs = _stack_observation(load_aia(files, np.array(channels) * u.AA), None, False)
    return _corrected(obs, _degradation(obs, True)[0])


def _flare_scene(highs_pixels: int, rng: np.random.Generator) -> _Scene:
    """Every valid, unsaturated pixel of the ten 2011-02-15 cutout times under
    ``$DEEPEM_JAX_DATA/aia/flare_2011-02-15`` (six channels, 67^2 each), each time calibrated as
    :func:`deepem_jax.invert` calibrates files (``n_sample`` 1, each channel's degradation at
    its own observation time), as one row of pixels (1, n, 6); ``highs_pixels`` random ones
    form the HiGHS subset."""
    from .data import data_dir

    folder = data_dir() / "aia" / "flare_2011-02-15"
    files = sorted(folder.glob("aia_flare_*.fits"))
    if not files:
        raise FileNotFoundError(f"no AIA flare cutouts in {folder}")
    times: dict[str, list] = {}  # hour-minute of each set: its six files
    for f in files:
        times.setdefault(f.name.split("T")[1][:5], []).append(f)
    ys, ss = [], []
    for t in sorted(times):
        y, s = _calibrated(times[t], SIX_CHANNELS)
        ok = np.all(np.isfinite(y), -1)
        ys.append(y[ok])
        ss.append(s[ok])
    side = y.shape[0]
    y, s = np.concatenate(ys)[None], np.concatenate(ss)[None]
    n_highs = min(highs_pixels, y.shape[1])
    return _Scene(side, y, s, rng.permutation(y.shape[1])[:n_highs], n_highs, 0, name=FLARE)


def _bench_real(ctx: _Context, size: int, highs_pixels: int, rng: np.random.Generator) -> None:
    """HiGHS, BP-JAX (float32) and the shipped network of the channels on each real scene: the
    synoptic crop (:func:`_real_scene`, five channels) and the flare's pixels
    (:func:`_flare_scene`, six), with the default response of their channels; a missing data
    set goes to ``ctx.errors``."""
    from .bench_disk import CHANNELS
    from .pretrained import load_default_predictor

    for name, make, chans, net in (
        (SYNOPTIC, lambda: _real_scene(size, highs_pixels, rng), CHANNELS, "deepem5"),
        (FLARE, lambda: _flare_scene(highs_pixels, rng), SIX_CHANNELS, "deepem"),
    ):
        channels = np.array(chans) * u.AA
        try:
            scene = make()
        except (OSError, ValueError) as err:
            ctx.errors[f"real {name}"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        ctx.say(f"real {name}: {scene.n:,} pixels, {len(chans)} channels")
        real = dataclasses.replace(
            ctx,
            response=ctx.response.select(channels),
            channels=channels,
            nets={net: load_default_predictor(channels)},
        )
        _bench_size(real, scene, with_f64=False)


def _bench_full_disk(ctx: _Context, size: int) -> list[dict[str, Any]]:
    """:func:`~deepem_jax.bench_disk.full_disk_bp` at ``size`` with float64 (as loaded) and
    float32 inputs; failures (e.g. no synoptic data) go to ``ctx.errors``."""
    from .bench_disk import full_disk_bp

    runs = []
    for dtype in (None, "float32"):
        label = dtype or "as loaded"
        ctx.say(f"full-disk BP {size}x{size} (real synoptic image tiled, inputs {label})")
        try:
            out = full_disk_bp(size, dtype=dtype)
        except (RuntimeError, FileNotFoundError, OSError) as err:
            ctx.errors[f"full_disk_bp {size} {label}"] = str(err).splitlines()[-1]
            break
        ctx.say(
            f"  {out['seconds']:.0f} s ({out['pixels_per_s']:,.0f} px/s), peak RSS "
            f"{out['peak_rss_gib']:.2f} GiB, warm-up {out['warmup_seconds']:.0f} s"
        )
        runs.append(out)
    return runs


def _run_meta(
    response, exptime: float, peak: float, demregpy_version: str | None
) -> dict[str, Any]:
    """The run's ``meta`` record: device, software versions, measured matmul peak (FLOP/s),
    response name, exposure time (s) of the synthetic scenes and the demregpy version."""
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "matmul_peak_gflops": peak / 1e9,
        "response": response.name,
        "exptime_s": exptime,
        "demregpy": demregpy_version or "not run (not installed, or demreg_pixels=0)",
    }


def _make_scene(
    response,
    size: int,
    rng: np.random.Generator,
    exptime: float,
    highs_pixels: int,
    demreg: int,
    fit_pixels: int = 0,
) -> _Scene:
    """A noisy synthetic ``size`` x ``size`` scene with its AIA sigma, and a random subset of
    ``max(highs_pixels, demreg, fit_pixels)`` pixels (each count capped at the scene's pixels;
    ``demreg`` 0 when demregpy does not run)."""
    from .forward import synthetic_scene
    from .uncertainty import sigma_values

    _, y = synthetic_scene(response, (size, size), rng, exptime)
    n = size * size
    n_highs, n_demreg, n_fit = min(highs_pixels, n), min(demreg, n), min(fit_pixels, n)
    return _Scene(
        size,
        y,
        sigma_values(y, exptime, response.wavelength),
        rng.permutation(n)[: max(n_highs, n_demreg, n_fit)],
        n_highs,
        n_demreg,
        n_fit,
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _Context:
    """What every measurement of a run shares; ``results`` and ``errors`` are filled in."""

    response: Any
    channels: u.Quantity
    nets: dict[str, Any]
    peak_flops: float
    results: list[dict[str, Any]]
    errors: dict[str, str]
    say: Callable[[str], None]
    repeats: int = 1

    def record(
        self, method, scene_size, pixels, pixel_set, m, fit, same=None, scene=SYNTHETIC, **extra
    ) -> None:
        row = {
            "method": method,
            "scene": scene,
            "size": scene_size,
            "pixels": pixels,
            "pixel_set": pixel_set,
            **m,
            **fit,
            "same_pixels": same,
            **extra,
        }
        self.results.append(row)
        chi2 = "n/a" if fit["chi2_median"] is None else f"{fit['chi2_median']:.3g}"
        where = f"{scene_size}^2" if scene == SYNTHETIC else f"{scene_size}^2 {scene}"
        self.say(
            f"  {method:<26s} {where:>7s}  {m['pixels_per_s']:>12,.0f} px/s  "
            f"compile {_fmt(m['compile_seconds'], '.2f') or 'n/a'} s  chi2 median {chi2}"
        )

    def invert_kwargs(self, sigma: np.ndarray) -> dict[str, Any]:
        return {
            "sigma": sigma,
            "channels": self.channels,
            "response": self.response,
            "degradation": False,
        }


def _bench_size(ctx: _Context, scene: _Scene, with_f64: bool) -> None:
    """Every method on one scene (same pixels for every method)."""
    _bench_highs(ctx, scene)
    bp_res, bp_rate = _bench_bp_jax(ctx, scene, with_f64)
    if scene.n_fit:
        _bench_fit(ctx, scene, bp_res, bp_rate)
    del bp_res
    for name, net in ctx.nets.items():
        _bench_net(ctx, scene, name, net)
    if scene.n_demreg:
        _bench_demregpy(ctx, scene)


def _same_pixels(em: np.ndarray, chi2: np.ndarray, idx) -> dict[str, Any]:
    """:func:`_fit_stats` over the pixels ``idx`` every method of the scene ran on, with
    their count; EM (k, n_T), chi2 (k,)."""
    return {"pixels": len(chi2[idx]), **_fit_stats(em[idx], chi2[idx])}


def _record_invert(ctx: _Context, scene: _Scene, method, res, m, pixel_set, idx_same, **extra):
    """Record the row of a :class:`~deepem_jax.DEMResult`: fit over all its pixels, fit over
    the common pixels ``idx_same`` (indices into its flattened pixels), status counts."""
    em = res.em.reshape(-1, res.em.shape[-1])
    chi2 = res.chi2.reshape(em.shape[0])
    ctx.record(
        method,
        scene.size,
        em.shape[0],
        pixel_set,
        m,
        _fit_stats(em, chi2),
        _same_pixels(em, chi2, idx_same),
        scene=scene.name,
        status_counts=res.status_counts(),
        **extra,
    )


def _bench_highs(ctx: _Context, scene: _Scene) -> None:
    """BP with HiGHS on the HiGHS subset; the warm-up call is on its first pixels only."""
    from . import bp
    from .pipeline import invert

    ys, ss = scene.flat(scene.subset[: scene.n_highs])
    kw = ctx.invert_kwargs(ss)
    res, m = _measure(
        lambda: invert(ys, "bp", solver=bp.HiGHS(), **kw),
        scene.n_highs,
        repeats=ctx.repeats,
        warmup=lambda: invert(
            ys[:_HIGHS_WARMUP],
            "bp",
            solver=bp.HiGHS(),
            **ctx.invert_kwargs(ss[:_HIGHS_WARMUP]),
        ),
        warm_pixels=min(_HIGHS_WARMUP, scene.n_highs),
    )
    _record_invert(ctx, scene, "bp_highs", res, m, "random subset", slice(0, len(scene.common)))


def _bench_bp_jax(ctx: _Context, scene: _Scene, with_f64: bool) -> tuple[Any, float]:
    """BP with the JAX dual simplex on every pixel, float32 (and float64 if ``with_f64``);
    the float32 :class:`~deepem_jax.DEMResult` and its px/s."""
    from . import bp
    from .pipeline import invert

    kw = ctx.invert_kwargs(scene.sigma)
    out = None
    for prec in ("float32", "float64") if with_f64 else ("float32",):
        solver = bp.DualSimplex(precision=prec)
        res, m = _measure(
            lambda solver=solver: invert(scene.y, "bp", solver=solver, **kw),
            scene.n,
            repeats=ctx.repeats,
        )
        fresh = prec == "float32" and scene.name == SYNTHETIC
        extra = _bp_new_process_seconds(ctx, scene) if fresh else {}
        _record_invert(ctx, scene, f"bp_jax_f{prec[-2:]}", res, m, "all", scene.common, **extra)
        out = (res, m["pixels_per_s"]) if out is None else out
    return out


def _median(x: np.ndarray) -> float | None:
    return float(np.median(x)) if x.size else None


def _bench_fit(ctx: _Context, scene: _Scene, bp_res, bp_rate: float) -> None:
    """:func:`deepem_jax.fit.fit` (``Fitter()``, float32, as ``invert(method="fit")`` runs it)
    on the fit subset, started from BP's EM of the same pixels (``bp_res``, the ``bp_jax_f32``
    row; the flat DEM where BP has none). Besides the usual fit: optimiser steps, statuses,
    the median chi^2 of the fit and of BP over the pixels BP solved, and the px/s with BP's
    time per pixel (``bp_rate`` px/s) added."""
    from .fit import Fitter, fit
    from .status import DEMStatus

    idx = scene.subset[: scene.n_fit]
    y, s = (a.astype(np.float32) for a in scene.flat(idx))
    em0 = bp_res.em.reshape(scene.n, -1)[idx]
    bp_solved = bp_res.status.reshape(-1)[idx] == DEMStatus.SOLVED
    bp_chi2 = bp_res.chi2.reshape(-1)[idx]
    K = np.asarray(ctx.response.K, np.float32)
    res, m = _measure(
        lambda: jax.block_until_ready(fit(y, s, K, Fitter(), em0=em0)),
        len(idx),
        repeats=ctx.repeats,
    )
    em, chi2 = np.asarray(res.em, np.float64), np.asarray(res.chi2, np.float64)
    steps, status = np.asarray(res.steps), np.asarray(res.status)
    n_common = len(scene.common)
    ctx.record(
        "fit_bp_f32",
        scene.size,
        len(idx),
        "all" if len(idx) == scene.n else "random subset",
        m,
        _fit_stats(em, chi2),
        _same_pixels(em, chi2, slice(0, n_common)) if len(idx) >= n_common else None,
        scene=scene.name,
        status_counts=DEMStatus.counts(status),
        steps={
            "median": float(np.median(steps)),
            "p99": float(np.percentile(steps, 99)),
            "max": int(steps.max()),
        },
        bp_solved={
            "pixels": int(bp_solved.sum()),
            "fit_chi2_median": _median(chi2[bp_solved & DEMStatus.with_em(status)]),
            "bp_chi2_median": _median(bp_chi2[bp_solved]),
        },
        pixels_per_s_with_init=1.0 / (1.0 / m["pixels_per_s"] + 1.0 / bp_rate),
    )


_BP_PROCESS_SCRIPT = """
import sys, time
import astropy.units as u
import numpy as np
from deepem_jax import invert
from deepem_jax.response import DEEPEM_LOGT, default_response
d = np.load(sys.argv[1])
response = default_response().regrid(DEEPEM_LOGT)
t0 = time.perf_counter()
kw = dict(sigma=d["s"], channels=d["channels"] * u.AA, response=response, degradation=False)
invert(d["y"], "bp", **kw)
print(time.perf_counter() - t0)
"""


def _bp_new_process_seconds(ctx: _Context, scene: _Scene) -> dict[str, float]:
    """Seconds of the first ``invert(method="bp")`` call (float32) on the scene in a new
    process, twice with one new persistent compilation cache directory: with the cache empty
    (everything compiles and is written) and with it filled by the first process."""
    import subprocess
    import sys
    import tempfile

    from ._cache import ENV_VAR

    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "scene.npz")
        np.savez(inp, y=scene.y, s=scene.sigma, channels=ctx.channels.to_value(u.AA))
        env = {**os.environ, ENV_VAR: os.path.join(tmp, "jax_cache")}
        seconds = [
            float(
                subprocess.run(
                    [sys.executable, "-c", _BP_PROCESS_SCRIPT, inp],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()[-1]
            )
            for _ in range(2)
        ]
    return {
        "new_process_first_call_seconds": {"empty_cache": seconds[0], "filled_cache": seconds[1]}
    }


def _bench_net(ctx: _Context, scene: _Scene, name: str, net) -> None:
    """One network on every pixel through :func:`deepem_jax.invert`: alone on bfloat16 and on
    float32 operands, and with the consistency step in its default operand dtype."""
    from .pipeline import invert

    fpp = _net_flops_per_pixel(net.config)
    kw = ctx.invert_kwargs(scene.sigma)
    for method, predictor, consistent in (
        (f"net_{name}_bf16", dataclasses.replace(net, dtype="bfloat16"), False),
        (f"net_{name}_f32", dataclasses.replace(net, dtype="float32"), False),
        (f"net_{name}_consistent", net, "exact"),
    ):
        res, m = _measure(
            lambda p=predictor, c=consistent: invert(
                scene.y, "net", predictor=p, consistency=c, **kw
            ),
            scene.n,
            repeats=ctx.repeats,
        )
        if consistent:
            extra = {"bp_fallback_pixels": res.provenance["BPFALLBK"], "net_dtype": net.dtype}
        else:
            extra = _flops(m, fpp, ctx.peak_flops)
        _record_invert(ctx, scene, method, res, m, "all", scene.common, **extra)


def _bench_demregpy(ctx: _Context, scene: _Scene) -> None:
    y, s = scene.flat(scene.subset[: scene.n_demreg])
    try:
        em, seconds = _run_demregpy(y, s, ctx.response)
    except (RuntimeError, OSError, ValueError) as err:  # a peer failing is reported
        ctx.errors[f"demregpy {scene.size}"] = f"{type(err).__name__}: {err}"
        return
    chi2 = _chi2(em, ctx.response.K, y, s)
    m = {
        "seconds": seconds,
        "pixels_per_s": scene.n_demreg / seconds,
        "first_call_seconds": None,
        "first_call_pixels": None,
        "compile_seconds": None,
        "peak_rss_mb": None,
    }
    ctx.record(
        "demregpy",
        scene.size,
        scene.n_demreg,
        "random subset",
        m,
        _fit_stats(em, chi2),
        _same_pixels(em, chi2, slice(0, len(scene.common))),
        scene=scene.name,
        notes="one call, nothing to compile; memory of the subprocess not measured",
    )


def _flops(m: dict[str, float], flops_per_pixel: float, peak: float) -> dict[str, float]:
    """Network FLOP/s over the whole measured call and its fraction of the matmul peak."""
    gflops = m["pixels_per_s"] * flops_per_pixel / 1e9
    return {"gflops": gflops, "fraction_of_peak": gflops * 1e9 / peak}


def _bench_tiled(ctx: _Context, y: np.ndarray, sigma: np.ndarray, tiled_size: int) -> None:
    """The networks alone (``consistency=False``) on a 256^2 scene tiled to ``tiled_size``
    (rounded down to a multiple of 256, at least 256); BP is not run."""
    from .pipeline import _NET_TILE, invert

    reps = max(tiled_size // 256, 1)
    big_y = np.tile(y.astype(np.float32), (reps, reps, 1))
    big_s = np.tile(sigma.astype(np.float32), (reps, reps, 1))
    size = big_y.shape[0]
    ctx.say(f"tiled {size}x{size} (networks alone)")
    n = size * size
    rows = max(_NET_TILE // size, 1)  # the warm-up call: one network tile
    kw, kw_warm = ctx.invert_kwargs(big_s), ctx.invert_kwargs(big_s[:rows])
    for name, net in ctx.nets.items():
        res, m = _measure(
            lambda net=net: invert(big_y, "net", predictor=net, consistency=False, **kw),
            n,
            warmup=lambda net=net: invert(
                big_y[:rows], "net", predictor=net, consistency=False, **kw_warm
            ),
            warm_pixels=rows * size,
        )
        fit = _fit_stats(res.em.reshape(n, -1), res.chi2.reshape(n))
        del res
        extra = _flops(m, _net_flops_per_pixel(net.config), ctx.peak_flops)
        short = {"bfloat16": "bf16", "float32": "f32"}[net.dtype]
        ctx.record(f"net_{name}_{short}", size, n, "all (tiled)", m, fit, **extra)


def _demregpy_version() -> str | None:
    try:
        import demregpy  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("demregpy")
    except PackageNotFoundError:
        return "unknown version"


_DEMREG_SCRIPT = """
import contextlib, io, json, sys, time
import numpy as np
from demregpy import dn2dem
d = np.load(sys.argv[1])
n, nt = d["y"].shape[0], d["logt"].size
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    em = dn2dem(
        d["y"], d["s"], d["K"], d["logt"], 10.0 ** d["edges"],
        dem_norm0=np.ones((n, nt)), emd_ret=True,
    )[0]
seconds = time.perf_counter() - t0
np.save(sys.argv[2], np.reshape(em, (n, nt)))
print(json.dumps({"seconds": seconds}))
"""


def _run_demregpy(y: np.ndarray, sigma: np.ndarray, response) -> tuple[np.ndarray, float]:
    """demregpy's EM (k, n_T) in cm^-5 per bin of intensities and sigma (k, C), and the seconds
    of the ``dn2dem`` call, run in a subprocess.

    demregpy is given ``response`` (K at the bin centres) and bin edges half a step either side
    of its log T grid, so its EM per bin (``emd_ret=True``) resynthesises through the same K.
    ``dem_norm0`` is passed as ones: demregpy 0.6.2 never replaces its default ``None`` under
    NumPy 2 (``np.any(None) == None`` is False), and its weights become NaN.
    """
    import subprocess
    import sys
    import tempfile

    logt = np.asarray(response.logt_array, np.float64)
    step = np.diff(logt)
    edges = np.concatenate(
        [[logt[0] - step[0] / 2], logt[:-1] + step / 2, [logt[-1] + step[-1] / 2]]
    )
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.npz"), os.path.join(tmp, "em.npy")
        np.savez(inp, y=y, s=sigma, K=np.asarray(response.K, np.float64).T, logt=logt, edges=edges)
        try:
            proc = subprocess.run(
                [sys.executable, "-c", _DEMREG_SCRIPT, inp, out],
                capture_output=True,
                text=True,
                timeout=DEMREG_TIMEOUT,
            )
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"demregpy did not finish in {DEMREG_TIMEOUT} s") from None
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"demregpy failed: {last}")
        em = np.load(out)
    return em, float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


#: (numerator, denominator) throughput ratios reported when both rows exist for a size.
_RATIO_PAIRS = (
    ("bp_jax_f32", "bp_highs"),
    ("bp_jax_f64", "bp_highs"),
    ("bp_jax_f32", "demregpy"),
    ("net_deepem_bf16", "bp_jax_f32"),
    ("net_deepem_f32", "bp_jax_f32"),
    ("net_deepem_consistent", "bp_jax_f32"),
    ("net_small_consistent", "bp_jax_f32"),
    ("net_deepem_consistent", "bp_highs"),
    ("net_deepem_consistent", "demregpy"),
    ("net_deepem_bf16", "net_deepem_f32"),
    ("bp_jax_f32", "fit_bp_f32"),
    ("net_deepem5_bf16", "bp_jax_f32"),
    ("net_deepem5_f32", "bp_jax_f32"),
    ("net_deepem5_consistent", "bp_jax_f32"),
    ("net_deepem5_consistent", "bp_highs"),
    ("net_deepem5_bf16", "net_deepem5_f32"),
)


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Throughput ratios of rows of the same scene, each with the reference spelled out."""
    rows = {
        (r["scene"], r["size"], r["method"]): r for r in results if r["pixel_set"] != "all (tiled)"
    }
    out = []
    for scene, size in sorted({k[:2] for k in rows}):
        for num, den in _RATIO_PAIRS:
            a, b = rows.get((scene, size, num)), rows.get((scene, size, den))
            if a is None or b is None:
                continue
            out.append(
                {
                    "scene": scene,
                    "size": size,
                    "ratio": f"{num} / {den}",
                    "value": a["pixels_per_s"] / b["pixels_per_s"],
                    "reference": (
                        f"px/s of {num} on {_pixels(a)} / px/s of {den}: {_describe(den)}, on "
                        f"{_pixels(b)}; same {_scene_words(scene, size)}, same run"
                    ),
                }
            )
    return out


def _scene_words(scene: str, size: int) -> str:
    """The scene of a ratio's reference: the flare's pixel set comes from cutouts of ``size``."""
    if scene == FLARE:
        return f"{scene} pixel set ({size}² cutouts)"
    return f"{scene} {size}² scene"


def _where(row: dict[str, Any]) -> str:
    """A row's size, with the scene's name when it is not synthetic."""
    if row["scene"] == SYNTHETIC:
        return f"{row['size']}²"
    return f"{row['size']}² ({row['scene']})"


def _pixels(row: dict[str, Any]) -> str:
    if row["pixel_set"] == "all":
        return f"all {row['pixels']:,} pixels"
    return f"{row['pixels']:,} random pixels of it"


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None or not np.isfinite(x) else format(x, spec)


def _same_cell(same: dict[str, Any] | None) -> str:
    if same is None:
        return ""
    return f"{_fmt(same['chi2_median'], '.3g')} ({same['pixels']:,} px)"


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown of a :func:`run_suite` report: throughput and fit per row, ratios with their
    references, what each method ran."""
    meta = report["meta"]
    lines = [
        f"Device: {meta['device']} ({meta['platform']}), {meta['cpu_count']} cores, "
        f"jax {meta['jax_version']}, measured f32 matmul peak {meta['matmul_peak_gflops']:.1f} "
        f"GFLOP/s; demregpy: {meta['demregpy']}",
        "",
        f"px/s: median of {meta.get('repeats', 1)} calls after the first (the tiled run: one). "
        "compile: first call minus the median call's time for its pixels. "
        "χ²: mean over channels of ((K·EM − y)/σ)², median over pixels with an EM; "
        "'same px': over the pixels every method of that size ran on. neg: fraction of pixels "
        "with an EM that have a negative bin. GFLOP/s: network FLOPs over the whole call.",
        "",
        "| method | size | pixels | px/s | compile (s) | peak RSS (MB) | χ² median | "
        "χ² median, same px | EM frac | neg frac | GFLOP/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['method']} | {_where(r)} | {r['pixels']:,} | {r['pixels_per_s']:,.0f} | "
            f"{_fmt(r['compile_seconds'], '.2f')} | {_fmt(r['peak_rss_mb'], '.0f')} | "
            f"{_fmt(r['chi2_median'], '.3g')} | {_same_cell(r['same_pixels'])} | "
            f"{r['em_fraction']:.3f} | "
            f"{_fmt(r['negative_em_fraction'], '.3f')} | {_fmt(r.get('gflops'), '.1f')} |"
        )
    fits = [r for r in report["results"] if r["method"] == "fit_bp_f32"]
    if fits:
        lines += [
            "",
            "Fit from BP (`fit_bp_f32`): px/s of the fit alone and with BP's time per pixel "
            "added; optimiser steps; χ² medians of the fit and of BP over the pixels BP solved.",
            "",
            "| size | pixels | px/s | px/s with BP | steps median / p99 / max | statuses | "
            "χ² median fit | χ² median BP (BP-solved px) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in fits:
            st, b = r["steps"], r["bp_solved"]
            counts = ", ".join(f"{k} {v:,}" for k, v in r["status_counts"].items())
            lines.append(
                f"| {r['size']}² | {r['pixels']:,} | {r['pixels_per_s']:,.0f} | "
                f"{r['pixels_per_s_with_init']:,.0f} | {st['median']:.0f} / {st['p99']:.0f} / "
                f"{st['max']} | {counts} | {_fmt(b['fit_chi2_median'], '.3g')} | "
                f"{_fmt(b['bp_chi2_median'], '.3g')} ({b['pixels']:,} px) |"
            )
    nets = [r for r in report["results"] if "status_counts" in r and r["method"].startswith("net_")]
    if nets:
        lines += [
            "",
            "Network rows through `invert`: statuses (SOLVED: inside BP's band) and, with the "
            "consistency step, the operand dtype and the pixels BP solved in the step.",
            "",
            "| method | size | statuses | operands | solved by BP |",
            "|---|---|---|---|---|",
        ]
        for r in nets:
            counts = ", ".join(f"{k} {v:,}" for k, v in r["status_counts"].items())
            bp_px = r.get("bp_fallback_pixels")
            lines.append(
                f"| {r['method']} | {_where(r)} | {counts} | {r.get('net_dtype', '')} | "
                f"{'' if bp_px is None else format(bp_px, ',')} |"
            )
    if report.get("full_disk"):
        lines += [
            "",
            "Full-disk BP (`invert(method='bp')` on the real 2024-10-04 synoptic image tiled, "
            "one call in a fresh process after a warm-up call that compiles; "
            "`deepem_jax.bench_disk.full_disk_bp`):",
            "",
            "| size | input dtype | pixels | wall (s) | px/s | CPU (s) | peak RSS (GiB) | "
            "warm-up (s) | load avg before / after |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in report["full_disk"]:
            lines.append(
                f"| {d['size']}² | {d['input_dtype']} | {d['pixels']:,} | {d['seconds']:.0f} | "
                f"{d['pixels_per_s']:,.0f} | {d['cpu_seconds']:.0f} | {d['peak_rss_gib']:.2f} | "
                f"{_fmt(d['warmup_seconds'], '.0f')} | {d['loadavg'][0]:.1f} / "
                f"{d['loadavg'][1]:.1f} |"
            )
    if report["ratios"]:
        lines += ["", "| size | ratio | value | reference |", "|---|---|---|---|"]
        for q in report["ratios"]:
            lines.append(f"| {_where(q)} | {q['ratio']} | {q['value']:,.1f} | {q['reference']} |")
    lines += ["", "Methods:"]
    lines += [f"- `{m}`: {d}" for m, d in report["methods"].items()]
    for key, msg in meta.get("errors", {}).items():
        lines += ["", f"{key} failed: {msg}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: str) -> tuple[str, str]:
    """Write ``bench.json`` and ``bench.md`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")
    with atomic_write(jpath) as fh:
        fh.write(json.dumps(report, indent=2).encode())
    with atomic_write(mpath) as fh:
        fh.write(to_markdown(report).encode())
    return jpath, mpath
