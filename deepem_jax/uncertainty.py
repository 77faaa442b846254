"""AIA intensity uncertainties: a jit-able JAX port of ``aiapy.calibrate.estimate_error``
(itself SolarSoft's ``aia_bp_estimate_error.pro``).

For ``counts`` N in DN pix^-1 (*not* divided by exposure time) averaged over ``n_sample``
pixels/images, per channel::

    shot     = sqrt(N / g) * g / sqrt(n)            g = DN per photon (error table DNPERPHT)
    dark     = 0.18 DN
    read     = r / sqrt(n)                          r = 1.14--1.20 DN by camera (Boerner+ 2012)
    quant    = (1/sqrt(12)) / sqrt(n)
    compress = max(shot / COMPRESS, 1/sqrt(12)) / sqrt(n),  0 where N < 25 DN
    sigma    = sqrt(shot^2 + dark^2 + read^2 + quant^2 + compress^2 + (f_cal N)^2 + (f_chianti N)^2)

Negative counts are clipped to zero (as SolarSoft clips its data) so sigma is always finite.
Arrays are channels-last: ``counts`` has shape (..., n_channels), matching the table's channels.
"""

from __future__ import annotations

import dataclasses
import os

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from ._units import INTENSITY_UNIT, channel_list, to_value

__all__ = [
    "V3_ERROR_TABLE",
    "ErrorTable",
    "aia_sigma",
    "estimate_error",
    "sigma_values",
]

_DARK = 0.18
_QUANT = 1.0 / np.sqrt(12.0)
#: Read noise per channel in DN, by camera (aiapy/Boerner et al. 2012, Table 6).
READ_NOISE = {94: 1.14, 131: 1.18, 171: 1.15, 193: 1.20, 211: 1.20, 304: 1.14, 335: 1.18}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ErrorTable:
    """Per-channel error-model constants (arrays of shape (n_channels,)).

    ``dn_per_photon`` in DN photon^-1; ``compress`` the onboard-compression ratio;
    ``read_noise`` in DN; ``calerr``/``eveerr``/``chianti`` fractional errors.
    ``channels`` (Å) is static metadata.
    """

    dn_per_photon: np.ndarray
    compress: np.ndarray
    read_noise: np.ndarray
    calerr: np.ndarray
    eveerr: np.ndarray
    chianti: np.ndarray
    channels: tuple[int, ...] = dataclasses.field(metadata=dict(static=True), default=())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ErrorTable:
        """Read an SSW/aiapy AIA error table (e.g. aiapy's ``aia_V3_error_table.txt``)."""
        from astropy.io import ascii

        if not os.path.exists(path):
            raise FileNotFoundError(f"AIA error table {path} does not exist")
        try:
            t = ascii.read(str(path))
        except Exception as err:
            raise ValueError(f"cannot parse AIA error table {path}: {err}") from err
        need = ("WAVELNTH", "DNPERPHT", "COMPRESS", "CALERR", "CHIANTI", "EVEERR")
        missing = [c for c in need if c not in t.colnames]
        if missing:
            raise ValueError(f"AIA error table {path} lacks columns {missing}")
        rows = {int(r["WAVELNTH"]): r for r in t if int(r["WAVELNTH"]) in READ_NOISE}
        chans = tuple(sorted(rows))
        col = lambda name: np.array([float(rows[c][name]) for c in chans])  # noqa: E731
        return cls(
            col("DNPERPHT"),
            col("COMPRESS"),
            np.array([READ_NOISE[c] for c in chans]),
            col("CALERR"),
            col("EVEERR"),
            col("CHIANTI"),
            chans,
        )

    def select(self, wavelengths: u.Quantity) -> ErrorTable:
        """The rows for ``wavelengths``, in that order."""
        wanted = channel_list(wavelengths, "wavelengths")
        missing = [w for w in wanted if w not in self.channels]
        if missing:
            raise ValueError(f"channels {missing} Å not in error table ({list(self.channels)})")
        idx = [self.channels.index(w) for w in wanted]
        pick = lambda a: np.asarray(a)[idx]  # noqa: E731
        return ErrorTable(
            pick(self.dn_per_photon),
            pick(self.compress),
            pick(self.read_noise),
            pick(self.calerr),
            pick(self.eveerr),
            pick(self.chianti),
            tuple(wanted),
        )


