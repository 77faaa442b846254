"""Every script in ``examples/`` runs (in a subprocess, at small sizes, writing into tmp_path),
exits 0 and writes the files it says it wrote."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, shared_path

import deepem_jax as dj

EXAMPLES = REPO / "examples"
TESTED = (
    "calibrate_channels.py",
    "evaluate_by_date.py",
    "gaussian_recovery.py",
    "invert_quickstart.py",
    "plot_responses.py",
    "saturation_plateaus.py",
    "train_basis_table.py",
    "train_pretrained.py",
)
#: Small training run: a few seconds of training after BP on the synthetic pixels.
SMALL = (
    *("--pixels", "1500", "--prior-pixels", "1500", "--rebin", "16"),
    *("--epochs", "2", "--model", "small_gnt", "--batch-size", "256"),
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """``run(script, *args, cwd=..., env=...)``: stdout of ``python examples/<script> args``
    run in ``cwd``, failing on a non-zero exit. The scripts share one JAX compilation cache
    (most of a small run is compiling the BP kernels, the same in several scripts)."""
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }

    def run_script(script: str, *args, cwd: Path, env: dict[str, str] | None = None) -> str:
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / script), *map(str, args)],
            cwd=cwd,
            env={**os.environ, **cache, **(env or {})},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        return proc.stdout

    return run_script


def written(stdout: str, root: Path) -> list[Path]:
    """The files a script reports with ``wrote <path>``, checked to exist under ``root`` and
    to be non-empty."""
    paths = [Path(m) for m in re.findall(r"^wrote (.+?)(?: \([\d,]+ bytes\))?$", stdout, re.M)]
    assert paths, f"the script reported no file:\n{stdout}"
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0, p
        assert p.resolve().is_relative_to(root.resolve()), f"{p} written outside {root}"
    return paths


def metrics_table(stdout: str, title: str) -> str:
    """The markdown table printed under ``### title``."""
    lines = stdout.split(f"### {title}\n\n", 1)[1].splitlines()
    return "\n".join(itertools.takewhile(lambda line: line.startswith("|"), lines))


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(TESTED)


def test_plot_responses(run, tmp_path):
    shared_path("deepem", "PaulJWright_DeepEM", "DeepEM_Data", "aia_temperature_resp.genx")
    shared_path("deepem", "RobertJaro_DeepEM", "data", "aia_temperature_response.csv")
    shared_path("deepem", "HelioML_HelioML", "book", "04", "DeepEM_Data", "AIA_Resp.npy")
    out = run("plot_responses.py", tmp_path / "responses.png", cwd=tmp_path)
    assert written(out, tmp_path) == [tmp_path / "responses.png"]
    assert "DeepEM/GENX 171 Å: min 0.745 max 0.745" in out


def test_invert_quickstart_default_dir_is_temporary(run, tmp_path):
    """Without OUT_DIR the quick start writes into a new temporary directory ($TMPDIR here)."""
    out = run("invert_quickstart.py", cwd=tmp_path, env={"TMPDIR": str(tmp_path)})
    paths = written(out, tmp_path)
    assert sorted(p.name for p in paths) == ["dem_bp.fits", "dem_net.fits", "figure1.png"]
    assert paths[0].parent.name.startswith("deepem_quickstart_")
    for method in ("bp", "net"):
        assert re.search(rf"^{method}: 4,489 pixels: SOLVED [\d,]+", out, re.M), out
        chi2 = float(re.search(rf"^{method}: median chi2 (\S+)", out, re.M).group(1))
        assert 0 < chi2 < 10
        cube = dj.read_dem_cube(paths[0].parent / f"dem_{method}.fits")
        assert cube.em.shape == (67, 67, 18)
        assert cube.header["METHOD"] == method
        assert cube.extras["status"].shape == (67, 67)


@pytest.fixture(scope="module")
def trained6(run, tmp_path_factory):
    """A small six-channel training run: (output directory, stdout)."""
    tmp = tmp_path_factory.mktemp("train6")
    args = ("--channels", 6, "--out", tmp / "w", "--workdir", tmp / "work")
    return tmp, run("train_pretrained.py", *args, *SMALL, "--figure", tmp / "f.png", cwd=tmp)


