"""Registry of the reference files deepem_jax's tests, examples and benchmarks use.

Every file has a name, which is also its path relative to the data directory, a sha256 and a
public source URL (``raw.githubusercontent.com`` at a fixed commit). :func:`fetch` looks the file
up in the data directory and verifies its checksum; it downloads (with pooch) only when asked::

    from deepem_jax.data import fetch
    path = fetch("deepem/HelioML_HelioML/book/04/DeepEM_Data/AIA_Resp.npy")
    path = fetch("aia/synoptic_2024-10-04/AIAsynoptic0171.fits", download=True)

The data directory is ``$DEEPEM_JAX_DATA`` when set, otherwise the user cache directory
(``pooch.os_cache("deepem_jax")``, e.g. ``~/.cache/deepem_jax`` on Linux).

Licences differ by source and some files have none (see each entry's ``licence``); none of them
ships with the package. What does ship is a small real observation for demos and examples,
:func:`sample_observation` (six AIA channels of a flaring active region at two times; provenance
and licence in ``deepem_jax/sample_data/flare_2011-02-15/README.md``).
"""

import dataclasses
import difflib
import hashlib
import os
import types
from pathlib import Path

__all__ = [
    "ENV_VAR",
    "REGISTRY",
    "ChecksumError",
    "DataFile",
    "DataFileNotFoundError",
    "data_dir",
    "fetch",
    "reference_observations",
    "sample_observation",
]

#: Environment variable naming the data directory.
ENV_VAR = "DEEPEM_JAX_DATA"


class DataFileNotFoundError(FileNotFoundError):
    """A registered file is not in the data directory (and was not downloaded)."""


class ChecksumError(ValueError):
    """A file's sha256 differs from the registry's."""


@dataclasses.dataclass(frozen=True)
class DataFile:
    """One registered file.

    ``name`` is the path relative to the data directory; ``url`` a public source at a fixed
    commit; ``sha256`` the hex digest of the exact bytes.
    """

    name: str
    sha256: str
    url: str
    licence: str
    description: str


def _github(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path.replace(' ', '%20')}"


_HELIOML = ("HelioML/HelioML", "5e5ddd869d62c7beb933c46ccf9fe0867b723980")
_HELIOML_LICENCE = "BSD-3-Clause (jupyter-book template; may not cover the chapter data)"
_WRIGHT = "PaulJWright/DeepEM"
_SYNOPTIC = ("mohithnovoct/Geomagnetic_storms-may2024-", "2350fca7f23ce0e291d7410a77b6a0f01ce1c7c5")
_SYNOPTIC_LICENCE = "NASA SDO data (public); the hosting repository has no licence file"


