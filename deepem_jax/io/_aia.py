"""Read co-temporal AIA EUV images into one channels-last intensity stack."""

import dataclasses
import enum
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS

from .._units import INTENSITY_UNIT
from ..response import AIA_CHANNELS

__all__ = [
    "AIA_EUV_CHANNELS",
    "AIAFileError",
    "AIAStack",
    "PixelFlag",
    "load_aia",
]

#: Every AIA EUV channel a file may hold (Å); deepem_jax solves with the six coronal ones.
AIA_EUV_CHANNELS: tuple[int, ...] = (94, 131, 171, 193, 211, 304, 335)
_FITS_SUFFIXES = (".fits", ".fts", ".fit", ".fits.gz", ".fts.gz")
# 14-bit ADC: raw AIA pixels saturate at 16383 DN; level-1 processing (dark subtraction,
# flat field) leaves saturated pixels a little below that.
_DEFAULT_SATURATION = 15000.0 * u.DN


class AIAFileError(ValueError):
    """An AIA FITS file is unreadable, truncated, corrupt or lacks a required keyword.

    The message always names the file.
    """


class PixelFlag(enum.IntFlag):
    """Per-pixel, per-channel quality bits in :attr:`AIAStack.flags`."""

    #: NaN or Inf in the input (the output pixel is NaN).
    NONFINITE = 1
    #: Negative intensity, clipped to zero (as SolarSoft does before a DEM solve).
    NEGATIVE = 2
    #: At least one input pixel at or above the saturation level (DN, before rebinning).
    SATURATED = 4


@dataclasses.dataclass(frozen=True, eq=False)
class AIAStack:
    """Co-aligned AIA images as one channels-last array.

    Attributes
    ----------
    data : ndarray, shape (ny, nx, n_channels)
        Intensities in DN s^-1 pix^-1 (float64). Negative values are clipped to 0;
        non-finite input pixels are NaN. See :attr:`flags`.
    channels : Quantity, shape (n_channels,)
        Wavelength of each channel (Å), in the order of the last axis of ``data``.
    exptime : Quantity, shape (n_channels,)
        Exposure time of each channel (s).
    obstime : Time, shape (n_channels,)
        Observation time of each channel (``T_OBS``, the exposure mid-point, when present).
    meta : dict
        FITS header of the first channel after cutout and rebinning: it carries the spatial WCS
        shared by all channels.
    n_sample : int
        Number of native pixels averaged into each output pixel (``rebin**2``), the ``n_sample``
        of :func:`deepem_jax.estimate_error`.
    flags : ndarray of uint8, shape (ny, nx, n_channels)
        Bitwise OR of :class:`PixelFlag` values.
    sources : tuple of str
        The file (or ``"map #i"``) each channel came from.
    """

    data: np.ndarray
    channels: u.Quantity
    exptime: u.Quantity
    obstime: Time
    meta: dict
    n_sample: int
    flags: np.ndarray
    sources: tuple[str, ...]

    @property
    def intensity(self) -> u.Quantity:
        """``data`` as a Quantity in DN s^-1 pix^-1."""
        return self.data * INTENSITY_UNIT

    @property
    def counts(self) -> np.ndarray:
        """Counts per exposure in DN pix^-1 (``data * exptime``), the input of the error model."""
        return self.data * self.exptime.to_value(u.s)

    @property
    def wcs(self) -> WCS:
        """The 2-D celestial WCS shared by all channels."""
        return self.reference_map().wcs

    @property
    def mask(self) -> np.ndarray:
        """(ny, nx) bool: True where any channel has a NONFINITE or SATURATED flag."""
        bad = PixelFlag.NONFINITE | PixelFlag.SATURATED
        return np.any(self.flags & bad, axis=-1)

    @property
    def masked_data(self) -> np.ndarray:
        """``data`` with NaN in every channel of the pixels in :attr:`mask` (NaN/Inf or
        saturated), so solvers flag them as invalid input rather than fit them."""
        return np.where(self.mask[..., None], np.nan, self.data)

    def sigma(self, **kwargs) -> np.ndarray:
        """AIA 1-sigma uncertainty of :attr:`data` (DN s^-1 pix^-1), from the error model with
        this stack's exposure times and ``n_sample`` (keywords go to
        :func:`deepem_jax.uncertainty.sigma_values`)."""
        from ..uncertainty import sigma_values

        return sigma_values(
            self.data, self.exptime.to_value(u.s), self.channels, self.n_sample, **kwargs
        )

    def flag_count(self, flag: PixelFlag) -> np.ndarray:
        """Number of output pixels carrying ``flag``, per channel (shape (n_channels,))."""
        return np.count_nonzero(self.flags & flag, axis=(0, 1))

    @property
    def negative_count(self) -> np.ndarray:
        """Pixels clipped from negative to zero, per channel."""
        return self.flag_count(PixelFlag.NEGATIVE)

    @property
    def nonfinite_count(self) -> np.ndarray:
        """NaN/Inf pixels, per channel."""
        return self.flag_count(PixelFlag.NONFINITE)

    @property
    def saturated_count(self) -> np.ndarray:
        """Pixels touched by saturation, per channel."""
        return self.flag_count(PixelFlag.SATURATED)

    def reference_map(self, channel: int = 0):
        """One channel as a ``sunpy.map.Map`` in DN s^-1 pix^-1 with the shared WCS."""
        import sunpy.map

        meta = dict(self.meta)
        meta.update(
            wavelnth=float(self.channels[channel].to_value(u.AA)),
            exptime=float(self.exptime[channel].to_value(u.s)),
            bunit=INTENSITY_UNIT.to_string(),
        )
        return sunpy.map.Map(self.data[..., channel], meta)


