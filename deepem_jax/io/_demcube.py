"""DEM/EM cubes on disk: FITS with the spatial WCS of the input plus a log T axis.

Layout of a file written by :func:`write_dem_cube`:

* primary HDU: the EM cube as a FITS image of shape ``(n_T, ny, nx)`` (numpy order), BUNIT
  ``cm-5`` (emission measure per temperature bin), WCS axes 1-2 the celestial (helioprojective)
  axes of the AIA input, axis 3 ``CTYPE3 = 'LOGT'``, dimensionless log10(T / K), linear with
  ``CRPIX3 = 1``, ``CRVAL3 = logt[0]``, ``CDELT3 = logt[1] - logt[0]``;
* one image extension per extra 2-D map (status, chi^2, ...), ``EXTNAME`` the map's name in
  upper case, with the celestial WCS and, for Quantities, a BUNIT.
"""

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.wcs import WCS

from .._atomic import atomic_write

__all__ = ["DEMCube", "read_dem_cube", "write_dem_cube"]

_EM_UNIT = u.cm**-5
_LOGT_CTYPE = "LOGT"
_EXTNAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,67}$")
# Relative tolerance on the spacing of the log T grid for it to be written as a linear axis.
_UNIFORM_RTOL = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class DEMCube:
    """A DEM cube read back from FITS.

    Attributes
    ----------
    em : Quantity, shape (ny, nx, n_T)
        Emission measure per temperature bin (cm^-5), channels-last.
    logt : ndarray, shape (n_T,)
        log10(T / K) of each bin.
    wcs : astropy.wcs.WCS
        The 3-D WCS of the file (axes x, y, log T).
    header : astropy.io.fits.Header
        The primary header (carries any ``meta`` given to :func:`write_dem_cube`).
    extras : dict
        Extra 2-D maps by lower-case name, Quantities where the extension has a BUNIT.
    """

    em: u.Quantity
    logt: np.ndarray
    wcs: WCS
    header: fits.Header
    extras: dict[str, np.ndarray | u.Quantity]

    @property
    def celestial_wcs(self) -> WCS:
        """The 2-D spatial WCS."""
        return self.wcs.celestial

    def to_ndcube(self):
        """The cube as an ``ndcube.NDCube`` of shape (n_T, ny, nx) in cm^-5 with the 3-D WCS."""
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


def _extra_hdu(name: str, value, shape: tuple[int, int], cel: fits.Header) -> fits.ImageHDU:
    if not _EXTNAME.match(name) or name.upper() == "PRIMARY":
        raise ValueError(f"extra map name {name!r} must be a FITS-safe identifier")
    unit = None
    if isinstance(value, u.Quantity):
        unit, value = value.unit, value.value
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"extra map {name!r} has shape {arr.shape}, the cube is {shape}")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    hdu = fits.ImageHDU(arr, header=cel.copy(), name=name.upper())
    if unit is not None and unit != u.dimensionless_unscaled:
        hdu.header["BUNIT"] = unit.to_string("fits")
    return hdu


@u.quantity_input
def write_dem_cube(
    path: str | os.PathLike,
    em: u.Quantity[u.cm**-5],
    logt,
    wcs: WCS,
    *,
    extras: Mapping[str, np.ndarray | u.Quantity] | None = None,
    meta: Mapping[str, object] | None = None,
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
        everywhere in deepem_jax); stored as (n_T, ny, nx) with its dtype kept.
    logt
        log10(T / K) of the bins: uniform and increasing (it becomes a linear WCS axis).
    wcs
        2-D celestial WCS of the spatial axes, e.g. :attr:`AIAStack.wcs`.
    extras
        Named 2-D maps of shape (ny, nx) (status, chi^2, ...), one image extension each.
        A Quantity's unit is stored as BUNIT and restored on reading; plain and dimensionless
        arrays come back as plain arrays.
    meta
        Extra primary-header cards (keys of at most 8 characters, FITS-compatible values).
    overwrite
        Replace an existing file; otherwise an existing ``path`` raises FileExistsError.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if em.ndim != 3:
        raise ValueError(f"em must have shape (ny, nx, n_T), got {em.shape}")
    lt, step = _logt_axis(logt)
    ny, nx, nt = em.shape
    if nt != lt.size:
        raise ValueError(f"em has {nt} temperature bins but logt has {lt.size}")
    cel = _celestial_header(wcs, ny, nx)

    header = cel.copy()
    header["WCSAXES"] = 3
    header["CTYPE3"] = (_LOGT_CTYPE, "log10(T / K), linear")
    header["CUNIT3"] = ""
    header["CRPIX3"] = 1.0
    header["CRVAL3"] = lt[0]
    header["CDELT3"] = step
    header["CNAME3"] = "log10(T/K)"
    header["BUNIT"] = (_EM_UNIT.to_string("fits"), "emission measure per log T bin")
    header["CREATOR"] = "deepem_jax"
    for key, value in (meta or {}).items():
        header[key] = value
    data = np.moveaxis(np.asarray(em.to_value(_EM_UNIT)), -1, 0)
    hdus = [fits.PrimaryHDU(np.ascontiguousarray(data), header=header)]
    hdus += [_extra_hdu(k, v, (ny, nx), cel) for k, v in (extras or {}).items()]

    with atomic_write(path) as fh:
        fits.HDUList(hdus).writeto(fh, output_verify="exception")
    return path


def read_dem_cube(path: str | os.PathLike) -> DEMCube:
    """Read a cube written by :func:`write_dem_cube` (EM in cm^-5, channels-last)."""
    path = Path(path)
    with fits.open(path, memmap=False) as hdul:
        primary = hdul[0]
        header = primary.header.copy()
        if header.get("NAXIS") != 3 or header.get("CTYPE3", "").strip() != _LOGT_CTYPE:
            raise ValueError(f"{path} is not a DEM cube (needs NAXIS = 3 and CTYPE3 = 'LOGT')")
        unit = u.Unit(header.get("BUNIT", "cm-5"))
        em = np.moveaxis(np.asarray(primary.data), 0, -1) * unit
        extras = {}
        for hdu in hdul[1:]:
            value = np.asarray(hdu.data)
            bunit = hdu.header.get("BUNIT")
            extras[hdu.name.lower()] = value * u.Unit(bunit) if bunit else value
    wcs = WCS(header)
    nt = em.shape[-1]
    logt = wcs.sub([3]).pixel_to_world_values(np.arange(nt))
    return DEMCube(em.to(_EM_UNIT), np.asarray(logt, dtype=np.float64), wcs, header, extras)