def test_train_pretrained(trained6):
    tmp, out = trained6
    paths = written(out, tmp)
    assert sorted(p.name for p in paths) == [
        "deepem_aia6.metrics.md",
        "deepem_aia6.msgpack",
        "f.png",
    ]
    pred = dj.load_predictor(tmp / "w" / "deepem_aia6.msgpack")
    assert pred.channels == (94, 131, 171, 193, 211, 335)
    assert "1,500 synthetic pixels" in out
    assert "| in BP band " in metrics_table(out, "network + consistency step (tolfac 1.4)")


def test_train_pretrained_evaluate(run, trained6, tmp_path):
    """--evaluate rebuilds the same held-out split: the weights score what training reported."""
    tmp, trained = trained6
    args = ("--channels", 6, "--out", tmp / "w", *SMALL, "--evaluate")
    out = run("train_pretrained.py", *args, cwd=tmp_path)
    assert [p.name for p in written(out, tmp)] == ["deepem_aia6.metrics.md"]
    for title in ("network alone", "network + consistency step (tolfac 1.4)"):
        assert metrics_table(out, title) == metrics_table(trained, title)


@pytest.mark.slow
def test_train_pretrained_five_channels_with_real_data(run, tmp_path):
    shared_path("aia", "synoptic_2024-10-04", "AIAsynoptic0131.fits")
    args = ("--channels", 5, "--out", tmp_path / "w", "--workdir", tmp_path / "work")
    out = run("train_pretrained.py", *args, *SMALL, "--prior-dates", "2024-10-04", cwd=tmp_path)
    # the real observation is a DEM prior (BP of its 64x64 rebinned pixels), not training data
    assert "1,500 pixels synthesised from" in out and "of 2024-10-04 (rebin 16)" in out
    assert [p.name for p in written(out, tmp_path)] == [
        "deepem_aia5_no94.msgpack",
        "deepem_aia5_no94.metrics.md",
    ]


def test_evaluate_by_date_on_the_shipped_cutouts(run, tmp_path):
    out = run("evaluate_by_date.py", "--pixels", "1500", cwd=tmp_path, env={"DEEPEM_JAX_DATA": ""})
    rows = [line for line in out.splitlines() if line.startswith("| ") and "2011-02-15" in line]
    assert len(rows) == 10  # two networks x (alone, projected, shipped, BP at two tolfacs)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[3].replace(",", "")) > 1000  # pixels BP solved
        assert "nan" not in row
    mse = {c[2]: float(c[5]) for c in (r.strip("|").split("|") for r in rows)}
    mse = {k.strip(): v for k, v in mse.items()}
    # BP moves when its band widens: more at 10 % than at 1 %, and not at all never
    assert 0 < mse["BP, tolfac x1.01"] < mse["BP, tolfac x1.1"]


def test_saturation_plateaus_of_the_real_flare(run, tmp_path):
    folder = shared_path("aia", "flare_2011-02-15")
    out = run("saturation_plateaus.py", folder, "--levels", "13500,15000", cwd=tmp_path)
    rows = [r.strip("|").split("|") for r in out.splitlines() if r.startswith("| ")]
    chans = {r[0].strip(): [int(c) for c in r[1:2] + r[4:]] for r in rows if "Å" in r[0]}
    assert list(chans) == ["94 Å", "131 Å", "171 Å", "193 Å", "211 Å", "335 Å"]
    # every channel saturates; 13,500 DN leaves no plateau pixel unflagged, 15,000 DN leaves
    # thousands in 94 Å
    assert all(n > 100 and at_13500 == 0 for n, at_13500, _ in chans.values())
    assert chans["94 Å"][2] > 1000
    bp = {r[0].strip(): r for r in rows if r[0].strip().endswith("DN")}
    usable = {k: int(v[1].replace(",", "")) for k, v in bp.items()}
    infeasible = {k: int(v[2].split("(")[0].replace(",", "")) for k, v in bp.items()}
    assert usable["13500 DN"] < usable["15000 DN"]
    assert infeasible["13500 DN"] < infeasible["15000 DN"]


@pytest.fixture(scope="module")
def calibrated(run, tmp_path_factory):
    """A small run of calibrate_channels.py (synthetic cases, and the real date when
    DEEPEM_JAX_DATA has it): (output directory, stdout)."""
    tmp = tmp_path_factory.mktemp("calibrate")
    # its time is spent running its fits, not compiling them: XLA's full pipeline
    full = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "0"}
    return tmp, run("calibrate_channels.py", "--pixels", 500, "--out", tmp, cwd=tmp, env=full)