#: What :func:`load_aia` accepts: a path (file or directory), a sunpy Map, or a sequence of them.
AIAInput = str | os.PathLike | Any | Sequence[str | os.PathLike | Any]


# -- reading single inputs ----------------------------------------------------------------


def _image_hdu(path: Path, hdul: fits.HDUList):
    """The first HDU whose header describes a 2-D image (the compressed HDU of synoptic files)."""
    for hdu in hdul:
        if hdu.header.get("NAXIS") == 2 or hdu.header.get("ZNAXIS") == 2:
            return hdu
    raise AIAFileError(f"{path}: no 2-D image HDU found")


def _read_header(path: Path) -> fits.Header:
    # astropy's verification warnings (non-ASCII cards, stray padding) are not errors for the
    # header; a file that cannot be decoded fails in _read_data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with fits.open(path, memmap=False) as hdul:
                return _image_hdu(path, hdul).header.copy()
        except AIAFileError:
            raise
        except Exception as err:
            raise AIAFileError(f"{path}: not a readable FITS file ({err})") from err


def _read_data(path: Path) -> np.ndarray:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False) as hdul:
                data = np.array(_image_hdu(path, hdul).data, dtype=np.float64)
        except AIAFileError:
            raise
        except Exception as err:  # cfitsio/numpy raise assorted types on corrupt data
            raise AIAFileError(
                f"{path}: image data cannot be decoded, the file is corrupt ({err})"
            ) from err
    for w in caught:
        text = str(w.message)
        if "truncated" in text or "not multiple of 2880" in text:
            first = text.splitlines()[0]
            raise AIAFileError(f"{path}: FITS file is truncated or corrupt ({first})")
    if data.ndim != 2:
        raise AIAFileError(f"{path}: image data has shape {data.shape}, expected 2-D")
    return data


@dataclasses.dataclass
class _Source:
    """One input image: a file (data read on demand) or a Map (data given)."""

    label: str
    header: fits.Header | dict
    path: Path | None = None
    data: np.ndarray | None = None
    #: Found by scanning a directory: skipped, not an error, when its channel is not requested.
    scanned: bool = False

    def load(self) -> np.ndarray:
        if self.data is None:
            self.data = _read_data(self.path)
        return self.data


def _is_fits_name(name: str) -> bool:
    return name.lower().endswith(_FITS_SUFFIXES)


