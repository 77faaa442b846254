"""Read co-temporal AIA EUV images into one channels-last intensity stack."""

import dataclasses
import enum
import gzip
import io
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.coordinates import SkyCoord
from astropy.io import fits
from astropy.io.fits.verify import VerifyError
from astropy.time import Time
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_area
from scipy.ndimage import map_coordinates

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
# 14-bit ADC: raw AIA pixels saturate at 16383 DN; the dark and flat-field corrections of
# level 1 move saturated pixels below that by a channel-dependent amount, to as low as
# 13,600 DN (the README's "Saturated pixels" has the measurement).
_DEFAULT_SATURATION = 13500.0 * u.DN
#: Nominal plate scale of the AIA CCDs (arcsec per level-1 pixel), used without IMSCL_MP.
_AIA_NATIVE_SCALE = 0.6
# Relative tolerance for IMSCL_MP to be AIA's native scale (the four telescopes have
# 0.5995-0.6008) and for a plate-scale ratio to be a whole binning factor.
_SCALE_RTOL = 0.02
_GZIP_MAGIC = b"\x1f\x8b"
# Output rows resampled per block, bounding the memory of the coordinate arrays.
_RESAMPLE_ROWS = 512


class AIAFileError(ValueError):
    """An AIA FITS file is unreadable, truncated, corrupt or lacks a required keyword.

    The message always names the file.
    """


class PixelFlag(enum.IntFlag):
    """Per-pixel, per-channel quality bits in :attr:`AIAStack.flags`."""

    #: A NaN or Inf input pixel, or one masked in its Map, contributes to this pixel (through
    #: resampling or rebinning); the pixel is NaN.
    NONFINITE = 1
    #: Negative intensity, clipped to zero (as SolarSoft does before a DEM solve).
    NEGATIVE = 2
    #: An input pixel at or above the saturation level (DN per exposure) contributes to this
    #: pixel (through resampling or rebinning).
    SATURATED = 4
    #: Outside the channel's image after resampling onto the reference grid (the pixel is NaN).
    NO_COVERAGE = 8


@dataclasses.dataclass(frozen=True, eq=False)
class AIAStack:
    """AIA images on one pixel grid as one channels-last array.

    Attributes
    ----------
    data : ndarray, shape (ny, nx, n_channels)
        Intensities in DN s^-1 pix^-1 (float64). Negative values are clipped to 0;
        pixels touched by a non-finite input pixel, or outside a resampled channel's image,
        are NaN. See :attr:`flags`.
    channels : Quantity, shape (n_channels,)
        Wavelength of each channel (Å), in the order of the last axis of ``data``.
    exptime : Quantity, shape (n_channels,)
        Exposure time of each channel (s).
    obstime : Time, shape (n_channels,)
        Observation time of each channel (``T_OBS``, the exposure mid-point, when present).
    meta : dict
        FITS header of the first channel (the reference) after cutout and rebinning: it carries
        the spatial WCS shared by all channels.
    n_sample : int
        Number of native level-1 pixels averaged into each output pixel: the binning of the
        input read from its header (16 for 4x4-binned synoptic images) times ``rebin**2``. The
        ``n_sample`` of :func:`deepem_jax.estimate_error`.
    flags : ndarray of uint8, shape (ny, nx, n_channels)
        Bitwise OR of :class:`PixelFlag` values.
    sources : tuple of str
        The file (or ``"map #i"``) each channel came from.
    resampled : tuple of int
        Channels (Å) that were resampled onto the reference channel's pixel grid because their
        pointing, plate scale, roll or shape differed from it; empty when none was.
    """

    data: np.ndarray
    channels: u.Quantity
    exptime: u.Quantity
    obstime: Time
    meta: dict
    n_sample: int
    flags: np.ndarray
    sources: tuple[str, ...]
    resampled: tuple[int, ...] = ()

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
        """(ny, nx) bool: True where any channel has a NONFINITE, SATURATED or NO_COVERAGE
        flag."""
        bad = PixelFlag.NONFINITE | PixelFlag.SATURATED | PixelFlag.NO_COVERAGE
        return np.any(self.flags & bad, axis=-1)

    @property
    def masked_data(self) -> np.ndarray:
        """``data`` with NaN in every channel of the pixels in :attr:`mask` (NaN/Inf, saturated
        or not covered), so solvers flag them as invalid input rather than fit them."""
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


