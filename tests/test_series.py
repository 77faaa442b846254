"""Observation series (deepem_jax.series and ``deepem-jax invert`` over many observations)
against each observation run alone through ``deepem_jax.invert``; a killed worker, corrupt
inputs and corrupt outputs; pixel chunks on two forced host devices against one device."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import astropy.units as u
import dask
import numpy as np
import pytest
from _synth import write_aia_set
from astropy.io import fits
from astropy.table import Table
from astropy.time import Time
from click.testing import CliRunner

import deepem_jax as dj
from deepem_jax.cli import EXIT_PARTIAL, main
from deepem_jax.data import sample_observation
from deepem_jax.io import read_dem_cube
from deepem_jax.series import group_files, invert_series

N_OBS = 5


def _shifted(minutes: int, scale: float):
    """``write_aia_set`` edit: times ``minutes`` later, intensities times ``scale``."""

    def edit(chan, header, counts):
        for key in ("T_OBS", "DATE-OBS"):
            header[key] = (Time(header[key].rstrip("Z")) + minutes * u.min).isot
        return counts * scale

    return edit


@pytest.fixture(scope="module")
def series_dirs(tmp_path_factory) -> list[Path]:
    """Five synthetic six-channel observations (128x128), one minute apart, each brighter."""
    root = tmp_path_factory.mktemp("series")
    dirs = []
    for i in range(N_OBS):
        d = root / f"obs{i}"
        d.mkdir()
        write_aia_set(d, edit=_shifted(i, 1.0 + 0.25 * i))
        dirs.append(d)
    return dirs


@pytest.fixture(scope="module")
def reference(series_dirs) -> dict[str, dj.DEMResult]:
    """Each observation inverted alone in this process (the network, default calibration)."""
    return {d.name: dj.invert(d, "net") for d in series_dirs}


@pytest.fixture(scope="module")
def cluster():
    """Client of a two-worker LocalCluster of processes; a task whose worker dies fails at
    once (no Dask retry)."""
    from distributed import Client, LocalCluster

    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 0}),
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit="2GiB",
            dashboard_address=None,
        ) as lc,
        Client(lc) as client,
    ):
        yield client


def _assert_same(path: Path, ref: dj.DEMResult) -> None:
    """The cube at ``path`` holds exactly ``ref``'s EM, status and chi^2."""
    cube = read_dem_cube(path)
    np.testing.assert_array_equal(cube.em.value, ref.em)
    np.testing.assert_array_equal(cube.extras["status"], ref.status)
    np.testing.assert_array_equal(cube.extras["chi2"], ref.chi2)
    assert cube.header["METHOD"] == ref.provenance["METHOD"]


def _by_dir(outcomes) -> dict[str, object]:
    return {Path(o.label).name: o for o in outcomes}


def _states(stdout: str) -> list[str]:
    """First word of each per-observation summary line."""
    return [
        ln.split()[0]
        for ln in stdout.splitlines()
        if ln.split()[:1] in (["ok"], ["skipped"], ["failed"])
    ]


def _products(out: Path) -> list[Path]:
    return sorted(out.glob("dem_*.fits"))


