"""Instrument calibration at the observation time: AIA's time-dependent degradation.

The degradation factor ``f(channel, t)`` (dimensionless) is the channel's effective area at time
``t`` divided by its effective area at the first calibration epoch, evaluated from a correction
table in SolarSoft's ``aia_V*_response_table.txt`` format with
:func:`aiapy.calibrate.degradation`. A response degraded to ``t`` is ``diag(f) @ K``.

deepem_jax ships aiapy's calibration-version-10 table (:data:`DEFAULT_CORRECTION_TABLE`), so the
correction is computed offline; pass another table file (for example a newer version from
SolarSoft ``sdo/aia/response/``) as ``correction_table`` to use it instead. Every result records
the table's file name and calibration version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.table import QTable
from astropy.time import Time
from erfa import ErfaWarning

from ._units import channel_list

__all__ = ["DEFAULT_CORRECTION_TABLE", "Degradation", "degradation"]

#: The shipped AIA degradation correction table (calibration version 10).
DEFAULT_CORRECTION_TABLE: Path = Path(
    str(resources.files("deepem_jax") / "tables" / "aia_V10_20201119_190000_response_table.txt")
)


@dataclasses.dataclass(frozen=True, eq=False)
class Degradation:
    """Degradation factors of a set of AIA channels at their observation times.

    Attributes
    ----------
    channels : tuple of int
        Channel wavelengths in Angstrom.
    factors : ndarray, shape (n_channels,)
        Dimensionless degradation factor per channel (read-only float64).
    obstime : tuple of str
        UTC observation time per channel, ISO 8601 (``YYYY-MM-DDThh:mm:ss.sss``).
    table : str
        File name of the correction table the factors come from.
    version : int
        Calibration version (``VER_NUM``) of the table rows used.
    """

    channels: tuple[int, ...]
    factors: np.ndarray
    obstime: tuple[str, ...]
    table: str
    version: int

    def __post_init__(self) -> None:
        factors = np.array(self.factors, dtype=np.float64)
        n = len(self.channels)
        if factors.shape != (n,) or len(self.obstime) != n:
            raise ValueError(
                f"{n} channels need {n} factors and {n} times; got factors of shape "
                f"{factors.shape} and {len(self.obstime)} times"
            )
        factors.setflags(write=False)
        object.__setattr__(self, "factors", factors)

    @property
    def label(self) -> str:
        """Short description, e.g. ``"V10 @ 2024-10-04T16:18"`` (times to the minute, UTC)."""
        times = ",".join(dict.fromkeys(t[:16] for t in self.obstime))
        return f"V{self.version} @ {times}"

    def to_header(self) -> dict[str, tuple[str | int | float, str]]:
        """FITS cards recording the correction, as ``{keyword: (value, comment)}``.

        ``DEGTABLE`` (table file name), ``DEGVER`` (calibration version), ``DEGTIME`` (UTC time
        of the factors; one ``DEGTnnnn`` per channel instead when the channels' times differ) and
        one ``DEGFnnnn`` per channel (its factor; ``nnnn`` is the wavelength in Å, zero-padded).
        Ready for ``astropy.io.fits.Header.update``.
        """
        header: dict[str, tuple[str | int | float, str]] = {
            "DEGTABLE": (self.table, "AIA degradation table"),
            "DEGVER": (self.version, "calibration version of DEGTABLE"),
        }
        if len(set(self.obstime)) == 1:
            header["DEGTIME"] = (self.obstime[0], "[UTC] time of the degradation factors")
        else:
            for c, t in zip(self.channels, self.obstime, strict=True):
                header[f"DEGT{c:04d}"] = (t, f"[UTC] time of the {c} A degradation factor")
        for c, f in zip(self.channels, self.factors, strict=True):
            header[f"DEGF{c:04d}"] = (float(f), f"degradation factor of {c} A (dimensionless)")
        return header


def degradation(
    channels: u.Quantity,
    obstime: Time | str | Sequence[str],
    correction_table: str | os.PathLike | None = None,
) -> Degradation:
    """aiapy's time-dependent degradation factor of each channel at its observation time.

    Parameters
    ----------
    channels : Quantity
        Channel wavelengths (convertible to Å), any AIA channel the table covers.
    obstime : time-like
        Anything :class:`astropy.time.Time` accepts, taken as UTC: one time for all channels or
        one per channel.
    correction_table : path, optional
        Correction table file in SolarSoft's ``aia_V*_response_table.txt`` format;
        ``None`` uses :data:`DEFAULT_CORRECTION_TABLE`. Only this file is read (no network).
        When it holds rows of several calibration versions, only the highest version is used.

    Raises
    ------
    FileNotFoundError
        If the table file does not exist.
    ValueError
        If the table cannot be parsed, a channel is not in it, a time falls outside its epochs,
        a factor is not finite and positive, or ``obstime`` has the wrong length.
    """
    chans = channel_list(channels)
    if not chans or len(set(chans)) != len(chans):
        raise ValueError(f"channels must be non-empty and distinct, got {chans}")
    path = Path(DEFAULT_CORRECTION_TABLE if correction_table is None else correction_table)
    # ERFA calls UTC after the last known leap second "dubious"; the tables run to 2030.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErfaWarning)
        times = _obstimes(obstime, len(chans))
        table, version = _read_table(path)
        factors = [_factor(c, t, table, path.name) for c, t in zip(chans, times, strict=True)]
        isot = tuple(t.isot for t in times)
    return Degradation(tuple(chans), np.array(factors), isot, path.name, version)


def _obstimes(obstime: Time | str | Sequence[str], n: int) -> list[Time]:
    times = Time(obstime, scale="utc")
    if times.ndim == 0:
        return [times] * n
    if times.shape == (n,):
        return list(times)
    raise ValueError(f"obstime has shape {times.shape}; give one time or one per channel ({n})")


@contextlib.contextmanager
def _root_logging_kept() -> Iterator[None]:
    """Put the root logger's handlers and level back as they were on leaving. Importing aiapy's
    calibration imports ``drms``, which calls ``logging.basicConfig(level=INFO)``: an
    application that had not set up logging would then print every library's INFO records
    (JAX's among them)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _read_table(path: Path) -> tuple[QTable, int]:
    """The rows of the highest calibration version in ``path`` (an astropy QTable) and that
    version."""
    with _root_logging_kept():
        from aiapy.calibrate.util import get_correction_table

    if not path.is_file():
        raise FileNotFoundError(f"AIA degradation correction table {path} does not exist")
    try:
        table = get_correction_table(path)
        version = int(np.max(table["VER_NUM"]))
    except Exception as err:  # astropy.io.ascii and column selection raise assorted errors
        raise ValueError(
            f"cannot read AIA degradation correction table {path}: {type(err).__name__}: {err}"
        ) from err
    return table[table["VER_NUM"] == version], version


def _factor(channel: int, time: Time, table: QTable, table_name: str) -> float:
    with _root_logging_kept():
        from aiapy.calibrate import degradation as aiapy_degradation

    try:
        f = aiapy_degradation(channel * u.AA, time, correction_table=table)
    except ValueError as err:
        raise ValueError(
            f"no degradation factor for {channel} Å at {time.isot} from {table_name}: {err}"
        ) from err
    value = float(np.ravel(u.Quantity(f).to_value(u.dimensionless_unscaled))[0])
    if not (np.isfinite(value) and value > 0):
        raise ValueError(
            f"{table_name} gives degradation factor {value} for {channel} Å at {time.isot}; "
            "expected a finite positive number (the time may be beyond the table's calibrated "
            "epochs)"
        )
    return value