def test_calibrate_channels_recovers_injected_factors(calibrated):
    tmp, out = calibrated
    paths = written(out, tmp)
    assert [p.name for p in paths] == ["calibration.json", "calibration_factors.csv"]
    err = re.search(r"^synthetic recovery: max relative error (\S+) % \(limit 2 %\)$", out, re.M)
    assert err and float(err.group(1)) <= 2.0, out
    report = json.loads(paths[0].read_text())
    syn = report["synthetic"]
    assert syn["converged"] and syn["max_relative_error"] <= 0.02
    assert syn["estimate"]["171"] == 1.0  # the reference channel fixes the global scale
    assert min(syn["injected"].values()) < 0.9 < 1.1 < max(syn["injected"].values())
    # the wrong-model case is reported, not required
    assert "synthetic with a wrong DEM model: max relative error" in out
    assert np.isfinite(report["synthetic_prior"]["max_relative_error"])


def test_calibrate_channels_real_date(calibrated):
    for c in (131, 171, 193, 211, 335):
        shared_path("aia", "synoptic_2024-10-04", f"AIAsynoptic{c:04d}.fits")
    tmp, out = calibrated
    assert re.search(
        r"^real 2024-10-04 .*: 500 on-disk pixels \(rebin 4, n_sample 256\)", out, re.M
    )
    real = json.loads((tmp / "calibration.json").read_text())["real"]
    v10 = {"131": 0.51, "171": 0.74, "193": 0.49, "211": 0.40, "335": 0.17}  # the issue's
    assert {c: round(f, 2) for c, f in real["v10_absolute"].items()} == v10
    assert real["v10"]["171"] == real["estimate"]["171"] == 1.0
    assert all(np.isfinite(g) and g > 0 for g in real["estimate"].values())
    table = out.split("real 2024-10-04", 1)[1]
    for c in v10:
        assert re.search(rf"^\| {c} Å \| {real['v10'][c]:.4f} \| ", table, re.M), table
    assert all(np.isfinite(v) for v in real["loss"].values())


def test_train_basis_table(run, tmp_path):
    """Learns a table from synthetic pixels (and the shipped 2011-02-15 cutouts' BP solutions),
    scores it on those cutouts and writes a table that loads."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    args = (
        "--channels",
        "5",
        "--synthetic",
        "2000",
        "--prior-pixels",
        "2000",
        "--out",
        tmp_path / "t",
    )
    out = run("train_basis_table.py", *args, cwd=tmp_path, env={"DEEPEM_JAX_DATA": str(empty)})
    files = written(out, tmp_path)
    table = dj.bp.BasisTable.load(next(f for f in files if f.suffix == ".npz"))
    assert table.channels == (131, 171, 193, 211, 335) and table.size > 10
    assert len(table.rays) > 0  # from the infeasible bands of the cutouts and synthetic pixels
    report = json.loads(next(f for f in files if f.suffix == ".json").read_text())
    row = report["held_out"]["2011-02-15"]
    assert row["same_verdicts"] == 1.0 and row["objective_max_rel_diff"] < 1e-9
    assert row["certified_first_try"] > 0.5 and "infeasible_proven_by_ray" in row


def test_gaussian_recovery(run, tmp_path):
    """Every width, noise and method has a row; on noiseless narrow DEMs every method gets the
    total EM within 10 %; on broad ones BP, which minimises the EM in its band, recovers less
    of it than the fit and sits lower in its band."""
    out = tmp_path / "recovery.json"
    run(
        "gaussian_recovery.py", "--pixels", "200", "--widths", "0.1,0.5", "--out", out, cwd=tmp_path
    )
    rows = {(r["width"], r["noise"], r["method"]): r for r in json.loads(out.read_text())}
    assert len(rows) == 2 * 2 * 3
    for method in ("bp", "fit", "net"):
        assert abs(rows[(0.1, "noiseless", method)]["total_em_ratio"] - 1) < 0.1
    bp, fit = rows[(0.5, "noiseless", "bp")], rows[(0.5, "noiseless", "fit")]
    assert bp["total_em_ratio"] < fit["total_em_ratio"] - 0.1
    assert bp["residual_over_sigma"] < fit["residual_over_sigma"] - 0.3
    assert bp["dlogt"] < 0