def test_cli_series_on_embedded_cluster_matches_single_runs(series_dirs, reference, tmp_path):
    out = tmp_path / "out"
    dirs = [str(d) for d in series_dirs[:4]]
    runner = CliRunner()
    r = runner.invoke(main, ["invert", *dirs, "--out", str(out), "--workers", "2"])
    assert r.exit_code == 0, r.output
    assert _states(r.stdout) == ["ok"] * 4, r.output
    assert "4 observations: 4 ok, 0 skipped, 0 failed" in r.output
    products = _products(out)
    assert len(products) == 4
    for d in series_dirs[:4]:
        ref = reference[d.name]
        stamp = Time(ref_time(d)).strftime("%Y%m%dT%H%M%S")
        (path,) = [p for p in products if stamp in p.name]
        _assert_same(path, ref)

    (table_path,) = out.glob("series_net_*.fits")
    assert (table_path.with_suffix(".png")).stat().st_size > 10_000
    with fits.open(table_path, checksum=True) as hdul:
        assert "CHECKSUM" in hdul["SERIES"].header
    table = Table.read(table_path, hdu="SERIES", mask_invalid=False)
    assert list(table["TIME"]) == sorted(table["TIME"]) and set(table["STATE"]) == {"ok"}
    for row, d in zip(table, series_dirs[:4], strict=True):  # time order = directory order
        ref = reference[d.name]
        tot = ref.total_em().to_value(u.cm**-5)
        has = np.isfinite(tot) & (tot > 0)
        np.testing.assert_allclose(row["EM_SUM"], tot[has].sum(), rtol=1e-6)
        np.testing.assert_allclose(row["LOGT_MEDIAN"], np.median(ref.temperature_map()[has]))
        assert row["N_SOLVED"] == ref.status_counts().get("SOLVED", 0)
        assert row["N_OUTSIDE_BAND"] == ref.status_counts().get("OUTSIDE_BAND", 0)

    # a rerun keeps every verified product and exits 0
    stamps = {p: p.stat().st_mtime_ns for p in products}
    r = runner.invoke(main, ["invert", *dirs, "--out", str(out), "--scheduler", "synchronous"])
    assert r.exit_code == 0, r.output
    assert "4 ok" not in r.output and "0 ok, 4 skipped, 0 failed" in r.output
    assert _states(r.stdout) == ["skipped"] * 4 and r.stdout.count("checksum verifies") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())

    # a rerun with other settings neither reuses nor replaces them: each observation fails
    r = runner.invoke(
        main, ["invert", *dirs, "--out", str(out), "--scheduler", "synchronous", "--tolfac", "2"]
    )
    assert r.exit_code == EXIT_PARTIAL, r.output
    assert "0 ok, 0 skipped, 4 failed" in r.output
    assert r.stdout.count("made with other settings") == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # ... and writes its table beside the first run's, which still says what that run made
    assert len(list(out.glob("series_net_*.fits"))) == 2
    kept = Table.read(table_path, hdu="SERIES", mask_invalid=False)
    assert set(kept["STATE"]) == {"skipped"}  # the last run with the first run's settings

    # a truncated product and one with altered data are redone; the others are kept
    cut, altered = products[0], products[1]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    with fits.open(altered, mode="update") as hdul:
        hdul[0].data[5, 10, 10] *= 2.0  # a finite EM: the network gives every pixel one
    r = runner.invoke(main, ["invert", *dirs, "--out", str(out), "--scheduler", "synchronous"])
    assert r.exit_code == 0, r.output
    assert "2 ok, 2 skipped, 0 failed" in r.output
    assert "unreadable" in r.output and "do not match" in r.output
    assert _products(out) == products
    for d in series_dirs[:4]:
        stamp = Time(ref_time(d)).strftime("%Y%m%dT%H%M%S")
        (path,) = [p for p in products if stamp in p.name]
        _assert_same(path, reference[d.name])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_map_is_reused_only_with_its_cube(series_dirs, tmp_path):
    """With --png a rerun reuses a map only if it reads completely and was drawn from the
    cube beside it; a cube recomputed without --png removes its stale map."""
    out, runner = tmp_path / "out", CliRunner()
    args = ["invert", str(series_dirs[0]), str(series_dirs[1]), "--out", str(out)]
    args += ["--method", "bp", "--scheduler", "synchronous"]
    r = runner.invoke(main, [*args, "--png"])
    assert r.exit_code == 0 and _states(r.stdout) == ["ok"] * 2, r.output
    maps = sorted(out.glob("dem_bp_*.png"))
    assert len(maps) == 2
    for spoil in (
        lambda: maps[0].write_bytes(maps[0].read_bytes()[:200]),  # truncated
        lambda: maps[0].write_bytes(maps[1].read_bytes()),  # complete, of the other cube
    ):
        spoil()
        r = runner.invoke(main, [*args, "--png"])
        assert r.exit_code == 0 and sorted(_states(r.stdout)) == ["ok", "skipped"], r.output
        assert "incomplete or of another cube" in r.output
    r = runner.invoke(main, [*args, "--overwrite"])
    assert r.exit_code == 0 and not list(out.glob("dem_bp_*.png")), r.output