# Long by nature: one literal entry per registered file, nothing else.
def _entries() -> list[DataFile]:
    files = [
        DataFile(
            "deepem/HelioML_HelioML/book/04/DeepEM_Data/AIA_Resp.npy",
            "66b9eaf4d5d9610876b2e9e149ae9e281ec531d88709bcc2b8dc4932279ba6b7",
            _github(*_HELIOML, "book/04/DeepEM_Data/AIA_Resp.npy"),
            _HELIOML_LICENCE,
            "DeepEM response matrix, float32 (6, 18, 1, 1), DN cm^5 s^-1 pix^-1, "
            "channels 94..335 Å, log T 5.5..7.2",
        ),
        DataFile(
            "deepem/PaulJWright_DeepEM/DeepEM_Data/aia_temperature_resp.genx",
            "c92bc0422bd659580f91d04b85cff39ffff5907e9409343e0c78dfc36589742d",
            _github(
                _WRIGHT,
                "cdf280adb3fa48525cbd2dbb9d1a23ab26b9ef21",
                "DeepEM_Data/aia_temperature_resp.genx",
            ),
            "none (all rights reserved by default); from the unmerged PR #1",
            "SSW aia_get_response(/temp) GENX, 7 channels, log T 4..9 step 0.05",
        ),
        DataFile(
            "deepem/RobertJaro_DeepEM/data/aia_temperature_response.csv",
            "df26ee9a3732fcf3eeb6c00d1fc41071d2068debacf270bde952980cfcd40554",
            _github(
                "RobertJaro/DeepEM",
                "5f50c4f73a01c5f6a3c27ce7c52925eb6e195c68",
                "data/aia_temperature_response.csv",
            ),
            "GPL-3.0",
            "AIA temperature responses as CSV (logte,A94,...,A335), log T 4..9 step 0.05",
        ),
        DataFile(
            "deepem/HelioML_HelioML/book/04/DeepEM_CNN_HelioML.pth",
            "010a06373db560cccf4d5da3cbabfb8cac4cdd95816858f124f9cfde15bf3ba4",
            _github(*_HELIOML, "book/04/DeepEM_CNN_HelioML.pth"),
            _HELIOML_LICENCE,
            "DeepEM network weights (legacy torch pickle; never load without weights_only)",
        ),
        DataFile(
            "deepem/PaulJWright_DeepEM/DeepEM_CNN_HelioML.pth",
            "d22abd5f11aecad287c7626fd5b1451457be68e1a4eb216ca0dba0a96e966a8a",
            _github(_WRIGHT, "0389c17a68bcb8956e75ed332f0f60dd830ab69d", "DeepEM_CNN_HelioML.pth"),
            "none (all rights reserved by default)",
            "DeepEM network weights from a second training run (legacy torch pickle)",
        ),
    ]
    status = {
        "2011-01-27": "e34010e298583662763a441252f229d42bb00a15359b235ad99b1fccab03a1b7",
        "2011-02-22": "f4406a336a99db6816617de7b4a3c9d990e3fd39ddc6709c32a5696efa09bda5",
        "2011-03-20": "d41efff12f28eb589db78c8700c7837d1938953953ba54807adc41975bb6cd8f",
    }
    for date, sha in status.items():
        rel = f"book/04/DeepEM_Data/AIA_DEM_{date}.status.npy"
        files.append(
            DataFile(
                f"deepem/HelioML_HelioML/{rel}",
                sha,
                _github(*_HELIOML, rel),
                _HELIOML_LICENCE,
                f"Basis Pursuit per-pixel status (512, 512) float32 for {date}, 0 = solved",
            )
        )
    synoptic = {
        "0131": "4a07b186aec7132bb1c3a92b2ce23245301a534de9ae7f08635014b10a3e1922",
        "0171": "c390c9483dcb492e712019f443f30b172a3803ae3d44cdcb0c6ef831df27fb1a",
        "0193": "8f5415d8db86235913521802ea592853871ddc07eea172e75a71bd0f22f17004",
        "0211": "f044b899bd5aca72ecc473abddb0b6da8525020bf9d2d298a66c31a1d570a146",
        "0335": "779b45e997abc5fa5a8fb1ef505faee1196e0024998ba9d2896da52db2ea97a1",
    }
    for chan, sha in synoptic.items():
        files.append(
            DataFile(
                f"aia/synoptic_2024-10-04/AIAsynoptic{chan}.fits",
                sha,
                _github(*_SYNOPTIC, f"fits files/AIAsynoptic{chan}.fits"),
                _SYNOPTIC_LICENCE,
                f"AIA {int(chan)} Å synoptic level-1.5 image 2024-10-04 ~16:18 UTC, 1024x1024, "
                "DN per exposure (RICE-compressed)",
            )
        )
    files.append(
        DataFile(
            "aia/synoptic_2024-10-04/AIAsynoptic0094_CORRUPT.fits",
            "f81163e3b3d458c4641cb15b72fee85c003b473933e5a12998f531ea394e59b9",
            _github(*_SYNOPTIC, "fits files/AIAsynoptic0094.fits"),
            _SYNOPTIC_LICENCE,
            "AIA 94 Å synoptic image, corrupt as published (RICE data cannot be decoded): "
            "a real bad-input case",
        )
    )
    return files


#: All registered files by name (read-only).
REGISTRY: types.MappingProxyType[str, DataFile] = types.MappingProxyType(
    {f.name: f for f in _entries()}
)

_SHA_CACHE: dict[tuple[str, int, int], str] = {}

_SAMPLE_DIR = Path(__file__).parent / "sample_data" / "flare_2011-02-15"
_SAMPLE_TIMES = ("01:44", "01:46")
_SAMPLE_CHANNELS = (94, 131, 171, 193, 211, 335)


