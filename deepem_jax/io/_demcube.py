"""DEM/EM cubes on disk: FITS with the spatial WCS of the input plus a log T axis.

Layout of a file written by :func:`write_dem_cube`:

* primary HDU: the EM cube as a FITS image of shape ``(n_T, ny, nx)`` (numpy order), float32
  unless asked otherwise, BUNIT ``cm-5`` (emission measure per temperature bin), WCS axes 1-2
  the celestial (helioprojective) axes of the AIA input, axis 3 ``CTYPE3 = 'LOGT'``,
  dimensionless log10(T / K), linear with ``CRPIX3 = 1``, ``CRVAL3 = logt[0]``,
  ``CDELT3 = logt[1] - logt[0]``;
* provenance in the primary header, one ``HIERARCH DEEPEM <NAME>`` card per entry (``NAME``
  the entry's name in upper case): strings, booleans, integers, None and floats that FITS
  holds exactly are plain card values; anything else (sequences, mappings, non-finite or long
  floats, non-ASCII text) is JSON text with the card comment ``JSON``. The deepem_jax version
  that wrote the file is always there (``DEEPEM_JAX_VERSION``);
* one image extension per extra map, ``EXTNAME`` the map's name in upper case: 2-D maps
  (status, chi^2, ...) with the celestial WCS, 3-D maps laid out like the cube (e.g. EM
  uncertainties, stored ``(n_T, ny, nx)``) with the 3-D WCS, and for Quantities a BUNIT.
  Integer maps keep their integer type.

Astropy maps no FITS CTYPE to a temperature, so the WCS that :func:`read_dem_cube` returns
gives the ``LOGT`` axis the physical type ``phys.temperature`` itself; ndcube then finds it by
name (``cube.to_ndcube().axis_world_coords("temperature")``, in log10(T / K)). A plain
``astropy.wcs.WCS`` of the same header gets it inside
``astropy.wcs.wcsapi.fitswcs.custom_ctype_to_ucd_mapping({"LOGT": "phys.temperature"})``.
"""

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from numpy.typing import DTypeLike

from .._atomic import atomic_write

__all__ = ["DEMCube", "read_dem_cube", "write_dem_cube"]

_EM_UNIT = u.cm**-5
_LOGT_CTYPE = "LOGT"
_LOGT_UCD = "phys.temperature"
_EXTNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,67}$")
_PROVENANCE_KEY = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_PROVENANCE_PREFIX = "DEEPEM "
_JSON_COMMENT = "JSON"
_VERSION_KEY = "deepem_jax_version"
# Relative tolerance on the spacing of the log T grid for it to be written as a linear axis.
_UNIFORM_RTOL = 1e-6
# astropy writes a float card value with at most this many characters (more are cut off).
_FITS_FLOAT_CHARS = 20


class _DEMWCS(WCS):
    """An astropy WCS whose ``LOGT`` axis has the physical type ``phys.temperature``."""

    @property
    def world_axis_physical_types(self) -> list[str | None]:
        types = super().world_axis_physical_types
        return [
            _LOGT_UCD if ctype.strip() == _LOGT_CTYPE else t
            for ctype, t in zip(self.wcs.ctype, types, strict=True)
        ]


@dataclasses.dataclass(frozen=True, eq=False)
class DEMCube:
    """A DEM cube read back from FITS.

    Attributes
    ----------
    em : Quantity, shape (ny, nx, n_T)
        Emission measure per temperature bin (cm^-5), channels-last, in the file's float type.
    logt : ndarray, shape (n_T,)
        log10(T / K) of each bin.
    wcs : astropy.wcs.WCS
        The 3-D WCS of the file (axes x, y, log T); the log T axis has the physical type
        ``phys.temperature`` (world values log10(T / K)).
    header : astropy.io.fits.Header
        The primary header (carries any ``meta`` given to :func:`write_dem_cube`).
    extras : dict
        Extra maps by lower-case name: 2-D maps (ny, nx) and cube-shaped maps (ny, nx, n_T),
        Quantities where the extension has a BUNIT.
    provenance : dict
        The provenance given to :func:`write_dem_cube` by name, with ``deepem_jax_version``;
        sequences come back as lists.
    """

    em: u.Quantity
    logt: np.ndarray
    wcs: WCS
    header: fits.Header
    extras: dict[str, np.ndarray | u.Quantity]
    provenance: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def celestial_wcs(self) -> WCS:
        """The 2-D spatial WCS."""
        return self.wcs.celestial

    def to_ndcube(self):
        """The cube as an ``ndcube.NDCube`` of shape (n_T, ny, nx) in cm^-5 with the 3-D WCS
        (its log T axis is found by the name ``"temperature"``)."""
        from ndcube import NDCube

        data = np.moveaxis(self.em.to_value(_EM_UNIT), -1, 0)
        return NDCube(data, wcs=self.wcs, unit=_EM_UNIT, meta=dict(self.header))