def test_a_scheduler_that_is_not_an_address_is_a_usage_error(series_dirs, tmp_path):
    args = ["invert", *map(str, series_dirs[:2]), "--out", str(tmp_path / "out")]
    r = CliRunner().invoke(main, [*args, "--scheduler", "not an address"])
    assert r.exit_code == 2 and "--scheduler" in r.output, r.output


def ref_time(d: Path) -> Time:
    """Earliest channel time of the observation in ``d``."""
    return dj.load_aia(d).obstime.min()


def test_killed_workers_and_rerun_complete_the_series(cluster, series_dirs, reference, tmp_path):
    """Both workers are killed while each runs one observation: those two fail, the restarted
    workers run the rest (no task depends on data a dead worker held), a rerun does the two."""
    out = tmp_path / "out"
    done: dict = {}
    run = threading.Thread(
        target=lambda: done.update(
            result=invert_series(series_dirs, "net", out_dir=out, client=cluster)
        )
    )
    run.start()
    deadline = time.monotonic() + 120
    busy = []
    while len(busy) < 2 and time.monotonic() < deadline:
        busy = [w for w, keys in cluster.processing().items() if keys]
        time.sleep(0.02)
    assert len(busy) == 2, "the two workers did not both start a task"
    for pid in cluster.run(os.getpid, workers=busy).values():
        os.kill(pid, signal.SIGKILL)
    run.join(timeout=300)
    first = done["result"]
    states = [o.state for o in first.outcomes]
    assert states.count("failed") == 2 and states.count("ok") == N_OBS - 2, first.outcomes
    lost = {Path(o.label).name for o in first.failed}
    assert all("KilledWorker" in o.reason for o in first.failed), first.failed

    second = invert_series(series_dirs, "net", out_dir=out, client=cluster)
    by_dir = _by_dir(second.outcomes)
    assert {name for name, o in by_dir.items() if o.state == "ok"} == lost
    assert second.counts() == {"ok": 2, "skipped": N_OBS - 2, "failed": 0}
    products = _products(out)
    assert len(products) == N_OBS == len({o.output for o in second.outcomes})
    for d in series_dirs:
        _assert_same(Path(by_dir[d.name].output), reference[d.name])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_bad_observations_fail_alone_on_a_scheduler_address(cluster, series_dirs, tmp_path):
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    write_aia_set(truncated, edit=_shifted(30, 1.0))
    victim = sorted(truncated.glob("*.fits"))[2]
    victim.write_bytes(victim.read_bytes()[: 2880 * 3 + 100])
    five = tmp_path / "five"
    five.mkdir()
    write_aia_set(five, channels=(131, 171, 193, 211, 335), edit=_shifted(31, 1.0))
    out = tmp_path / "out"
    args = ["invert", str(series_dirs[0]), str(truncated), str(five), str(series_dirs[1])]
    address = cluster.scheduler.address
    r = CliRunner().invoke(main, [*args, "--out", str(out), "--scheduler", address])
    assert r.exit_code == EXIT_PARTIAL, r.output
    assert "2 ok, 0 skipped, 2 failed" in r.output
    failed = [line for line in r.stdout.splitlines() if line.startswith("failed")]
    assert len(failed) == 2
    assert any(victim.name in line for line in failed)
    assert any("[94]" in line and "missing" in line for line in failed)
    assert len(_products(out)) == 2
    (table_path,) = out.glob("series_net_*.fits")
    table = Table.read(table_path, hdu="SERIES", mask_invalid=False)
    assert sorted(table["STATE"]) == ["failed", "failed", "ok", "ok"]
    assert np.all(np.isnan(table["EM_SUM"][table["STATE"] == "failed"]))

    r = CliRunner().invoke(
        main, [*args, "--out", str(out), "--scheduler", address, "--workers", "2"]
    )
    assert r.exit_code == 2 and "embedded" in r.output


def test_loose_files_are_grouped_into_observations_by_time(tmp_path):
    early, late = sample_observation("01:44"), sample_observation("01:46")
    files = [late[3], early[0], late[0], early[5], *early[1:5], *late[1:3], *late[4:]]
    groups = group_files(files)
    assert [sorted(g) for g in groups] == [sorted(early), sorted(late)]

    out = tmp_path / "out"
    r = CliRunner().invoke(
        main, ["invert", *map(str, files), "--out", str(out), "--scheduler", "synchronous"]
    )
    assert r.exit_code == 0, r.output
    assert "2 observations: 2 ok" in r.output
    for obs in (early, late):
        ref = dj.invert(obs, "net")
        stamp = dj.load_aia(obs).obstime.min().strftime("%Y%m%dT%H%M%S")
        (path,) = out.glob(f"dem_net_{stamp}_*.fits")
        _assert_same(path, ref)