def _sources(inputs) -> list[_Source]:
    """Normalise inputs to a flat list of sources, reading only the FITS headers."""
    from sunpy.map import GenericMap

    if isinstance(inputs, str | os.PathLike | GenericMap):
        inputs = [inputs]
    out: list[_Source] = []
    for i, item in enumerate(inputs):
        if isinstance(item, GenericMap):
            out.append(_Source(f"map #{i}", item.meta, data=np.asarray(item.data)))
            continue
        if not isinstance(item, str | os.PathLike):
            raise TypeError(f"expected FITS paths, a directory or sunpy Maps, got {type(item)}")
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and _is_fits_name(f.name))
            if not files:
                raise FileNotFoundError(f"directory {p} holds no FITS files")
            out.extend(_Source(str(f), _read_header(f), path=f, scanned=True) for f in files)
        elif p.is_file():
            out.append(_Source(str(p), _read_header(p), path=p))
        else:
            raise FileNotFoundError(f"AIA input {p} does not exist")
    if not out:
        raise ValueError("no AIA inputs given")
    return out


def _channel_of(src: _Source) -> int:
    inst = " ".join(str(src.header.get(k) or "") for k in ("TELESCOP", "INSTRUME"))
    if "AIA" not in inst.upper():
        raise ValueError(
            f"{src.label}: not an SDO/AIA image (TELESCOP/INSTRUME = {inst.strip()!r})"
        )
    wav = src.header.get("WAVELNTH")
    if wav is None:
        raise AIAFileError(f"{src.label}: header has no WAVELNTH keyword")
    chan = int(round(float(wav)))
    if chan not in AIA_EUV_CHANNELS:
        raise ValueError(
            f"{src.label}: channel {chan} Å is not an AIA EUV channel {AIA_EUV_CHANNELS}"
        )
    return chan


def _exptime_of(src: _Source) -> float:
    t = src.header.get("EXPTIME")
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise AIAFileError(f"{src.label}: missing or non-numeric EXPTIME ({t!r})") from None
    if not np.isfinite(t) or t <= 0:
        raise AIAFileError(f"{src.label}: EXPTIME = {t} s; it must be positive")
    return t


def _per_second(src: _Source) -> bool:
    """True if the image is already in DN/s (BUNIT), False if in DN per exposure."""
    text = src.header.get("BUNIT") or src.header.get("PIXLUNIT") or "DN"
    try:
        unit = u.Unit(str(text).strip())
    except ValueError:
        raise AIAFileError(f"{src.label}: cannot parse BUNIT {text!r}") from None
    if unit.is_equivalent(u.DN) or unit.is_equivalent(u.DN / u.pix):
        return False
    if unit.is_equivalent(u.DN / u.s) or unit.is_equivalent(INTENSITY_UNIT):
        return True
    raise AIAFileError(f"{src.label}: BUNIT {text!r} is neither DN nor DN/s (per pixel)")


def _select(sources: list[_Source], wanted: list[int]) -> list[_Source]:
    """The source of each wanted channel, in the order of ``wanted``."""
    by_chan: dict[int, _Source] = {}
    for src in sources:
        chan = _channel_of(src)
        if chan not in wanted:
            if src.scanned:
                continue  # a directory may hold other channels; they are simply not used
            raise ValueError(f"{src.label}: channel {chan} Å was not requested ({wanted} Å)")
        if chan in by_chan:
            raise ValueError(f"channel {chan} Å given twice: {by_chan[chan].label} and {src.label}")
        by_chan[chan] = src
    missing = [c for c in wanted if c not in by_chan]
    if missing:
        found = sorted(by_chan)
        raise ValueError(f"AIA channel(s) {missing} Å missing from the inputs (found {found} Å)")
    return [by_chan[c] for c in wanted]


def _obstime(src: _Source) -> Time:
    for key in ("T_OBS", "DATE-OBS", "DATE_OBS"):
        val = src.header.get(key)
        if val:
            try:
                return Time(str(val).rstrip("Z"), scale="utc")
            except ValueError:
                raise AIAFileError(f"{src.label}: cannot parse {key} = {val!r}") from None
    raise AIAFileError(f"{src.label}: header has neither T_OBS nor DATE-OBS")


