"""Synthetic six-channel AIA FITS files: forward-modelled intensities written with a real AIA
level-1 header (sunpy's 128x128 ``aia_171_level1.fits``) whose WAVELNTH, EXPTIME and times are
edited per channel."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import astropy.units as u
import numpy as np
import sunpy.data.test
from astropy.io import fits
from astropy.time import Time

from deepem_jax.forward import forward, gaussian_dem
from deepem_jax.response import AIA_CHANNELS, DEEPEM_LOGT, default_response

#: Exposure times (s) typical of AIA synoptic/level-1 data, by channel.
EXPTIME = {94: 2.9, 131: 2.9, 171: 2.0, 193: 2.0, 211: 2.9, 335: 2.9}
T0 = Time("2011-02-15T00:00:00", scale="utc")


def real_header_and_shape() -> tuple[fits.Header, tuple[int, int]]:
    """Header of sunpy's real AIA 171 Å level-1 test file (BLANK removed: the data are float)."""
    path = sunpy.data.test.get_test_filepath("aia_171_level1.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file's BLANK card does not apply to float data
        header = fits.getheader(path)
    del header["BLANK"]
    return header, (header["NAXIS2"], header["NAXIS1"])


def true_intensity(shape: tuple[int, int], channels: Sequence[int]) -> np.ndarray:
    """Noiseless intensities (ny, nx, C) in DN s^-1 pix^-1 of a smooth Gaussian-DEM scene, seen
    through the response degraded to ``T0`` (as AIA would have recorded them)."""
    ny, nx = shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    peak = 5.8 + 1.0 * xx / nx
    total = 10 ** (26.5 + 1.0 * yy / ny)
    em = gaussian_dem(DEEPEM_LOGT, total, peak, 0.15)
    K = default_response().regrid(DEEPEM_LOGT).select(np.asarray(channels) * u.AA).degrade(T0).K
    return np.asarray(forward(np.asarray(K), em), dtype=np.float64)


def write_aia_set(
    directory: Path,
    channels: Sequence[int] = tuple(int(c) for c in AIA_CHANNELS.to_value(u.AA)),
    *,
    time_step: u.Quantity = 5 * u.s,
    edit: Callable[[int, fits.Header, np.ndarray], np.ndarray] | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Write one level-1 FITS file per channel into ``directory`` (data in DN per exposure).

    ``edit(channel, header, counts)`` may modify a file's header in place and returns the counts
    to write (DN pix^-1), so a test can corrupt one channel. Returns the paths and the true
    intensities (ny, nx, C) in DN s^-1 pix^-1.
    """
    header, shape = real_header_and_shape()
    truth = true_intensity(shape, channels)
    paths = []
    for i, chan in enumerate(channels):
        h = header.copy()
        t_obs = T0 + i * time_step
        h["WAVELNTH"] = chan
        h["EXPTIME"] = EXPTIME[chan]
        h["T_OBS"] = t_obs.isot + "Z"
        h["DATE-OBS"] = (t_obs - EXPTIME[chan] / 2 * u.s).isot
        counts = truth[..., i] * EXPTIME[chan]
        if edit is not None:
            counts = edit(chan, h, counts)
        path = directory / f"aia_lev1_{chan}a.fits"
        fits.PrimaryHDU(counts, header=h).writeto(path)
        paths.append(path)
    return paths, truth