def test_a_file_missing_at_one_cadence_step_is_not_taken_from_the_next(tmp_path):
    """12 s cadence, 211 Å observed first in each step and missing at the first: the first set
    lacks 211 Å (and fails alone when loaded); the second keeps its own 211 Å file."""
    offset = {211: 0, 94: 2, 131: 3, 171: 4, 193: 5, 335: 6}  # seconds into the step

    def step(start):
        def edit(chan, header, counts):
            t = Time("2011-02-15T01:44:00") + (start + offset[chan]) * u.s
            header["T_OBS"], header["DATE-OBS"] = t.isot + "Z", t.isot
            return counts

        return edit

    sets = []
    for k, start in enumerate((0, 12)):
        d = tmp_path / f"step{k}"
        d.mkdir()
        sets.append(write_aia_set(d, edit=step(start))[0])
    first = [p for p in sets[0] if "_211a" not in p.name]
    groups = group_files([*first, *sets[1]])
    assert [sorted(g) for g in groups] == [sorted(first), sorted(sets[1])]


def _bp_run(directory: str):
    """BP of the observation in ``directory`` in chunks of 4096 pixels."""
    import deepem_jax as dj

    return dj.invert(directory, "bp", solver=dj.bp.DualSimplex(chunk_size=4096))


def _net_run(directory: str):
    """The network on the observation in ``directory`` tiled 5x5 (5 x 5 x 67 x 67 = 112,225
    pixels: two network tiles of 65,536)."""
    import numpy as np

    import deepem_jax as dj

    stack = dj.load_aia(directory)
    y, s = np.tile(stack.data, (5, 5, 1)), np.tile(stack.sigma(), (5, 5, 1))
    return dj.invert(y, "net", sigma=s, channels=stack.channels, degradation=False)


_DEVICES_SCRIPT = """
import json, sys
import jax, numpy as np
import deepem_jax._batching as batching

seen, spread = [], []
def record(a):
    seen.append(sorted(d.id for d in a.devices()))
    return a * 2.0
batching.map_rows(record, [np.arange(10.0)], 4)

on_devices = batching._on_devices
def spy(devices, *args):
    spread.append(len(devices))
    return on_devices(devices, *args)
batching._on_devices = spy
bp = _bp_run(sys.argv[1])
n_bp = len(spread)
net = _net_run(sys.argv[2])
np.savez(sys.argv[3], **{f"{k}_{name}": getattr(r, name) for k, r in (("bp", bp), ("net", net))
                         for name in ("em", "status", "chi2")})
print(json.dumps({"devices": jax.local_device_count(), "seen": seen,
                  "bp_groups": n_bp, "net_groups": len(spread) - n_bp}))
"""