def _gunzip(path: Path) -> bytes | None:
    """The decompressed bytes of a gzip file, or None if ``path`` is not gzip-compressed.

    Raises AIAFileError naming the file when the gzip stream is cut short or damaged.
    """
    with open(path, "rb") as fh:
        if fh.read(2) != _GZIP_MAGIC:
            return None
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except EOFError as err:
        raise AIAFileError(f"{path}: gzip file is truncated (stream ends early: {err})") from err
    except (OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise AIAFileError(f"{path}: gzip file is corrupt ({err})") from err


def _repair_cards(header: fits.Header) -> fits.Header:
    """Fix cards astropy cannot parse (real AIA headers carry e.g. ``OSCNMEAN= nan``) in place,
    as ``sunpy.map.Map(path)`` does with astropy's 'silentfix', so the header converts to a
    dict."""
    for card in header.cards:
        try:
            card.value  # noqa: B018 -- parsing the value is the test
        except VerifyError:
            card.verify("silentfix")
    return header


def _read_header(path: Path) -> fits.Header:
    # astropy's verification warnings (non-ASCII cards, stray padding) are not errors for the
    # header; a file that cannot be decoded fails in _read_data.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with fits.open(path, memmap=False) as hdul:
                return _repair_cards(_image_hdu(path, hdul).header.copy())
        except Exception as err:
            _gunzip(path)  # a cut-short or damaged gzip stream is the cause: say so
            if isinstance(err, AIAFileError):
                raise
            raise AIAFileError(f"{path}: not a readable FITS file ({err})") from err


def _read_data(path: Path) -> np.ndarray:
    # A gzip stream is decompressed (and so verified to the end) here, not by astropy, which
    # reads a stream missing its end without complaint.
    blob = _gunzip(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path if blob is None else io.BytesIO(blob), memmap=False) as hdul:
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


def _map_data(smap) -> np.ndarray:
    """A Map's data, with the pixels its mask covers set to NaN (so they are flagged
    NONFINITE, never inverted as data)."""
    data = np.asarray(smap.data)
    mask = None if smap.mask is None else np.broadcast_to(np.asarray(smap.mask, bool), data.shape)
    if mask is None or not mask.any():
        return data
    return np.where(mask, np.nan, data.astype(np.result_type(data.dtype, np.float32)))


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
            out.append(_Source(f"map #{i}", item.meta, data=_map_data(item)))
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


def _header_float(meta, key: str) -> float | None:
    """A finite number from a header card, or None when the card is absent, empty or NaN."""
    try:
        value = float(meta.get(key))
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _native_pixels(m, label: str) -> int:
    """Number of level-1 pixels averaged into each pixel of map ``m``, from its header.

    The per-axis binning factor is the plate scale (CDELT, or the PC/CD matrix, in arcsec per
    pixel) over the native scale ``IMSCL_MP`` (AIA's nominal 0.6 arcsec per pixel when the card
    is absent); each must be a whole number within 2 %. ``TOTVALS``, the pixel count of the
    detector frame, is the cross-check: the image cannot hold more native pixels than that.
    """
    hint = "pass n_native= to load_aia to state the binning"
    native = _header_float(m.meta, "imscl_mp")
    if native is None:
        native = _AIA_NATIVE_SCALE
    elif abs(native / _AIA_NATIVE_SCALE - 1.0) > _SCALE_RTOL:
        raise ValueError(
            f"{label}: IMSCL_MP = {native} arcsec/pix is not AIA's native plate scale "
            f"(~{_AIA_NATIVE_SCALE}); {hint}"
        )
    n = 1
    for scale in (m.scale.axis1, m.scale.axis2):
        ratio = abs(scale.to_value(u.arcsec / u.pix)) / native
        factor = max(round(ratio), 1)
        if abs(ratio - factor) > _SCALE_RTOL * factor:
            raise ValueError(
                f"{label}: plate scale {abs(scale):.5g} is {ratio:.4g} times the native "
                f"{native} arcsec/pix, not a whole binning factor; {hint}"
            )
        n *= factor
    totvals = _header_float(m.meta, "totvals")
    if totvals is not None and m.data.size * n > totvals:
        raise ValueError(
            f"{label}: inconsistent header: {m.data.shape[1]}x{m.data.shape[0]} pixels of {n} "
            f"native pixels each exceed TOTVALS = {totvals:.0f}; {hint}"
        )
    return n


def _pointing_offset(ref, m) -> float:
    """Largest distance (pixels of ``ref``) between the world coordinates ``ref`` and ``m``
    give the corners and centre of ``ref``'s image; inf when the image shapes differ."""
    if m.data.shape != ref.data.shape:
        return np.inf
    ny, nx = ref.data.shape
    corners = np.array([[0, 0], [nx - 1, 0], [0, ny - 1], [nx - 1, ny - 1], [nx / 2, ny / 2]])
    ref_world = ref.wcs.wcs_pix2world(corners, 0)
    scale = np.abs(ref.scale.axis1.to_value(u.deg / u.pix))
    diff = (m.wcs.wcs_pix2world(corners, 0) - ref_world + 180.0) % 360.0 - 180.0  # lon wraps
    return float(np.max(np.abs(diff)) / scale)


def _resample(
    rate: np.ndarray, marks: list[np.ndarray], wcs_in: WCS, wcs_out: WCS, shape: tuple[int, int]
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """Bilinear resampling of one channel onto the pixel grid ``wcs_out`` of ``shape``.

    ``rate`` (DN s^-1 per input pixel, finite) is interpolated at each output pixel centre's
    position in the input image and scaled by the ratio of output to input pixel solid angle,
    so it stays DN s^-1 per output pixel. Positions are mapped through the world coordinates
    (Tx, Ty) of the two WCS directly: co-temporal images share one observer. Each boolean map
    in ``marks`` comes back True wherever a marked input pixel has a non-zero interpolation
    weight. The third result is True where the position falls outside the input image (more
    than half a pixel beyond its outermost pixel centres).
    """
    ny_in, nx_in = rate.shape
    area = proj_plane_pixel_area(wcs_out) / proj_plane_pixel_area(wcs_in)
    out = np.empty(shape)
    out_marks = [np.empty(shape, dtype=bool) for _ in marks]
    outside = np.empty(shape, dtype=bool)
    for r0 in range(0, shape[0], _RESAMPLE_ROWS):
        rows = slice(r0, min(r0 + _RESAMPLE_ROWS, shape[0]))
        yy, xx = np.mgrid[rows, 0 : shape[1]]
        px, py = wcs_in.wcs_world2pix(*wcs_out.wcs_pix2world(xx, yy, 0), 0)
        with np.errstate(invalid="ignore"):
            inside = (px >= -0.5) & (px <= nx_in - 0.5) & (py >= -0.5) & (py <= ny_in - 0.5)
        coords = np.array([np.clip(py, 0, ny_in - 1), np.clip(px, 0, nx_in - 1)])
        coords[:, ~inside] = 0.0
        out[rows] = map_coordinates(rate, coords, order=1, mode="nearest") * area
        for mark, dest in zip(marks, out_marks, strict=True):
            weight = map_coordinates(mark.astype(np.float64), coords, order=1, mode="nearest")
            dest[rows] = inside & (weight > 0)
        outside[rows] = ~inside
    return out, out_marks, outside


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


def _requested(channels: u.Quantity, rebin, n_native) -> list[int]:
    """The requested channels as whole Å, after checking them and the integer options."""
    wanted = [int(round(c)) for c in np.atleast_1d(channels.to_value(u.AA))]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"duplicate channels requested: {wanted} Å")
    bad = [c for c in wanted if c not in AIA_EUV_CHANNELS]
    if bad:
        raise ValueError(f"requested channel(s) {bad} Å are not AIA EUV channels")
    for name, value in (("rebin", rebin), ("n_native", 1 if n_native is None else n_native)):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return wanted


def _check_times(times: Time, labels: Sequence[str], tolerance: u.Quantity) -> None:
    spread = (times.max() - times.min()).to(u.s)
    if spread > tolerance:
        first, last = labels[int(np.argmin(times.jd))], labels[int(np.argmax(times.jd))]
        raise ValueError(
            f"observation times span {spread:.1f} (> {tolerance}): {first} at "
            f"{times.min().isot}, {last} at {times.max().isot}"
        )


def _binning(maps, labels: Sequence[str], wanted: Sequence[int]) -> int:
    """Native pixels per input pixel, the same for every channel (see :func:`_native_pixels`)."""
    per_channel = [_native_pixels(m, label) for m, label in zip(maps, labels, strict=True)]
    if len(set(per_channel)) > 1:
        listed = ", ".join(f"{c} Å: {n}" for c, n in zip(wanted, per_channel, strict=True))
        raise ValueError(f"the channels average different numbers of native pixels ({listed})")
    return per_channel[0]


def _output_grid(ref, cutout, rebin: int):
    """The reference map cut to ``cutout`` and trimmed to a multiple of ``rebin`` (before
    rebinning), and the (y, x) slices of ``ref``'s image it covers."""
    ys, xs = (slice(None), slice(None)) if cutout is None else _cutout_bounds(ref, cutout)
    y0, x0 = ys.start or 0, xs.start or 0
    ny = len(range(*ys.indices(ref.data.shape[0])))
    nx = len(range(*xs.indices(ref.data.shape[1])))
    if ny < rebin or nx < rebin:
        raise ValueError(f"image of shape {(ny, nx)} is smaller than rebin={rebin}")
    ny, nx = (ny // rebin) * rebin, (nx // rebin) * rebin
    grid = ref.submap([x0, y0] * u.pix, top_right=[x0 + nx - 1, y0 + ny - 1] * u.pix)
    return grid, (slice(y0, y0 + ny), slice(x0, x0 + nx))


def _rates(m, exptime: float, per_second: bool, saturation_dn: float):
    """Rate (DN s^-1 per pixel, 0 where not finite), non-finite mask and saturation mask
    (DN per exposure >= ``saturation_dn``) of one map."""
    raw = m.data
    finite = np.isfinite(raw)
    saturated = finite & ((raw * exptime if per_second else raw) >= saturation_dn)
    rate = np.where(finite, raw if per_second else raw / exptime, 0.0)
    return rate, ~finite, saturated


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
    n_native: int | None = None,
) -> AIAStack:
    """Load co-temporal AIA EUV images into one (ny, nx, n_channels) stack in DN s^-1 pix^-1.

    Parameters
    ----------
    inputs
        A FITS file (``.fits``, ``.fits.gz``, RICE-compressed or not), a directory of FITS
        files, a ``sunpy.map.Map``, or a sequence of files and Maps: level 1.5 (co-aligned) or
        level 1 (each channel with its own pointing, plate scale and roll; see Co-registration).
        In a directory, files of AIA channels that were not requested are ignored; an explicitly
        given input whose channel was not requested is an error.
    channels
        Channels to return, in this order (Å). Default: 94, 131, 171, 193, 211, 335.
        The first is the reference channel whose pixel grid (WCS) the stack uses.
    time_tolerance
        Largest allowed spread of the observation times (s).
    pointing_tolerance
        A channel whose image has the reference's shape and whose WCS places the reference's
        corners and centre within this many pixels of the reference's is used as it is; any
        other channel is resampled onto the reference grid.
    rebin
        ``n``: average ``n x n`` blocks (the image is trimmed to a multiple of ``n``);
        :attr:`AIAStack.n_sample` is then ``n**2`` times the input's own binning.
    cutout
        ``(bottom_left, top_right)`` SkyCoord corners on the reference image, applied before
        rebinning.
    saturation_level
        Input pixels with at least this many DN per exposure get :attr:`PixelFlag.SATURATED`,
        and so do the output pixels they touch through resampling or rebinning. The default
        is at or below the level-1 value of a saturated pixel in every channel (the dark and
        flat-field corrections move saturated pixels from 16383 DN to as low as 13,600 DN).
    n_native
        Level-1 pixels averaged into each input pixel (16 for 4x4-binned synoptic images).
        Default: read from each header (all channels must agree) as (plate scale / IMSCL_MP)^2,
        IMSCL_MP being the native level-1 plate scale (AIA's nominal 0.6 arcsec/pix when absent),
        each factor a whole number within 2 %, cross-checked against TOTVALS (the detector
        frame's pixel count: the image cannot hold more native pixels). A header that fails
        these checks is refused with a message naming the file; pass ``n_native`` to load it
        anyway. Inputs must hold averages, not sums, of native pixels (as AIA synoptic and
        level-1.5 products do).

    Units: images in DN per exposure (BUNIT ``DN``, ``DN/pix`` or absent) are divided by their
    own ``EXPTIME`` (automatic exposure control shortens exposures during flares); images
    whose BUNIT is ``DN/s`` (per pixel or not) are used as they are. ``EXPTIME`` must be
    positive in both cases (the error model needs the counts). Negative pixels are clipped to 0
    after rebinning and flagged; NaN/Inf pixels become NaN and are flagged.

    Co-registration: a channel that needs it is resampled onto the reference grid by bilinear
    interpolation (scipy ``map_coordinates``) at each reference pixel centre's position, found
    through the two headers' world coordinates (Tx, Ty) with no change of observer; values are
    scaled by the ratio of pixel solid angles, so each output pixel holds DN s^-1 per output
    pixel (flux per pixel kept: the interpolated quantity is surface brightness, on pixels of
    nearly equal area). ``aiapy.calibrate.register`` is not used because it accepts only
    full-disk images (cutouts are refused) and fills uncovered pixels with the image minimum;
    ``reproject`` is not used because it transforms between the observer frames that sunpy
    builds from each file's time, and for channels taken seconds apart that makes every
    off-disk pixel NaN. Output pixels outside the channel's image are NaN and flagged
    :attr:`PixelFlag.NO_COVERAGE`; output pixels with a non-zero interpolation weight on a
    non-finite or saturated input pixel keep that flag. The interpolation does not change
    :attr:`AIAStack.n_sample`. Resampled channels are listed in :attr:`AIAStack.resampled`.

    Raises
    ------
    AIAFileError
        A file is unreadable, truncated or corrupt (also a cut-short ``.fits.gz``), or lacks or
        has a bad EXPTIME, WAVELNTH, time or BUNIT; the message names the file.
    ValueError
        A channel is missing, duplicated or not an AIA EUV channel; the times differ beyond the
        tolerance; a header's binning is inconsistent or differs between channels; or a
        channel's image does not overlap the reference image.
    """
    import sunpy.map

    wanted = _requested(channels, rebin, n_native)
    rebin = int(rebin)
    srcs = _select(_sources(inputs), wanted)
    labels = [s.label for s in srcs]
    exptime = np.array([_exptime_of(s) for s in srcs])
    per_second = [_per_second(s) for s in srcs]
    times = Time([_obstime(s) for s in srcs])
    _check_times(times, labels, time_tolerance)

    maps = [sunpy.map.Map(s.load(), s.header) for s in srcs]
    if n_native is None:
        n_native = _binning(maps, labels, wanted)

    grid, box = _output_grid(maps[0], cutout, rebin)
    rate, masks, resampled = _on_grid(
        maps,
        labels,
        grid,
        box,
        exptime,
        per_second,
        float(pointing_tolerance.to_value(u.pix)),
        saturation_level.to_value(u.DN),
    )
    if rebin > 1:
        grid = grid.superpixel((rebin, rebin) * u.pix, func=np.mean)
        rate = _block_reduce(rate, rebin, np.mean)
        masks = [_block_reduce(a, rebin, np.any) for a in masks]
    data, flags = _flagged(rate, *masks)
    return AIAStack(
        data=data,
        channels=np.array(wanted) * u.AA,
        exptime=exptime * u.s,
        obstime=times,
        meta=dict(grid.meta),
        n_sample=n_native * rebin**2,
        flags=flags,
        sources=tuple(labels),
        resampled=tuple(wanted[c] for c in resampled),
    )


def _on_grid(maps, labels, grid, box, exptime, per_second, tol_pix, sat_dn):
    """Rates (ny, nx, C) in DN s^-1 pix^-1 of every channel on the reference ``grid`` (NaN where
    non-finite or uncovered), the (nonfinite, saturated, outside) masks, and the indices of the
    channels resampled (pointing beyond ``tol_pix`` from the first channel's)."""
    shape = grid.data.shape
    rate = np.empty((*shape, len(maps)))
    nonfinite, saturated, outside = (np.zeros((*shape, len(maps)), dtype=bool) for _ in range(3))
    resampled = []
    for c, m in enumerate(maps):
        r, bad, sat = _rates(m, exptime[c], per_second[c], sat_dn)
        if c == 0 or _pointing_offset(maps[0], m) <= tol_pix:
            rate[..., c], nonfinite[..., c], saturated[..., c] = r[box], bad[box], sat[box]
            continue
        rate[..., c], (nonfinite[..., c], saturated[..., c]), outside[..., c] = _resample(
            r, [bad, sat], m.wcs, grid.wcs, shape
        )
        if outside[..., c].all():
            raise ValueError(f"{labels[c]}: image does not overlap the reference {labels[0]}")
        resampled.append(c)
    rate[nonfinite | outside] = np.nan
    return rate, [nonfinite, saturated, outside], resampled


def _flagged(rate, nonfinite, saturated, outside) -> tuple[np.ndarray, np.ndarray]:
    """Rates with negative values clipped to 0, and the :class:`PixelFlag` bits per pixel."""
    negative = rate < 0
    flags = (
        nonfinite * PixelFlag.NONFINITE
        + negative * PixelFlag.NEGATIVE
        + saturated * PixelFlag.SATURATED
        + outside * PixelFlag.NO_COVERAGE
    ).astype(np.uint8)
    return np.where(negative, 0.0, rate), flags
