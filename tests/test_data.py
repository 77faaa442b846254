"""The data registry: lookup in the data directory, sha256 checks, clear errors, and downloads
only when asked (pooch is replaced by a stub here: no test touches the network)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pooch
import pytest
from conftest import shared_path

from deepem_jax.data import (
    ENV_VAR,
    REGISTRY,
    ChecksumError,
    DataFileNotFoundError,
    data_dir,
    fetch,
    sample_observation,
)

RESP = "deepem/HelioML_HelioML/book/04/DeepEM_Data/AIA_Resp.npy"
AIA171 = "aia/synoptic_2024-10-04/AIAsynoptic0171.fits"


@pytest.fixture
def no_network(monkeypatch):
    """Any download attempt fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    monkeypatch.setattr(pooch, "retrieve", forbidden)


@pytest.fixture
def shared_root(monkeypatch):
    root = shared_path("deepem", "PROVENANCE.md").parents[1]
    monkeypatch.setenv(ENV_VAR, str(root))
    return root


def test_registry_entries_are_well_formed():
    url = re.compile(r"^https://raw\.githubusercontent\.com/[\w.-]+/[\w.-]+/[0-9a-f]{40}/\S+$")
    for name, entry in REGISTRY.items():
        assert entry.name == name and not Path(name).is_absolute()
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), name
        assert url.match(entry.url), entry.url
        assert entry.licence and entry.description
    assert len({e.sha256 for e in REGISTRY.values()}) == len(REGISTRY)


def test_registry_covers_provenance_checksums():
    text = shared_path("deepem", "PROVENANCE.md").read_text()
    documented = set(re.findall(r"\b[0-9a-f]{64}\b", text))
    assert len(documented) == 8
    assert documented <= {e.sha256 for e in REGISTRY.values()}


def test_every_registered_file_verifies_offline(shared_root, no_network):
    for name in REGISTRY:
        path = fetch(name)
        assert path == shared_root / name and path.is_file()


def test_default_directory_is_the_user_cache(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert data_dir() == Path(pooch.os_cache("deepem_jax"))
    monkeypatch.setenv(ENV_VAR, "~/somewhere")
    assert data_dir() == Path.home() / "somewhere"


def test_missing_file_says_where_and_how(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(DataFileNotFoundError) as info:
        fetch(AIA171)
    msg = str(info.value)
    for part in (AIA171, str(tmp_path / AIA171), ENV_VAR, "download=True", REGISTRY[AIA171].url):
        assert part in msg
    assert "fits%20files/AIAsynoptic0171.fits" in msg


def test_checksum_mismatch(tmp_path, no_network):
    target = tmp_path / RESP
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not the DeepEM response")
    with pytest.raises(ChecksumError, match="expected 66b9eaf4"):
        fetch(RESP, directory=tmp_path)


def test_file_changed_after_a_good_fetch_is_caught(tmp_path, no_network):
    src = shared_path(*RESP.split("/"))
    target = tmp_path / RESP
    target.parent.mkdir(parents=True)
    shutil.copyfile(src, target)
    assert fetch(RESP, directory=tmp_path) == target
    target.write_bytes(src.read_bytes()[:-4] + b"\0\0\0\1")  # same size, new content
    os.utime(target, ns=(0, 1))  # a different mtime, as an editor would leave
    with pytest.raises(ChecksumError):
        fetch(RESP, directory=tmp_path)


def test_download_only_when_asked(tmp_path, monkeypatch):
    src = shared_path(*AIA171.split("/"))
    calls = []

    def fake_retrieve(url, known_hash, fname, path, progressbar):
        calls.append((url, known_hash, fname, Path(path)))
        shutil.copyfile(src, Path(path) / fname)
        return str(Path(path) / fname)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    with pytest.raises(DataFileNotFoundError):
        fetch(AIA171, directory=tmp_path)
    assert calls == []
    path = fetch(AIA171, directory=tmp_path, download=True)
    assert path == tmp_path / AIA171 and path.read_bytes() == src.read_bytes()
    entry = REGISTRY[AIA171]
    assert calls == [(entry.url, f"sha256:{entry.sha256}", "AIAsynoptic0171.fits", path.parent)]
    assert fetch(AIA171, directory=tmp_path, download=True) == path  # cached: no new download
    assert len(calls) == 1


def test_download_with_wrong_bytes_is_rejected(tmp_path, monkeypatch):
    def bad_retrieve(url, known_hash, fname, path, progressbar):
        (Path(path) / fname).write_bytes(b"an HTML error page")
        return str(Path(path) / fname)

    monkeypatch.setattr(pooch, "retrieve", bad_retrieve)
    with pytest.raises(ChecksumError, match="after download"):
        fetch(RESP, directory=tmp_path, download=True)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(KeyError, match=r"did you mean.*AIA_Resp.npy"):
        fetch("deepem/HelioML_HelioML/book/04/DeepEM_Data/AIA_resp.npy")


def test_fetched_synoptic_files_load(shared_root, no_network):
    import astropy.units as u

    from deepem_jax.io import load_aia

    names = [n for n in REGISTRY if n.startswith("aia/") and "CORRUPT" not in n]
    stack = load_aia([fetch(n) for n in names], [131, 171, 193, 211, 335] * u.AA, rebin=16)
    assert stack.data.shape == (64, 64, 5)


# -- the observation shipped inside the package --------------------------------------------

SAMPLE_CHANNELS = (94, 131, 171, 193, 211, 335)


def test_sample_observation_files_match_the_published_checksums():
    lines = shared_path("aia", "flare_2011-02-15", "SHA256SUMS").read_text().splitlines()
    published = {name: sha for sha, name in (line.split() for line in lines if line.strip())}
    shipped = []
    for time in ("01:44", "01:46"):
        paths = sample_observation(time)
        for path, chan in zip(paths, SAMPLE_CHANNELS, strict=True):
            assert path.is_file() and path.name.endswith(f"_{chan:03d}.fits")
            assert f"2011-02-15T{time.replace(':', '-')}-" in path.name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == published[path.name]
        shipped += paths
    folder = shipped[0].parent
    assert sorted(folder.glob("*.fits")) == sorted(shipped)  # the twelve files, nothing else
    names = {p.name for p in shipped}
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    assert sorted(sums) == sorted(line for line in lines if line.split()[-1] in names)
    readme = (folder / "README.md").read_text()
    for part in ("MIT License", "CC0", "Courtesy of NASA/SDO", "aia.lev1_euv_12s", "demregpy"):
        assert part in readme


def test_sample_observation_loads_on_one_grid():
    import astropy.units as u
    from astropy.io import fits

    from deepem_jax.io import load_aia

    paths = sample_observation()
    stack = load_aia(paths)
    assert stack.data.shape == (67, 67, 6) and stack.n_sample == 1
    assert list(stack.channels.to_value(u.AA)) == list(SAMPLE_CHANNELS)
    assert stack.resampled == SAMPLE_CHANNELS[1:]  # level 1: each on the 94 Å grid
    assert stack.sources == tuple(str(p) for p in paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the files' BLANK card does not apply to float data
        t_obs = [fits.getval(path, "T_OBS") for path in paths]
    assert [t.isot for t in stack.obstime] == t_obs
    assert stack.obstime.min().isot.startswith("2011-02-15T01:44")
    assert not stack.saturated_count.any()
    assert np.isfinite(stack.data[1:-1, 1:-1]).all()


def test_sample_observation_other_times_are_refused():
    with pytest.raises(ValueError, match=r"no sample observation at '01:48'.*01:44.*01:46"):
        sample_observation("01:48")
