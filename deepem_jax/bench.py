"""The speedup benchmark suite: network inference vs Basis Pursuit, on the same pixels and the
same device, in one run.

Measured per image size (synthetic six-channel scenes from :func:`deepem_jax.forward.
synthetic_scene` with AIA noise, so every method sees identical pixels):

* ``bp_highs``   -- the per-pixel ``scipy.optimize.linprog(method="highs")`` reference BP (on a
  random subset of pixels, reported per pixel);
* ``bp_jax_f32`` / ``bp_jax_f64`` -- deepem_jax's batched exact BP;
* ``net_<config>_f32`` / ``_bf16`` -- network inference (``deepem``: the original width;
  ``small``: 6->64->64->18);
* ``demregpy`` -- Hannah & Kontar (2012) regularised inversion, an independent peer, when
  installed (on a subset).

Throughput is pixels per second of wall time of a second call on the same pixels (the first
call compiles every shape it needs; its time is reported as ``first_call_seconds``); peak
memory is the largest resident-set increase over the process baseline, sampled every 2 ms
during the measured call. The network's achieved FLOP/s is compared against a
measured float32 matmul peak on the same device.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._atomic import atomic_write

__all__ = ["matmul_peak_flops", "run_suite", "to_markdown"]


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


def _measure(fn: Callable[[], Any], n_pixels: int, warm: bool = True) -> dict[str, float]:
    """Time ``fn``: a first call (compiles every shape it needs; its time is reported as
    ``first_call_seconds``), then the measured call, with the peak RSS increase sampled."""
    first = float("nan")
    if warm:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
    with _PeakRSS() as mem:
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
    return {
        "seconds": dt,
        "pixels": n_pixels,
        "pixels_per_s": n_pixels / dt,
        "peak_rss_mb": mem.peak_mb,
        "first_call_seconds": first,
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
    widths = (config.n_channels, *config.hidden, config.n_temperatures)
    return float(sum(2 * a * b for a, b in itertools.pairwise(widths)))


def run_suite(
    sizes: Sequence[int] = (64, 256, 1024),
    tiled_size: int | None = 4096,
    highs_pixels: int = 300,
    demreg_pixels: int = 1024,
    f64_max_size: int = 1024,
    seed: int = 0,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Run the suite and return a JSON-ready dict (``meta``, ``results`` list, ``ratios``)."""
    from .basis import cheung_basis
    from .forward import synthetic_scene
    from .model import Predictor
    from .response import DEEPEM_LOGT, default_response
    from .uncertainty import sigma_values

    say = log or (lambda s: None)
    response = default_response().regrid(DEEPEM_LOGT)
    basis = cheung_basis(DEEPEM_LOGT)
    exptime = 2.0
    rng = np.random.default_rng(seed)
    nets = {name: Predictor.init(jax.random.PRNGKey(seed), name) for name in ("deepem", "small")}
    peak = matmul_peak_flops()
    meta = {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.default_backend(),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "matmul_peak_gflops": peak / 1e9,
        "response": response.name,
        "n_basis": basis.n_basis,
    }
    say(
        f"device {meta['device']} ({meta['platform']}), jax {meta['jax_version']}, "
        f"{meta['cpu_count']} cores, matmul peak {peak / 1e9:.1f} GFLOP/s"
    )

    def sigma_of(y):
        return sigma_values(y, exptime, response.wavelength)

    results: list[dict[str, Any]] = []
    errors: dict[str, str] = {}

    def record(method: str, size: int, m: dict[str, float], **extra) -> None:
        row = {"method": method, "size": size, **m, **extra}
        results.append(row)
        say(
            f"  {method:<18s} {size:>5d}^2  {m['pixels_per_s']:>12,.0f} px/s  "
            f"peak +{m['peak_rss_mb']:.0f} MB" + (f"  {extra}" if extra else "")
        )

    for size in sizes:
        say(f"size {size}x{size}")
        _, y = synthetic_scene(response, (size, size), rng, exptime)
        _bench_size(
            size,
            y,
            sigma_of(y),
            response,
            basis,
            nets,
            rng,
            record,
            highs_pixels,
            demreg_pixels,
            size <= f64_max_size,
            peak,
            errors,
        )

    if tiled_size:
        say(f"tiled {tiled_size}x{tiled_size} (network only; BP extrapolates from its rate)")
        _, y = synthetic_scene(response, (256, 256), rng, exptime)
        reps = max(tiled_size // 256, 1)
        big = np.tile(y, (reps, reps, 1))
        tiled_size = big.shape[0]  # record the size actually run (a multiple of 256)
        for name, net in nets.items():
            net.predict(big[:256])  # 65536 pixels: compiles the tile shape the big run uses
            m = _measure(lambda net=net: net.predict(big), big.shape[0] * big.shape[1], warm=False)
            record(
                f"net_{name}_f32",
                tiled_size,
                m,
                gflops=m["pixels_per_s"] * _net_flops_per_pixel(net.config) / 1e9,
            )
        del big

    for key, msg in errors.items():
        say(f"  {key} failed: {msg}")
    meta["errors"] = errors
    return {"meta": meta, "results": results, "ratios": _ratios(results)}


def _bench_size(
    size,
    y,
    sigma,
    response,
    basis,
    nets,
    rng,
    record,
    highs_pixels,
    demreg_pixels,
    with_f64,
    peak,
    errors,
) -> None:
    """All methods on one ``size`` x ``size`` scene ``y`` (same pixels for every method)."""
    from . import bp

    n = size * size
    flat_y, flat_s = y.reshape(-1, 6), sigma.reshape(-1, 6)
    sub = rng.choice(n, size=min(highs_pixels, n), replace=False)
    record(
        "bp_highs",
        size,
        _measure(
            lambda: bp.solve(flat_y[sub], flat_s[sub], response, basis, method="highs"),
            len(sub),
            warm=False,
        ),
    )
    out: dict[str, Any] = {}

    def run32():
        out["r"] = bp.solve(y, sigma, response, basis, precision="float32")

    m = _measure(run32, n)
    record("bp_jax_f32", size, m, solved_fraction=float((np.asarray(out["r"].status) == 0).mean()))
    if with_f64:
        record(
            "bp_jax_f64",
            size,
            _measure(lambda: bp.solve(y, sigma, response, basis, precision="float64"), n),
        )
    for name, net in nets.items():
        fpp = _net_flops_per_pixel(net.config)
        for dt_name, dt in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
            m = _measure(lambda net=net, dt=dt: net.predict(y, dtype=dt), n)
            gflops = m["pixels_per_s"] * fpp / 1e9
            record(
                f"net_{name}_{dt_name}",
                size,
                m,
                gflops=gflops,
                fraction_of_peak=gflops * 1e9 / peak,
            )
        record(
            f"net_{name}_consistent_f32",
            size,
            _measure(lambda net=net: net.predict(y, sigma=sigma, response=response), n),
        )
    if demreg_pixels and _has_demregpy():
        k = min(demreg_pixels, n)
        try:
            m = _run_demregpy(flat_y[:k], flat_s[:k], response)
        except (RuntimeError, OSError, ValueError) as err:  # a peer failing is reported
            errors[f"demregpy {size}"] = f"{type(err).__name__}: {err}"
        else:
            record("demregpy", size, m)


def _has_demregpy() -> bool:
    try:
        import demregpy  # noqa: F401
    except ImportError:
        return False
    return True


_DEMREG_SCRIPT = """
import contextlib, io, json, sys, time
import numpy as np
from demregpy import dn2dem
d = np.load(sys.argv[1])
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    dn2dem(d["y"], d["s"], d["K"], d["logt"], d["edges"])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _run_demregpy(y: np.ndarray, sigma: np.ndarray, response) -> dict[str, float]:
    """demregpy's regularised inversion (on the full-resolution default response, 18 DEM bins
    with edges log T 5.45..7.25) in a separate process: it forks worker processes, which is
    unsafe inside a process running JAX. Returns the measurement of the call alone."""
    import json
    import subprocess
    import sys
    import tempfile

    from .response import default_response

    full = default_response().select(response.wavelength)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.npz")
        np.savez(
            path,
            y=np.maximum(y, 0.0),
            s=sigma,
            K=np.asarray(full.K).T,
            logt=full.logt_array,
            edges=10 ** np.arange(5.45, 7.2501, 0.1),
        )
        proc = subprocess.run(
            [sys.executable, "-c", _DEMREG_SCRIPT, path],
            capture_output=True,
            text=True,
            timeout=600,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"demregpy failed: {last}")
    dt = json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]
    n = y.shape[0]
    return {"seconds": dt, "pixels": n, "pixels_per_s": n / dt, "peak_rss_mb": float("nan")}


def _ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rate = {(r["method"], r["size"]): r["pixels_per_s"] for r in results}
    out = []
    for size in sorted({r["size"] for r in results}):

        def g(m, size=size):
            return rate.get((m, size))

        row: dict[str, Any] = {"size": size}
        for num, den in (
            ("net_deepem_f32", "bp_jax_f32"),
            ("net_small_f32", "bp_jax_f32"),
            ("net_deepem_f32", "bp_highs"),
            ("net_small_f32", "bp_highs"),
            ("net_deepem_consistent_f32", "bp_jax_f32"),
            ("net_small_consistent_f32", "bp_jax_f32"),
            ("bp_jax_f32", "bp_highs"),
            ("bp_jax_f64", "bp_highs"),
        ):
            if g(num) and g(den):
                row[f"{num}/{den}"] = g(num) / g(den)
        if len(row) > 1:
            out.append(row)
    return out


def to_markdown(report: dict[str, Any]) -> str:
    """Markdown tables (throughput and ratios) of a :func:`run_suite` report."""
    meta = report["meta"]
    lines = [
        f"Device: {meta['device']} ({meta['platform']}), {meta['cpu_count']} cores, "
        f"jax {meta['jax_version']}, measured f32 matmul peak {meta['matmul_peak_gflops']:.1f} "
        f"GFLOP/s",
        "",
        "| method | size | pixels/s | peak RSS (MB) | GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        gf = f"{r['gflops']:.1f}" if "gflops" in r else ""
        lines.append(
            f"| {r['method']} | {r['size']}² | {r['pixels_per_s']:,.0f} | "
            f"{r['peak_rss_mb']:.0f} | {gf} |"
        )
    if report["ratios"]:
        keys = sorted({k for row in report["ratios"] for k in row if k != "size"})
        lines += ["", "| size | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for row in report["ratios"]:
            vals = [f"{row[k]:,.1f}" if k in row else "" for k in keys]
            lines.append(f"| {row['size']}² | " + " | ".join(vals) + " |")
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