#: SolarSoft/aiapy error table version 3 (2012-02-10), EUV channels; the values of
#: ``aia_V3_error_table.txt`` (tests check them against the copy aiapy ships).
V3_ERROR_TABLE = ErrorTable(
    dn_per_photon=np.array([1.975, 1.473, 1.122, 0.962, 0.880, 0.611, 0.576]),
    compress=np.array([26.196, 18.797, 14.400, 12.759, 11.670, 8.100, 7.350]),
    read_noise=np.array([READ_NOISE[c] for c in (94, 131, 171, 193, 211, 304, 335)]),
    calerr=np.full(7, 0.25),
    eveerr=np.array([0.087, 0.051, 0.019, 0.014, 0.019, 0.023, 0.097]),
    chianti=np.array([0.50, 0.50, 0.25, 0.25, 0.25, 0.50, 0.25]),
    channels=(94, 131, 171, 193, 211, 304, 335),
)


def estimate_error(
    counts: jax.Array,
    table: ErrorTable,
    n_sample: jax.Array | float = 1.0,
    include_preflight: bool = False,
    include_eve: bool = False,
    include_chianti: bool = False,
) -> jax.Array:
    """1-sigma uncertainty in DN pix^-1 of ``counts`` (DN pix^-1, shape (..., n_channels)).

    Pure and jit-able; ``n_sample`` may be a scalar or broadcast against ``counts``
    (e.g. the n^2 of an n x n rebin). Channels follow ``table.channels``.
    """
    if include_eve and include_preflight:
        raise ValueError("cannot include both the EVE and the pre-flight calibration error")
    counts = jnp.maximum(jnp.asarray(counts), 0.0)
    n = jnp.asarray(n_sample, dtype=counts.dtype)
    sqrt_n = jnp.sqrt(n)
    g = jnp.asarray(table.dn_per_photon, dtype=counts.dtype)
    shot = jnp.sqrt(counts / g) * g / sqrt_n
    read = jnp.asarray(table.read_noise, dtype=counts.dtype) / sqrt_n
    quant = _QUANT / sqrt_n
    compress = jnp.maximum(shot / jnp.asarray(table.compress, dtype=counts.dtype), _QUANT)
    compress = jnp.where(counts < 25.0, 0.0, compress) / sqrt_n
    var = shot**2 + _DARK**2 + read**2 + quant**2 + compress**2
    if include_eve:
        var = var + (jnp.asarray(table.eveerr, dtype=counts.dtype) * counts) ** 2
    elif include_preflight:
        var = var + (jnp.asarray(table.calerr, dtype=counts.dtype) * counts) ** 2
    if include_chianti:
        var = var + (jnp.asarray(table.chianti, dtype=counts.dtype) * counts) ** 2
    return jnp.sqrt(var)


def aia_sigma(
    intensity: u.Quantity,
    exptime: u.Quantity,
    channels: u.Quantity,
    table: ErrorTable = V3_ERROR_TABLE,
    n_sample: float | np.ndarray = 1,
    **kwargs,
) -> u.Quantity:
    """Uncertainty of exposure-normalised intensities (DN s^-1 pix^-1, channels last).

    Converts to counts with ``exptime`` (s, scalar or per channel), applies
    :func:`estimate_error` and divides back. Returns DN s^-1 pix^-1.
    """
    y = to_value(intensity, INTENSITY_UNIT, "intensity")
    t = to_value(exptime, u.s, "exptime")
    return sigma_values(y, t, channel_list(channels), n_sample, table, **kwargs) * INTENSITY_UNIT


def sigma_values(
    intensity: np.ndarray,
    exptime: np.ndarray | float,
    channels,
    n_sample: float | np.ndarray = 1,
    table: ErrorTable = V3_ERROR_TABLE,
    **kwargs,
) -> np.ndarray:
    """Plain-array form of :func:`aia_sigma`: ``intensity`` (..., C) in DN s^-1 pix^-1,
    ``exptime`` in s (scalar or per channel), ``channels`` in Å (ints or Quantity); returns
    sigma in DN s^-1 pix^-1 (float64). Non-finite intensities count as zero signal (the caller
    flags those pixels)."""
    chans = (
        channels
        if isinstance(channels, list)
        else channel_list(
            channels if isinstance(channels, u.Quantity) else np.asarray(channels) * u.AA
        )
    )
    y = np.asarray(intensity, dtype=np.float64)
    if y.shape[-1:] != (len(chans),):
        raise ValueError(f"intensity shape {y.shape} does not end in {len(chans)} channels")
    t = np.atleast_1d(np.asarray(exptime, dtype=np.float64))
    if t.size not in (1, len(chans)):
        raise ValueError(f"exptime needs 1 or {len(chans)} values (one per channel), got {t.size}")
    t = np.broadcast_to(t, (len(chans),))
    if np.any(~np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"exposure times must be finite and positive, got {t} s")
    tab = table.select(np.asarray(chans) * u.AA)
    counts = np.where(np.isfinite(y), y, 0.0) * t
    return (
        np.asarray(estimate_error(jnp.asarray(counts), tab, n_sample, **kwargs), dtype=np.float64)
        / t
    )
