"""The full-disk BP benchmark on a small centre crop of the real synoptic set: it runs in a
child process and reports its time, peak memory and statuses."""

from __future__ import annotations

import math

from conftest import shared_path

from deepem_jax.bench_disk import full_disk_bp


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