def _check_geometry(maps, labels: Sequence[str], tol_pix: float) -> None:
    ref = maps[0]
    ny, nx = ref.data.shape
    corners = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [nx / 2, ny / 2]])
    ref_world = ref.wcs.wcs_pix2world(corners, 0)
    scale = np.abs(ref.scale.axis1.to_value(u.deg / u.pix))
    for m, label in zip(maps[1:], labels[1:], strict=True):
        if m.data.shape != ref.data.shape:
            raise ValueError(
                f"{label}: image shape {m.data.shape} differs from {labels[0]} {ref.data.shape}"
            )
        world = m.wcs.wcs_pix2world(corners, 0)
        diff = (world - ref_world + 180.0) % 360.0 - 180.0  # longitudes wrap at 360 deg
        off = np.max(np.abs(diff)) / scale
        if off > tol_pix:
            raise ValueError(
                f"{label}: pointing differs from {labels[0]} by {off:.3g} pixels "
                f"(tolerance {tol_pix} pix); co-align level-1 images first "
                "(aiapy.calibrate.update_pointing and register)"
            )


def _cutout_bounds(ref, cutout) -> tuple[slice, slice]:
    """Pixel slices (y, x) of ``ref`` covering a (bottom_left, top_right) SkyCoord rectangle.

    Helioprojective corners are placed by their (Tx, Ty) directly: the observer of co-temporal
    AIA images differs by seconds, so no frame transformation (which fails off the disk) is made.
    Other frames are transformed into the frame of ``ref``.
    """
    from sunpy.coordinates import Helioprojective

    try:
        bottom_left, top_right = cutout
    except (TypeError, ValueError):
        raise TypeError("cutout must be a (bottom_left, top_right) pair of SkyCoord") from None
    if not (isinstance(bottom_left, SkyCoord) and isinstance(top_right, SkyCoord)):
        raise TypeError("cutout corners must be SkyCoord instances")
    lon, lat = [], []
    for corner in (bottom_left, top_right):
        if not isinstance(corner.frame, Helioprojective):
            corner = corner.transform_to(ref.coordinate_frame)
        lon.append(corner.spherical.lon.to_value(u.deg))
        lat.append(corner.spherical.lat.to_value(u.deg))
    # All four corners of the rectangle, so a rotated image is cut generously.
    px, py = ref.wcs.wcs_world2pix(np.array([lon, lon[::-1]]).ravel(), np.repeat(lat, 2), 0)
    if not (np.all(np.isfinite(px)) and np.all(np.isfinite(py))):
        raise ValueError(f"cutout corners {bottom_left}, {top_right} do not map onto the image")
    ny, nx = ref.data.shape
    x0, x1 = np.clip(np.round([px.min(), px.max()]).astype(int), 0, nx - 1)
    y0, y1 = np.clip(np.round([py.min(), py.max()]).astype(int), 0, ny - 1)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"cutout {bottom_left}, {top_right} does not overlap the image")
    return slice(y0, y1 + 1), slice(x0, x1 + 1)


def _block_reduce(a: np.ndarray, n: int, op) -> np.ndarray:
    """Reduce (ny, nx, ...) over n x n blocks with ``op``; ny and nx are multiples of n."""
    ny, nx = a.shape[0] // n, a.shape[1] // n
    return op(a.reshape(ny, n, nx, n, *a.shape[2:]), axis=(1, 3))