def _logt_axis(logt) -> tuple[np.ndarray, float]:
    lt = np.asarray(logt, dtype=np.float64)
    if lt.ndim != 1 or lt.size < 2 or not np.all(np.isfinite(lt)):
        raise ValueError("logt must be a finite 1-D grid with at least two points")
    step = np.diff(lt)
    if not np.all(step > 0) or np.ptp(step) > _UNIFORM_RTOL * abs(step[0]):
        raise ValueError("logt must be uniformly spaced and increasing to form a linear FITS axis")
    return lt, float(step.mean())


def _celestial_header(wcs: WCS, ny: int, nx: int) -> fits.Header:
    if not isinstance(wcs, WCS) or wcs.naxis != 2 or not wcs.has_celestial:
        raise TypeError("wcs must be a 2-D celestial astropy WCS (e.g. AIAStack.wcs)")
    if wcs.pixel_shape is not None and tuple(wcs.pixel_shape) != (nx, ny):
        raise ValueError(
            f"wcs describes an image of (nx, ny) = {wcs.pixel_shape}, data is {(nx, ny)}"
        )
    return wcs.to_header()


def _cube_header(cel: fits.Header, lt: np.ndarray, step: float) -> fits.Header:
    header = cel.copy()
    header["WCSAXES"] = 3
    header["CTYPE3"] = (_LOGT_CTYPE, "log10(T / K), linear")
    header["CUNIT3"] = ""
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = lt[0]
    header["CDELT3"] = step
    header["CNAME3"] = "log10(T/K)"
    return header


def dem_wcs(wcs: WCS, logt, ny: int, nx: int) -> WCS:
    """The 3-D WCS (x, y, log T) of a DEM cube of ``ny x nx`` pixels with the 2-D celestial
    ``wcs`` and the uniform grid ``logt``; its log T axis has the physical type
    ``phys.temperature``."""
    lt, step = _logt_axis(logt)
    return _DEMWCS(_cube_header(_celestial_header(wcs, ny, nx), lt, step))