def test_two_host_devices_give_the_results_of_one(series_dirs, tmp_path):
    """BP chunks and network tiles spread over two forced host devices in a subprocess equal
    one device in this process, bit for bit."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    npz = tmp_path / "two.npz"
    sample = tmp_path / "sample"
    sample.mkdir()
    for f in sample_observation("01:44"):
        (sample / f.name).write_bytes(f.read_bytes())
    dirs = [str(series_dirs[0]), str(sample)]
    source = inspect.getsource(_bp_run) + inspect.getsource(_net_run) + _DEVICES_SCRIPT
    child = subprocess.Popen(
        [sys.executable, "-c", source, *dirs, str(npz)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    bp, net = _bp_run(dirs[0]), _net_run(dirs[1])  # one device, while the child runs on two
    stdout, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr[-3000:]
    info = json.loads(stdout.strip().splitlines()[-1])
    assert info["devices"] == 2
    assert info["seen"] == [[0], [1], [0], [1]]  # 10 rows in blocks of 4: blocks on both
    assert info["bp_groups"] > 0 and info["net_groups"] > 0  # both paths used both devices
    two = np.load(npz)
    for name, one in (("bp", bp), ("net", net)):
        np.testing.assert_array_equal(two[f"{name}_em"], one.em)
        np.testing.assert_array_equal(two[f"{name}_status"], one.status)
        np.testing.assert_array_equal(two[f"{name}_chi2"], one.chi2)


def test_settings_digest_follows_every_option(monkeypatch):
    """Equal settings give one digest; another tolfac, rebin, channel order, network weight,
    network dtype, response or saturation level of the loader gives another."""
    from deepem_jax.pretrained import load_default_predictor
    from deepem_jax.series import settings_sha256

    net = load_default_predictor()
    other = dj.Predictor(
        {**net.params, "refine": {k: v + 1 for k, v in net.params["refine"].items()}},
        net.config,
        net.logt,
        net.channels,
    )
    other_dtype = dataclasses.replace(
        net, dtype={"float32": "bfloat16", "bfloat16": "float32"}[net.dtype]
    )
    chans = (94, 131, 171, 193, 211, 335)
    base = settings_sha256("net", chans, 1, {"tolfac": 1.4, "predictor": net})
    assert base == settings_sha256("net", chans, 1, {"predictor": net, "tolfac": 1.4})
    changed = [
        settings_sha256("net", chans, 1, {"tolfac": 2.0, "predictor": net}),
        settings_sha256("net", chans, 2, {"tolfac": 1.4, "predictor": net}),
        settings_sha256("net", chans[::-1], 1, {"tolfac": 1.4, "predictor": net}),
        settings_sha256("net", chans, 1, {"tolfac": 1.4, "predictor": other}),
        settings_sha256("net", chans, 1, {"tolfac": 1.4, "predictor": other_dtype}),
        settings_sha256("bp", chans, 1, {"tolfac": 1.4, "predictor": net}),
        settings_sha256(
            "net", chans, 1, {"tolfac": 1.4, "predictor": net, "response": dj.default_response()}
        ),
    ]
    monkeypatch.setattr("deepem_jax.io._aia._DEFAULT_SATURATION", 15000 * u.DN)
    changed.append(settings_sha256("net", chans, 1, {"tolfac": 1.4, "predictor": net}))
    assert len({base, *changed}) == 1 + len(changed)


def test_settings_digest_takes_a_degradation_table_by_its_contents(tmp_path):
    """The same table under another path gives the same digest; an edited one another."""
    from deepem_jax.calibration import DEFAULT_CORRECTION_TABLE
    from deepem_jax.series import settings_sha256

    chans = (94, 131, 171, 193, 211, 335)
    text = Path(DEFAULT_CORRECTION_TABLE).read_text()
    a, b, edited = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    a.write_text(text)
    b.write_text(text)
    edited.write_text(text.replace("0.", "1.", 1))
    digest = [settings_sha256("bp", chans, 1, {"degradation": str(p)}) for p in (a, b, edited)]
    assert digest[0] == digest[1] != digest[2]


def test_default_network_is_chosen_once_for_the_series(series_dirs, tmp_path):
    """Without a predictor the driver loads the shipped network, in the hardware's operand
    dtype, and sends that one to every worker: the cube's settings are those of the explicit
    predictor, and a rerun with the other operand dtype refuses the cube instead of mixing."""
    from deepem_jax.pretrained import load_default_predictor
    from deepem_jax.series import SETTINGS_CARD, settings_sha256

    dirs, out = series_dirs[:1], tmp_path / "out"
    first = invert_series(dirs, "net", out_dir=out, client="synchronous")
    assert first.counts() == {"ok": 1, "skipped": 0, "failed": 0}
    net = load_default_predictor()
    want = settings_sha256("net", net.channels, 1, {"predictor": net})[:16]
    assert read_dem_cube(first.outcomes[0].output).header[SETTINGS_CARD] == want
    other = dataclasses.replace(
        net, dtype={"float32": "bfloat16", "bfloat16": "float32"}[net.dtype]
    )
    second = invert_series(dirs, "net", out_dir=out, client="synchronous", predictor=other)
    assert second.counts() == {"ok": 0, "skipped": 0, "failed": 1}
    assert "other settings" in second.failed[0].reason