@u.quantity_input
def load_aia(
    inputs: AIAInput,
    channels: u.Quantity[u.AA] = AIA_CHANNELS,
    *,
    time_tolerance: u.Quantity[u.s] = 60 * u.s,
    pointing_tolerance: u.Quantity[u.pix] = 0.1 * u.pix,
    rebin: int = 1,
    cutout: tuple[SkyCoord, SkyCoord] | None = None,
    saturation_level: u.Quantity[u.DN] = _DEFAULT_SATURATION,
) -> AIAStack:
    """Load co-temporal AIA EUV images into one (ny, nx, n_channels) stack in DN s^-1 pix^-1.

    Parameters
    ----------
    inputs
        A FITS file, a directory of FITS files, a ``sunpy.map.Map``, or a sequence of files and
        Maps. Level-1.5 (co-aligned) images; level 1 works when the channels share pointing.
        In a directory, files of AIA channels that were not requested are ignored; an explicitly
        given input whose channel was not requested is an error.
    channels
        Channels to return, in this order (Å). Default: 94, 131, 171, 193, 211, 335.
    time_tolerance
        Largest allowed spread of the observation times (s).
    pointing_tolerance
        Largest allowed difference of the channels' WCS at the image corners and centre (pixels).
    rebin
        ``n``: average ``n x n`` blocks (the image is trimmed to a multiple of ``n``);
        :attr:`AIAStack.n_sample` is then ``n**2``.
    cutout
        ``(bottom_left, top_right)`` SkyCoord corners, applied before rebinning.
    saturation_level
        Pixels with at least this many DN per exposure (before rebinning) get
        :attr:`PixelFlag.SATURATED`.

    Units: images in DN per exposure (BUNIT ``DN``, ``DN/pix`` or absent) are divided by
    ``EXPTIME``; images whose BUNIT is ``DN/s`` (per pixel or not) are used as they are.
    ``EXPTIME`` must be positive in both cases (the error model needs the counts).
    Negative pixels are clipped to 0 after rebinning and flagged; NaN/Inf pixels become NaN and
    are flagged.

    Raises
    ------
    AIAFileError
        A file is unreadable, truncated or corrupt, or lacks/has a bad EXPTIME, WAVELNTH, time
        or BUNIT; the message names the file.
    ValueError
        A channel is missing, duplicated or not an AIA EUV channel, or the images differ in
        shape, pointing or time beyond the tolerances.
    """
    import sunpy.map

    wanted = [int(round(c)) for c in np.atleast_1d(channels.to_value(u.AA))]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"duplicate channels requested: {wanted} Å")
    bad = [c for c in wanted if c not in AIA_EUV_CHANNELS]
    if bad:
        raise ValueError(f"requested channel(s) {bad} Å are not AIA EUV channels")
    if not isinstance(rebin, int | np.integer) or rebin < 1:
        raise ValueError(f"rebin must be a positive integer, got {rebin!r}")
    rebin = int(rebin)

    srcs = _select(_sources(inputs), wanted)
    labels = [s.label for s in srcs]
    exptime = np.array([_exptime_of(s) for s in srcs])
    per_second = [_per_second(s) for s in srcs]
    times = Time([_obstime(s) for s in srcs])
    spread = (times.max() - times.min()).to(u.s)
    if spread > time_tolerance:
        first, last = labels[int(np.argmin(times.jd))], labels[int(np.argmax(times.jd))]
        raise ValueError(
            f"observation times span {spread:.1f} (> {time_tolerance}): {first} at "
            f"{times.min().isot}, {last} at {times.max().isot}"
        )

    maps = [sunpy.map.Map(s.load(), s.header) for s in srcs]
    _check_geometry(maps, labels, float(pointing_tolerance.to_value(u.pix)))

    ys, xs = slice(None), slice(None)
    ref = maps[0]
    if cutout is not None:
        ys, xs = _cutout_bounds(ref, cutout)
    raw = np.stack([m.data[ys, xs] for m in maps], axis=-1)
    if raw.shape[0] < rebin or raw.shape[1] < rebin:
        raise ValueError(f"image of shape {raw.shape[:2]} is smaller than rebin={rebin}")
    ny, nx = (raw.shape[0] // rebin) * rebin, (raw.shape[1] // rebin) * rebin
    raw = raw[:ny, :nx]
    ref = ref.submap(
        [xs.start or 0, ys.start or 0] * u.pix,
        top_right=[(xs.start or 0) + nx - 1, (ys.start or 0) + ny - 1] * u.pix,
    )
    if rebin > 1:
        ref = ref.superpixel((rebin, rebin) * u.pix, func=np.mean)

    finite = np.isfinite(raw)
    sat_dn = saturation_level.to_value(u.DN)
    counts_dn = np.where(per_second, raw * exptime, raw)
    saturated = finite & (counts_dn >= sat_dn)
    rate = np.where(finite, np.where(per_second, raw, raw / exptime), np.nan)
    if rebin > 1:
        rate = _block_reduce(rate, rebin, np.mean)
        saturated = _block_reduce(saturated, rebin, np.any)
    negative = rate < 0
    data = np.where(negative, 0.0, rate)
    flags = (
        np.isnan(data) * PixelFlag.NONFINITE
        + negative * PixelFlag.NEGATIVE
        + saturated * PixelFlag.SATURATED
    ).astype(np.uint8)

    return AIAStack(
        data=data,
        channels=np.array(wanted) * u.AA,
        exptime=exptime * u.s,
        obstime=times,
        meta=dict(ref.meta),
        n_sample=rebin**2,
        flags=flags,
        sources=tuple(labels),
    )