def _float_dtype(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64 (FITS BITPIX -32/-64), got {dt}")
    return dt


def _on_disk(name: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as stored: booleans as uint8, integers unchanged, floats as ``dtype``."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        return arr
    if arr.dtype.kind != "f":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if np.any((np.abs(arr) > np.finfo(dtype).max) & np.isfinite(arr)):
        raise ValueError(f"{name} has finite values beyond the {dtype} range; write dtype=float64")
    return arr.astype(dtype)


def _extra_hdu(
    name: str,
    value,
    cube_shape: tuple[int, int, int],
    headers: tuple[fits.Header, fits.Header],
    dtype: np.dtype,
) -> fits.ImageHDU:
    if not _EXTNAME.match(name) or name.upper() == "PRIMARY":
        raise ValueError(f"extra map name {name!r} must be a FITS-safe identifier")
    unit = None
    if isinstance(value, u.Quantity):
        unit, value = value.unit, value.value
    arr = np.asarray(value)
    if arr.shape == cube_shape[:2]:
        header = headers[0]
    elif arr.shape == cube_shape:
        arr, header = np.moveaxis(arr, -1, 0), headers[1]
    else:
        raise ValueError(
            f"extra map {name!r} has shape {arr.shape}, the cube is {cube_shape[:2]} "
            f"(2-D maps) or {cube_shape} (per temperature bin)"
        )
    arr = np.ascontiguousarray(_on_disk(f"extra map {name!r}", arr, dtype))
    hdu = fits.ImageHDU(arr, header=header.copy(), name=name.upper())
    if unit is not None and unit != u.dimensionless_unscaled:
        hdu.header["BUNIT"] = unit.to_string("fits")
    return hdu


def _json_default(value):
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _provenance_card(key: str, value) -> tuple[str, object, str]:
    """(keyword, value, comment) of the card holding one provenance entry."""
    if not isinstance(key, str) or not _PROVENANCE_KEY.match(key):
        raise ValueError(
            f"provenance name {key!r} must be a lower-case identifier of at most 40 characters"
        )
    keyword = f"HIERARCH {_PROVENANCE_PREFIX}{key.upper()}"
    if isinstance(value, np.generic):
        value = value.item()
    native = (
        value is None
        or isinstance(value, bool)
        or (
            isinstance(value, str)
            and value.isascii()
            and value.isprintable()
            and value == value.rstrip()  # FITS drops trailing blanks
        )
        or (isinstance(value, int) and -(2**63) <= value < 2**63)
        or (
            isinstance(value, float)
            and math.isfinite(value)
            and len(str(value)) <= _FITS_FLOAT_CHARS
        )
    )
    if native:
        return keyword, value, ""
    try:
        return keyword, json.dumps(value, default=_json_default), _JSON_COMMENT
    except (TypeError, ValueError) as err:
        raise TypeError(f"provenance {key!r} cannot be stored: {err}") from err


def _read_provenance(header: fits.Header) -> dict[str, object]:
    out = {}
    for card in header.cards:
        if card.keyword.startswith(_PROVENANCE_PREFIX):
            key = card.keyword[len(_PROVENANCE_PREFIX) :].lower()
            value = None if isinstance(card.value, fits.card.Undefined) else card.value
            out[key] = json.loads(value) if card.comment == _JSON_COMMENT else value
    return out


def _native_order(arr: np.ndarray) -> np.ndarray:
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


@u.quantity_input
def write_dem_cube(
    path: str | os.PathLike,
    em: u.Quantity[u.cm**-5],
    logt,
    wcs: WCS,
    *,
    extras: Mapping[str, np.ndarray | u.Quantity] | None = None,
    meta: Mapping[str, object] | None = None,
    provenance: Mapping[str, object] | None = None,
    dtype: DTypeLike = np.float32,
    overwrite: bool = False,
) -> Path:
    """Write an EM cube to FITS atomically and return its path.

    Parameters
    ----------
    path
        Destination file. It is written to a temporary file in the same directory and moved
        into place, so a reader never sees a partial file.
    em
        Emission measure per temperature bin, shape (ny, nx, n_T), in cm^-5 (channels-last, as
        everywhere in deepem_jax); stored as (n_T, ny, nx).
    logt
        log10(T / K) of the bins: uniform and increasing (it becomes a linear WCS axis).
    wcs
        2-D celestial WCS of the spatial axes, e.g. :attr:`AIAStack.wcs`.
    extras
        Named maps, one image extension each: 2-D (ny, nx) (status, chi^2, ...) or shaped like
        ``em``, (ny, nx, n_T) (e.g. EM uncertainties). A Quantity's unit is stored as BUNIT and
        restored on reading; plain and dimensionless arrays come back as plain arrays. Integer
        maps keep their type, booleans are stored as uint8.
    meta
        Extra primary-header cards (keys of at most 8 characters, FITS-compatible values).
    provenance
        How the cube was made (e.g. ``method``, ``tolfac``, ``rebin``, ``n_sample``,
        ``response_name``, ``response_sha256``, ``degradation_table``,
        ``degradation_factors``, ``weights_sha256``): names are lower-case identifiers of at
        most 40 characters, values anything JSON can hold (numpy arrays and scalars included).
        Read back as :attr:`DEMCube.provenance`. ``deepem_jax_version`` is always set to the
        version writing the file.
    dtype
        Float type on disk of ``em`` and of floating-point extras: float32 (default) or
        float64. Finite values beyond its range raise ValueError.
    overwrite
        Replace an existing file; otherwise an existing ``path`` raises FileExistsError.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    dt = _float_dtype(dtype)
    if em.ndim != 3:
        raise ValueError(f"em must have shape (ny, nx, n_T), got {em.shape}")
    lt, step = _logt_axis(logt)
    ny, nx, nt = em.shape
    if nt != lt.size:
        raise ValueError(f"em has {nt} temperature bins but logt has {lt.size}")
    cel = _celestial_header(wcs, ny, nx)
    cube = _cube_header(cel, lt, step)
    prov = {**(provenance or {}), _VERSION_KEY: importlib.metadata.version("deepem_jax")}
    cards = [_provenance_card(k, v) for k, v in prov.items()]

    header = cube.copy()
    header["BUNIT"] = (_EM_UNIT.to_string("fits"), "emission measure per log T bin")
    header["CREATOR"] = "deepem_jax"
    for key, value in (meta or {}).items():
        header[key] = value
    for keyword, value, comment in cards:
        header[keyword] = (value, comment)
    data = np.moveaxis(np.asarray(em.to_value(_EM_UNIT)), -1, 0)
    data = np.ascontiguousarray(_on_disk("em", data, dt))
    hdus = [fits.PrimaryHDU(data, header=header)]
    hdus += [_extra_hdu(k, v, (ny, nx, nt), (cel, cube), dt) for k, v in (extras or {}).items()]

    with atomic_write(path) as fh:
        fits.HDUList(hdus).writeto(fh, output_verify="exception")
    return path


def read_dem_cube(path: str | os.PathLike) -> DEMCube:
    """Read a cube written by :func:`write_dem_cube` (EM in cm^-5, channels-last, in the
    file's float type; extras and provenance as written).

    ``ValueError`` naming the file if it is not a DEM cube, or is truncated or corrupt;
    ``OSError`` (e.g. ``FileNotFoundError``) if it cannot be opened."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # astropy only warns on a truncated file
        try:
            cube = _read_cube(path)
        except _NotACube:
            raise
        except (ValueError, TypeError, KeyError, IndexError, OSError) as err:
            if isinstance(err, OSError) and not os.path.isfile(path):
                raise  # missing, a directory, no permission: not the file's content
            _raise_if_truncated(path, caught)
            raise ValueError(
                f"{path}: not a readable DEM cube, the file is corrupt ({type(err).__name__}: "
                f"{err})"
            ) from err
    _raise_if_truncated(path, caught)
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cube


def _raise_if_truncated(path: Path, caught: list[warnings.WarningMessage]) -> None:
    for w in caught:
        text = str(w.message)
        if "truncated" in text or "not multiple of 2880" in text:
            raise ValueError(f"{path}: DEM cube file is truncated ({text.splitlines()[0]})")


class _NotACube(ValueError):
    """A readable FITS file that is not a DEM cube."""


def _read_cube(path: Path) -> DEMCube:
    """:func:`read_dem_cube` without its error translation."""
    with fits.open(path, memmap=False) as hdul:
        primary = hdul[0]
        header = primary.header.copy()
        if header.get("NAXIS") != 3 or header.get("CTYPE3", "").strip() != _LOGT_CTYPE:
            raise _NotACube(f"{path} is not a DEM cube (needs NAXIS = 3 and CTYPE3 = 'LOGT')")
        unit = u.Unit(header.get("BUNIT", "cm-5"))
        em = np.moveaxis(_native_order(np.asarray(primary.data)), 0, -1) * unit
        extras = {}
        for hdu in hdul[1:]:
            value = _native_order(np.asarray(hdu.data))
            if value.ndim == 3:
                value = np.moveaxis(value, 0, -1)
            bunit = hdu.header.get("BUNIT")
            extras[hdu.name.lower()] = value * u.Unit(bunit) if bunit else value
    wcs = _DEMWCS(header)
    nt = em.shape[-1]
    logt = wcs.sub([3]).pixel_to_world_values(np.arange(nt))
    return DEMCube(
        em.to(_EM_UNIT),
        np.asarray(logt, dtype=np.float64),
        wcs,
        header,
        extras,
        _read_provenance(header),
    )
