"""The full-disk BP benchmark on a small centre crop of the real synoptic set: it runs in a
child process and reports its time, peak memory and statuses; the suite shows it and records
a missing data set as an error."""

from __future__ import annotations

import math

from conftest import shared_path

from deepem_jax import bench
from deepem_jax.bench_disk import full_disk_bp

META = {
    "device": "cpu:0",
    "platform": "cpu",
    "cpu_count": 2,
    "jax_version": "x",
    "matmul_peak_gflops": 1.0,
    "demregpy": "not run",
}


def test_full_disk_bp_on_a_crop():
    folder = shared_path("aia", "synoptic_2024-10-04")
    shared_path("aia", "synoptic_2024-10-04", "AIAsynoptic0335.fits")
    out = full_disk_bp(256, folder, warmup=False, timeout=600)
    assert out["pixels"] == 256 * 256 and out["size"] == 256
    assert sum(out["status_counts"].values()) == out["pixels"]
    assert out["status_counts"].get("SOLVED", 0) > 0
    assert out["warmup_seconds"] is None
    assert 0 < out["seconds"] < out["process_seconds"]
    assert math.isclose(out["pixels_per_s"], out["pixels"] / out["seconds"])
    # the child's own peak: the interpreter, JAX and the inversion, not this test process
    assert out["input_gib"] < out["rss_before_gib"] <= out["peak_rss_gib"] < 4
    assert out["input_dtype"] == "float64" and len(out["loadavg"]) == 2
    report = {"meta": META, "results": [], "ratios": [], "methods": {}, "full_disk": [out]}
    row = f"| 256² | float64 | 65,536 | {out['seconds']:.0f} | {out['pixels_per_s']:,.0f} |"
    assert row in bench.to_markdown(report)


def test_suite_records_a_missing_synoptic_set_as_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPEM_JAX_DATA", str(tmp_path))
    ctx = bench._Context(None, None, {}, 1.0, [], {}, lambda s: None)
    assert bench._bench_full_disk(ctx, 64) == []
    ((key, msg),) = ctx.errors.items()
    assert key == "full_disk_bp 64 as loaded" and msg
