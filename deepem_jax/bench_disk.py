"""Full-disk Basis Pursuit benchmark: wall time and peak memory of :func:`deepem_jax.invert`
with ``method="bp"`` on a real AIA image tiled to ``size x size`` pixels.

The real 1024^2 synoptic set (``$DEEPEM_JAX_DATA/aia/synoptic_2024-10-04``, five channels:
its 94 Å file is corrupt) is loaded with :func:`deepem_jax.io.load_aia`; its intensities and
AIA errors (float64 as loaded, or ``dtype``) are tiled (``np.tile``) and cropped to
``size x size``, from the centre when ``size`` is smaller than the image, and inverted in one
call. The run happens in a
fresh Python process, so its peak resident memory (``ru_maxrss``) is that of the inversion
(with its inputs, the interpreter and JAX) and nothing else.

Issue 13 sets the target: 4096^2 in at most 3 minutes and 4 GiB peak on the 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["full_disk_bp"]

#: Channels of the synoptic set that load (its 94 Å file is corrupt), Å.
CHANNELS = (131, 171, 193, 211, 335)
#: Side of the warm-up crop (compiles the 16384-pixel chunks and the smaller retry shapes).
WARMUP_SIZE = 128
_MARK = "DEEPEM_BENCH_DISK "


def _default_data_dir() -> Path:
    from .data import data_dir

    return data_dir() / "aia" / "synoptic_2024-10-04"


def full_disk_bp(
    size: int = 4096,
    data_dir: str | os.PathLike | None = None,
    *,
    channels: tuple[int, ...] = CHANNELS,
    warmup: bool = True,
    dtype: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """BP of a ``size x size`` tiling of the real synoptic image in a fresh process.

    Parameters
    ----------
    size
        Side of the image in pixels (4096: the 1024^2 set tiled 4 x 4).
    data_dir
        Directory of the AIA synoptic FITS files (default:
        ``deepem_jax.data.data_dir() / "aia" / "synoptic_2024-10-04"``).
    channels
        Channels to load and invert (Å).
    warmup
        First invert a ``WARMUP_SIZE``^2 crop in the same process (compiles the solver's
        shapes), so ``seconds`` is the steady-state time of the full call.
    dtype
        dtype of the two input arrays (None: as loaded, float64; ``"float32"`` halves them).
    timeout
        Seconds before the child is killed (``subprocess.TimeoutExpired``).

    Returns
    -------
    dict
        ``pixels``, ``size``, ``seconds`` (wall time of the full ``invert`` call),
        ``pixels_per_s``, ``cpu_seconds`` (user + system CPU time of the full call: less
        sensitive than the wall time to other jobs on the machine), ``solve_seconds``
        (``DEMResult.timings["solve"]``),
        ``warmup_seconds`` (the warm-up call, compilation included; None without),
        ``load_seconds`` (loading and tiling), ``process_seconds`` (the child's whole life,
        imports included), ``peak_rss_gib`` (the child's ``ru_maxrss``), ``input_gib`` (the
        two input arrays), ``rss_before_gib`` (resident memory just before the full call),
        ``status_counts``, ``input_dtype``, ``cpu_count``, ``loadavg`` (1-minute load average
        before and after: other jobs on the machine inflate the wall time) and ``python``.

    Raises
    ------
    RuntimeError if the child fails (its stderr tail in the message).
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    folder = Path(data_dir) if data_dir is not None else _default_data_dir()
    args = {
        "size": size,
        "data_dir": str(folder),
        "channels": list(channels),
        "warmup": warmup,
        "dtype": dtype,
    }
    code = (
        "import json, sys; from deepem_jax.bench_disk import _child; "
        "_child(**json.loads(sys.argv[1]))"
    )
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-20:])
        raise RuntimeError(f"full-disk BP child failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(lines[-1][len(_MARK) :])
    out["process_seconds"] = elapsed
    out["loadavg"] = [load0, os.getloadavg()[0]]
    return out


def _rss_gib() -> float:
    """Current resident memory of this process, GiB (Linux; NaN elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def _cpu_seconds() -> float:
    """User plus system CPU time of this process so far, s."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _tiled(a, size: int):
    """``a`` (ny, nx, C) tiled and cropped to (size, size, C), centred when smaller; a fresh
    C-contiguous array."""
    import numpy as np

    ny, nx = a.shape[:2]
    reps = (-(-size // ny), -(-size // nx), 1)
    if reps[:2] == (1, 1):
        y0, x0 = (ny - size) // 2, (nx - size) // 2
        return np.ascontiguousarray(a[y0 : y0 + size, x0 : x0 + size])
    return np.ascontiguousarray(np.tile(a, reps)[:size, :size])


def _child(size: int, data_dir: str, channels: list[int], warmup: bool, dtype: str | None) -> None:
    """The measured process: load, tile, (warm up,) invert, print one JSON line."""
    import astropy.units as u
    import numpy as np

    from . import invert
    from .io import load_aia

    t0 = time.perf_counter()
    stack = load_aia(data_dir, np.array(channels) * u.AA)
    y, s = _tiled(stack.data, size), _tiled(stack.sigma(), size)
    if dtype is not None:
        y, s = y.astype(dtype), s.astype(dtype)
    chans, obstime = np.array(channels) * u.AA, stack.obstime
    del stack
    load_seconds = time.perf_counter() - t0
    warm = None
    if warmup:
        n = min(WARMUP_SIZE, size)
        t0 = time.perf_counter()
        invert(y[:n, :n], "bp", sigma=s[:n, :n], channels=chans, obstime=obstime)
        warm = time.perf_counter() - t0
    rss_before = _rss_gib()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    res = invert(y, "bp", sigma=s, channels=chans, obstime=obstime)
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # kB on Linux
    out = {
        "size": size,
        "pixels": int(y.shape[0] * y.shape[1]),
        "seconds": seconds,
        "pixels_per_s": y.shape[0] * y.shape[1] / seconds,
        "cpu_seconds": cpu,
        "solve_seconds": res.timings.get("solve"),
        "warmup_seconds": warm,
        "load_seconds": load_seconds,
        "peak_rss_gib": peak,
        "rss_before_gib": rss_before,
        "input_gib": (y.nbytes + s.nbytes) / 2**30,
        "input_dtype": str(y.dtype),
        "status_counts": res.status_counts(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    print(_MARK + json.dumps(out), flush=True)
