"""Throughput of ``deepem_jax.invert_series`` on an embedded Dask LocalCluster at 1 and 2
worker processes, measured in one run.

The series: the real six-channel AIA cutouts shipped with deepem_jax (67x67 pixels, 2011-02-15
01:44 and 01:46 UTC) copied into ``--observations`` directories (alternating times; every copy
is its own input, so its own output). For each worker count a fresh cluster is started and
each worker is warmed up on one observation (JAX compilation, weights); then the whole series
is timed: observations/s, pixels/s, the mean wall time of one task inside its worker, the wall
time of start-up plus warm-up, and each worker's peak resident memory (``ru_maxrss``). The
ratio of the largest worker count's throughput to one worker's is printed last.

    python benchmarks/bench_series.py --observations 16 --method net --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    """Peak resident memory of the calling process (MB; Linux reports ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_series(root: Path, n: int) -> list[Path]:
    """``n`` observation directories holding copies of the shipped 01:44 and 01:46 cutouts."""
    from deepem_jax.data import sample_observation

    dirs = []
    for i in range(n):
        d = root / f"obs_{i:03d}"
        d.mkdir(parents=True)
        for f in sample_observation("01:44" if i % 2 == 0 else "01:46"):
            shutil.copyfile(f, d / f.name)
        dirs.append(d)
    return dirs


def measure(n_workers: int, dirs: list[Path], method: str, out: Path) -> dict:
    """Series throughput on a fresh LocalCluster of ``n_workers`` single-threaded processes."""
    from distributed import Client, LocalCluster

    from deepem_jax import load_aia
    from deepem_jax.series import invert_series

    t0 = time.perf_counter()
    with (
        LocalCluster(
            n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        warm = invert_series(dirs[:n_workers], method, out_dir=out / "warm", client=client)
        t_warm = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = invert_series(dirs, method, out_dir=out / f"workers_{n_workers}", client=client)
        seconds = time.perf_counter() - t1
        peaks = sorted(client.run(_peak_rss_mb).values())
    if res.counts()["ok"] != len(dirs) or warm.counts()["failed"]:
        raise RuntimeError(f"series did not complete: {[o.reason for o in res.failed]}")
    pixels = load_aia(dirs[0]).data[..., 0].size
    return {
        "workers": n_workers,
        "observations": len(dirs),
        "seconds": seconds,
        "observations_per_s": len(dirs) / seconds,
        "pixels_per_s": len(dirs) * pixels / seconds,
        "task_s_mean": sum(o.seconds for o in res.outcomes) / len(dirs),
        "startup_and_warmup_s": t_warm,
        "peak_rss_mb_per_worker": peaks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--observations", type=int, default=16)
    parser.add_argument("--method", choices=["net", "bp"], default="net")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--out", default="bench_series.json", help="JSON report")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="deepem_series_") as tmp:
        dirs = make_series(Path(tmp) / "in", args.observations)
        rows = [measure(n, dirs, args.method, Path(tmp) / "out") for n in counts]
    report = {
        "method": args.method,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "rows": rows,
        "ratio": rows[-1]["observations_per_s"] / rows[0]["observations_per_s"],
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"method {args.method}, {args.observations} observations of 67x67 px, {report['machine']}"
    )
    print(
        "| workers | obs/s | px/s | series s | mean task s | start-up + warm-up s "
        "| peak RSS per worker (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        peaks = ", ".join(f"{p:.0f}" for p in r["peak_rss_mb_per_worker"])
        print(
            f"| {r['workers']} | {r['observations_per_s']:.2f} | {r['pixels_per_s']:,.0f} "
            f"| {r['seconds']:.1f} | {r['task_s_mean']:.2f} | {r['startup_and_warmup_s']:.1f} "
            f"| {peaks} |"
        )
    print(f"{counts[-1]}-worker / {counts[0]}-worker throughput ratio: {report['ratio']:.2f}")


if __name__ == "__main__":
    main()
