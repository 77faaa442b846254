"""The deepem-jax command through click's test runner: every subcommand, --help, bad paths,
missing channels, existing outputs and a corrupt input file."""

import functools
import json
import os
import re
from pathlib import Path

import click
import numpy as np
import pytest
from _synth import write_aia_set
from click.testing import CliRunner
from conftest import shared_path

from deepem_jax.cli import EXIT_EXISTS, EXIT_INPUT, main
from deepem_jax.io import read_dem_cube
from deepem_jax.predictor import native_dtype


@pytest.fixture
def runner():
    return CliRunner()


@pytest.fixture(scope="module")
def aia_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("aia6")
    write_aia_set(d)
    return d


@pytest.mark.parametrize("cmd", [[], ["invert"], ["train"], ["bench"], ["demo"]])
def test_help(runner, cmd):
    r = runner.invoke(main, [*cmd, "--help"])
    assert r.exit_code == 0, r.output
    assert "Usage:" in r.output
    if cmd in (["invert"], ["train"], ["bench"]):
        assert "Example" in r.output


def test_invert_bp_writes_cube_and_refuses_overwrite(runner, aia_dir, tmp_path):
    out = tmp_path / "out"
    r = runner.invoke(main, ["invert", str(aia_dir), "--method", "bp", "--out", str(out), "--png"])
    assert r.exit_code == 0, r.output
    fits_files = sorted(out.glob("dem_bp_*.fits"))
    assert len(fits_files) == 1 and fits_files[0].with_suffix(".png").exists()
    cube = read_dem_cube(fits_files[0])
    assert cube.em.shape[-1] == 18
    status = cube.extras["status"]
    assert status.shape == cube.em.shape[:2] and (status == 0).mean() > 0.9
    assert np.all(np.isfinite(cube.extras["chi2"][status == 0]))
    before = fits_files[0].stat().st_mtime_ns
    r = runner.invoke(main, ["invert", str(aia_dir), "--method", "bp", "--out", str(out)])
    assert r.exit_code == EXIT_EXISTS
    assert "--overwrite" in r.output
    assert fits_files[0].stat().st_mtime_ns == before
    r = runner.invoke(
        main, ["invert", str(aia_dir), "--method", "bp", "--out", str(out), "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_invert_net(runner, aia_dir, tmp_path):
    r = runner.invoke(main, ["invert", str(aia_dir), "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.glob("dem_net_*.fits")
    cube = read_dem_cube(path)
    assert np.all(np.isfinite(cube.em.value))  # pixels outside the band keep their EM
    status = cube.extras["status"]
    assert set(np.unique(status)) <= {0, 5}  # in BP's band, or flagged OUTSIDE_BAND
    # the default band is |K EM - y| <= 1.4 sigma (no negative pixels in these images): the
    # reduced chi^2 of consistent pixels cannot exceed 1.4^2
    assert np.nanmax(cube.extras["chi2"][status == 0]) <= 1.4**2 * (1 + 1e-4)
    assert cube.header["NETDTYPE"] == native_dtype()


def test_invert_net_float32(runner, aia_dir, tmp_path):
    for dtype in ("float32", "bfloat16"):
        args = ["invert", str(aia_dir), "--out", str(tmp_path / dtype), "--net-dtype", dtype]
        r = runner.invoke(main, args)
        assert r.exit_code == 0, r.output
        (path,) = (tmp_path / dtype).glob("dem_net_*.fits")
        assert read_dem_cube(path).header["NETDTYPE"] == dtype
    r = runner.invoke(main, [*args[:-1], "float16"])
    assert r.exit_code == 2 and "float16" in r.output


def test_invert_bad_path(runner, tmp_path):
    r = runner.invoke(main, ["invert", str(tmp_path / "nope.fits"), "--out", str(tmp_path)])
    assert r.exit_code == EXIT_INPUT
    assert "nope.fits" in r.output


def test_invert_missing_channel(runner, tmp_path):
    d = tmp_path / "five"
    d.mkdir()
    write_aia_set(d, channels=(131, 171, 193, 211, 335))
    out = tmp_path / "out"
    r = runner.invoke(main, ["invert", str(d), "--method", "bp", "--out", str(out)])
    assert r.exit_code == EXIT_INPUT
    assert "94" in r.output and "np.int64" not in r.output
    assert not list(out.glob("*.fits"))
    # the same five channels are fine for BP when asked for explicitly
    r = runner.invoke(
        main,
        [
            "invert",
            str(d),
            "--method",
            "bp",
            "--channels",
            "131,171,193,211,335",
            "--out",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output


def test_invert_corrupt_real_file(runner, tmp_path):
    d = shared_path("aia", "synoptic_2024-10-04")
    out = tmp_path / "out"
    r = runner.invoke(main, ["invert", str(d), "--method", "bp", "--out", str(out)])
    assert r.exit_code == EXIT_INPUT
    assert "AIAsynoptic0094_CORRUPT.fits" in r.output and "corrupt" in r.output
    assert not out.exists() or not any(out.iterdir())


def test_invert_truncated_file(runner, aia_dir, tmp_path):
    files = sorted(Path(aia_dir).glob("*.fits"))
    bad = tmp_path / "in"
    bad.mkdir()
    for f in files:
        (bad / f.name).write_bytes(f.read_bytes())
    victim = bad / files[0].name
    victim.write_bytes(victim.read_bytes()[: 2880 * 3 + 100])
    r = runner.invoke(main, ["invert", str(bad), "--out", str(tmp_path / "out")])
    assert r.exit_code == EXIT_INPUT
    assert victim.name in r.output


def test_invert_bad_options(runner, aia_dir, tmp_path):
    r = runner.invoke(main, ["invert", str(aia_dir), "--out", str(tmp_path), "--channels", "x"])
    assert r.exit_code == 2
    r = runner.invoke(main, ["invert", str(aia_dir), "--out", str(tmp_path), "--method", "nn"])
    assert r.exit_code == 2
    # channels without a response, or that no shipped network takes, are usage errors too
    base = ["invert", str(aia_dir), "--out", str(tmp_path), "--channels"]
    r = runner.invoke(main, [*base, "171,193,1600"])
    assert r.exit_code == 2 and "no temperature response for [1600]" in r.output
    r = runner.invoke(main, [*base, "171,193,211", "--method", "net"])
    assert r.exit_code == 2 and "no shipped network takes channels" in r.output
    assert not list(tmp_path.glob("*.fits"))


def test_train_and_resume(runner, tmp_path):
    args = [
        "train",
        "--out",
        str(tmp_path),
        "--synthetic",
        "1",
        "--synthetic-size",
        "48",
        "--epochs",
        "2",
        "--batch-size",
        "512",
    ]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "epoch    2/2" in r.output
    assert list(tmp_path.glob("checkpoint_*.msgpack"))
    r = runner.invoke(main, [*args[:-4], "--epochs", "3", "--batch-size", "512"])
    assert r.exit_code == 0, r.output
    assert "resuming after epoch 2" in r.output and "epoch    3/3" in r.output


def test_bench_command(runner, tmp_path, monkeypatch, bench_report):
    """The command passes its options to run_suite (recorded by a stand-in returning the shared
    report; the suite itself is tested in test_bench) and writes and prints the report."""
    import deepem_jax.bench

    calls = []

    def run_suite(*args, **kwargs):
        calls.append((args, kwargs))
        return bench_report

    monkeypatch.setattr(deepem_jax.bench, "run_suite", run_suite)
    args = ["bench", "--sizes", "16", "--tiled", "0", "--highs-pixels", "5", "--fit-pixels", "8"]
    r = runner.invoke(main, [*args, "--repeats", "1", "--real", "64", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    ((args_, kwargs),) = calls
    assert args_ == ([16], None)
    assert kwargs == dict(
        highs_pixels=5, fit_pixels=8, full_disk=0, repeats=1, real=64, log=click.echo
    )
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == json.loads(
        json.dumps(bench_report["results"])
    )
    assert "bp_jax_f32" in r.output and "net_deepem_consistent" in r.output
    r = runner.invoke(main, [*args, "--repeats", "0", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "repeats" in r.output
    r = runner.invoke(main, ["bench", "--sizes", "16,x", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "sizes must be integers" in r.output
    assert len(calls) == 1


def test_demo(runner, tmp_path, monkeypatch):
    """The demo on the real synoptic set, rebinned 2x2 here to save time (test_invert runs the
    full-resolution set through BP)."""
    import deepem_jax.demo

    for c in (131, 171, 193, 211, 335):  # skips with a message when the real files are absent
        shared_path("aia", "synoptic_2024-10-04", f"AIAsynoptic{c:04d}.fits")
    monkeypatch.setattr(
        deepem_jax.demo, "run_demo", functools.partial(deepem_jax.demo.run_demo, rebin=2)
    )
    out = tmp_path / "demo"
    r = runner.invoke(main, ["demo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "demo_figure1.png").stat().st_size > 10_000
    report = (out / "demo_report.md").read_text()
    assert "real AIA synoptic" in report and "rebinned 2x2" in report and "n_sample 64;" in report
    r = runner.invoke(main, ["demo", "--out", str(out)])
    assert r.exit_code == EXIT_EXISTS


def test_demo_without_shared_data_runs_on_shipped_real_data(runner, tmp_path, monkeypatch):
    monkeypatch.delenv("DEEPEM_JAX_DATA", raising=False)
    out = tmp_path / "demo"
    r = runner.invoke(main, ["demo", "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = (out / "demo_report.md").read_text()
    assert "NOAA AR 11158" in report and "shipped with deepem_jax" in report
    assert "n_sample 1;" in report and "aia_V10" in report
    # BP-failed pixels are counted in words, not as an empty column of the fidelity table
    assert re.search(r"\| metric +\| all +\| bp_solved +\|\n", report)
    assert "bp_failed" not in report
    # (the off-edge pixels of the co-registered cutouts)
    assert "BP has no EM for 133 pixels (INVALID_INPUT 133); the network gives one for 0" in report
    assert (out / "demo_figure1.png").stat().st_size > 10_000


def test_invert_bad_tolfac_and_resume_mismatch(runner, aia_dir, tmp_path):
    r = runner.invoke(
        main, ["invert", str(aia_dir), "--method", "bp", "--tolfac", "0", "--out", str(tmp_path)]
    )
    assert r.exit_code == 2
    args = [
        "train",
        "--out",
        str(tmp_path / "w"),
        "--synthetic",
        "1",
        "--synthetic-size",
        "16",
        "--epochs",
        "1",
        "--model",
        "small",
    ]
    assert runner.invoke(main, args).exit_code == 0
    r = runner.invoke(main, [*args, "--physics-weight", "0.5"])
    assert r.exit_code == 2 and "different training config" in r.output


# -- what a new user met: each must be a clear error, a flag or correct behaviour ------------


def test_same_time_inputs_get_distinct_outputs(runner, aia_dir, tmp_path):
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in Path(aia_dir).glob("*.fits"):
        (twin / f.name).write_bytes(f.read_bytes())  # the same observation time, another input
    out = tmp_path / "out"
    r = runner.invoke(
        main,
        [
            *("invert", str(aia_dir), str(twin), "--method", "bp", "--out", str(out)),
            *("--scheduler", "synchronous"),
        ],
    )
    assert r.exit_code == 0, r.output
    files = sorted(out.glob("dem_bp_*.fits"))
    assert len(files) == 2 and files[0].name[:-14] == files[1].name[:-14]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    r = runner.invoke(
        main, ["invert", str(twin), "--method", "bp", "--out", str(out), "--overwrite"]
    )
    assert r.exit_code == 0, r.output
    changed = [f for f in files if f.stat().st_mtime_ns != stamps[f]]
    assert len(changed) == 1  # only twin's own product was replaced


def test_unwritable_out_is_refused_before_any_work(runner, aia_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = runner.invoke(main, ["invert", str(aia_dir), "--out", str(blocker / "sub")])
    assert r.exit_code == 2 and "cannot write" in r.output
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only directory is still writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    r = runner.invoke(main, ["invert", str(aia_dir), "--out", str(ro)])
    assert r.exit_code == 2 and "cannot write" in r.output


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--tolfac", "nan"], "finite"),
        (["--tolfac", "inf"], "finite"),
        (["--tolfac", "-1"], "finite"),
        (["--channels", ","], "no channel given"),
        (["--channels", "171"], "at least 3"),
        (["--channels", "171,171,193,211"], "duplicate channels"),
    ],
)
def test_invert_bad_requests_exit_2(runner, aia_dir, tmp_path, extra, match):
    r = runner.invoke(
        main, ["invert", str(aia_dir), "--method", "bp", "--out", str(tmp_path), *extra]
    )
    assert r.exit_code == 2, r.output
    assert match in r.output
    assert "Traceback" not in r.output


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--synthetic", "0"], "--synthetic"),
        (["--synthetic", "-1"], "--synthetic"),
        (["--physics-weight", "nan"], "finite"),
        (["--channels", "94,131"], "at least 3"),
    ],
)
def test_train_bad_requests_exit_2(runner, tmp_path, extra, match):
    r = runner.invoke(main, ["train", "--out", str(tmp_path), *extra])
    assert r.exit_code == 2, r.output
    assert match in r.output


@pytest.mark.parametrize("suffix", [".npy", ".genx", ".csv", ".sav"])
def test_garbage_response_names_the_file(runner, aia_dir, tmp_path, suffix):
    bad = tmp_path / f"resp{suffix}"
    bad.write_bytes(b"\x93NUMPY garbage " + bytes(range(200)))
    r = runner.invoke(
        main,
        ["invert", str(aia_dir), "--method", "bp", "--response", str(bad), "--out", str(tmp_path)],
    )
    assert r.exit_code == EXIT_INPUT, r.output
    assert f"--response {bad}" in r.output and "not a readable" in r.output
    assert str(aia_dir) not in r.output  # the data directory is not blamed


def test_corrupt_weights_are_refused(runner, aia_dir, tmp_path):
    from deepem_jax.pretrained import weights_path

    data = bytearray(weights_path().read_bytes())
    for i in range(50):  # flip 50 bytes in the middle of the parameters
        data[len(data) // 2 + 97 * i] ^= 0xFF
    bad = tmp_path / "flipped.msgpack"
    bad.write_bytes(bytes(data))
    r = runner.invoke(main, ["invert", str(aia_dir), "--weights", str(bad), "--out", str(tmp_path)])
    assert r.exit_code == EXIT_INPUT, r.output
    assert f"--weights {bad}" in r.output and "corrupt" in r.output
    assert not list(tmp_path.glob("dem_*.fits"))


def test_all_nan_channel_is_refused(runner, tmp_path):
    d = tmp_path / "nan"
    d.mkdir()
    write_aia_set(d, edit=lambda c, h, counts: counts * np.nan if c == 211 else counts)
    r = runner.invoke(main, ["invert", str(d), "--method", "bp", "--out", str(tmp_path / "o")])
    assert r.exit_code == EXIT_INPUT, r.output
    assert "211 Å has no finite pixel" in r.output


def test_degradation_options(runner, aia_dir, tmp_path):
    from deepem_jax import invert, load_aia

    stack = load_aia(aia_dir)
    r = runner.invoke(
        main, ["invert", str(aia_dir), "--method", "bp", "--no-degradation", "--out", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    (path,) = tmp_path.glob("dem_bp_*.fits")
    cube = read_dem_cube(path)
    ref = invert(stack, "bp", degradation=False)
    np.testing.assert_array_equal(cube.extras["status"], ref.status)
    np.testing.assert_array_equal(cube.em.value, ref.em)
    assert cube.header["DEGRADE"] is False and "DEGTABLE" not in cube.header
    v8 = shared_path("aia", "calibration", "aia_V8_20171210_050627_response_table.txt")
    v8_out = str(tmp_path / "v8")
    r = runner.invoke(
        main,
        ["invert", str(aia_dir), "--method", "bp", "--correction-table", str(v8), "--out", v8_out],
    )
    assert r.exit_code == 0, r.output
    (path,) = (tmp_path / "v8").glob("dem_bp_*.fits")
    assert read_dem_cube(path).header["DEGTABLE"] == v8.name
    path.unlink()
    r = runner.invoke(
        main,
        [
            "invert",
            str(aia_dir),
            "--no-degradation",
            "--correction-table",
            str(v8),
            "--out",
            v8_out,
        ],
    )
    assert r.exit_code == 2 and "contradicts" in r.output