def data_dir() -> Path:
    """The data directory: ``$DEEPEM_JAX_DATA`` if set, else the user cache directory."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    import pooch

    return Path(pooch.os_cache("deepem_jax"))


def sample_observation(time: str = "01:44") -> list[Path]:
    """The six AIA level-1 files (94, 131, 171, 193, 211, 335 Å, in that order) of NOAA AR 11158
    on 2011-02-15 at ``time`` UTC ("01:44" or "01:46"), as installed with the package.

    67x67-pixel cutouts in DN per exposure, each channel with its own pointing:
    ``deepem_jax.load_aia(sample_observation())`` puts them on one pixel grid.

    Raises
    ------
    ValueError
        ``time`` is not one of the shipped times.
    FileNotFoundError
        A file is missing from the installation.
    """
    if time not in _SAMPLE_TIMES:
        raise ValueError(
            f"no sample observation at {time!r}: the package ships 2011-02-15 {_SAMPLE_TIMES} UTC"
        )
    tag = time.replace(":", "-")
    paths = []
    for chan in _SAMPLE_CHANNELS:
        found = sorted(_SAMPLE_DIR.glob(f"aia_flare_2011-02-15T{tag}-*_{chan:03d}.fits"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"expected one sample file for {chan} Å at {time} in {_SAMPLE_DIR}, found "
                f"{len(found)}: the installation is damaged; reinstall deepem_jax"
            )
        paths.append(found[0])
    return paths


#: The real observation dates of the reference data: :func:`reference_observations`.
REFERENCE_DATES = ("2011-02-15", "2024-10-04")


def reference_observations(date: str, *, rebin: int = 1) -> list:
    """The real observations of a reference date as :class:`~deepem_jax.io.AIAStack` objects:
    ``"2024-10-04"``, the synoptic set (131-335 Å; its 94 Å file is corrupt as published), or
    ``"2011-02-15"``, the ten six-channel cutout times of the X2 flare (saturated pixels
    flagged by :func:`~deepem_jax.load_aia`), read from the data directory; for 2011-02-15 the
    two shipped times (:func:`sample_observation`) when the directory does not hold them. An
    empty list when the date's files are not in the data directory.

    Raises
    ------
    ValueError
        ``date`` is not in :data:`REFERENCE_DATES`.
    """
    import astropy.units as u

    from .io import load_aia

    if date == "2024-10-04":
        five = (131, 171, 193, 211, 335)
        try:
            files = [fetch(f"aia/synoptic_2024-10-04/AIAsynoptic{c:04d}.fits") for c in five]
        except DataFileNotFoundError:
            return []
        return [load_aia(files, list(five) * u.AA, rebin=rebin)]
    if date == "2011-02-15":
        folder = data_dir() / "aia" / "flare_2011-02-15"
        if not folder.is_dir():
            return [load_aia(sample_observation(t)) for t in _SAMPLE_TIMES]
        stamps = sorted({f.name.split("T")[1][:5] for f in folder.glob("*.fits")})
        return [load_aia(sorted(folder.glob(f"*T{s}-*.fits"))) for s in stamps]
    raise ValueError(f"unknown reference date {date!r}: one of {REFERENCE_DATES}")


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _entry(name: str) -> DataFile:
    try:
        return REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(REGISTRY), n=3, cutoff=0.4)
        hint = (
            f"; did you mean {close}?"
            if close
            else f"; the {len(REGISTRY)} names are the keys of deepem_jax.data.REGISTRY"
        )
        raise KeyError(f"{name!r} is not a registered data file{hint}") from None


def fetch(name: str, *, download: bool = False, directory: str | os.PathLike | None = None) -> Path:
    """Path of the registered file ``name``, verified against its sha256.

    Parameters
    ----------
    name
        A key of :data:`REGISTRY` (the file's path relative to the data directory).
    download
        Download the file from its URL into the data directory (with pooch) if it is missing
        or its checksum is wrong. Off by default: nothing touches the network unless asked.
    directory
        Data directory to use instead of :func:`data_dir`.

    Raises
    ------
    KeyError
        ``name`` is not registered.
    DataFileNotFoundError
        The file is missing and ``download`` is False; the message says where it was looked
        for and how to get it.
    ChecksumError
        The file's sha256 differs from the registry's.
    """
    entry = _entry(name)
    root = Path(directory).expanduser() if directory is not None else data_dir()
    path = root / entry.name
    if path.is_file():
        actual = _sha256(path)
        if actual == entry.sha256:
            return path
        if not download:
            raise ChecksumError(
                f"{path} has sha256 {actual}, expected {entry.sha256} for {name!r}: the file "
                f"is damaged or a different version; delete it or call fetch({name!r}, "
                f"download=True) to fetch {entry.url}"
            )
    elif not download:
        raise DataFileNotFoundError(
            f"data file {name!r} not found at {path}. Set {ENV_VAR} to the folder that holds "
            f"it (now {os.environ.get(ENV_VAR) or 'unset'}), or call fetch({name!r}, "
            f"download=True) to download it from {entry.url}"
        )
    return _download(entry, path)


def _download(entry: DataFile, path: Path) -> Path:
    import pooch

    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        got = pooch.retrieve(
            entry.url,
            known_hash=f"sha256:{entry.sha256}",
            fname=path.name,
            path=path.parent,
            progressbar=False,
        )
    except ValueError as err:  # pooch's hash mismatch
        raise ChecksumError(f"download of {entry.url} failed verification: {err}") from err
    got = Path(got)
    actual = _sha256(got)
    if actual != entry.sha256:
        raise ChecksumError(f"{got} has sha256 {actual} after download, expected {entry.sha256}")
    return got
