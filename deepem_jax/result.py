"""The result of :func:`deepem_jax.invert`: a DEM cube with its status, fit quality and the
calibration that produced it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import astropy.units as u
import numpy as np
from astropy.wcs import WCS

from .response import TemperatureResponse
from .status import DEMStatus

__all__ = ["DEMResult"]


@dataclasses.dataclass(frozen=True, eq=False)
class DEMResult:
    """DEMs of a set of pixels, whatever the method (numpy arrays, leading axes of the input).

    Attributes
    ----------
    em : (..., n_T) float32
        Emission measure per log T bin, cm^-5. NaN where the status carries no EM
        (:attr:`DEMStatus.has_em`).
    logt : (n_T,) float64
        log10(T / K) of the bins.
    status : (...) int8
        :class:`~deepem_jax.DEMStatus` code per pixel.
    chi2 : (...) float32
        Mean over channels of ``((synthetic - intensities) / sigma)**2``; NaN without an EM.
    synthetic : (..., C) float32
        Intensities the EM predicts through the response degraded to the observation time,
        DN s^-1 pix^-1 (comparable with :attr:`intensities`); NaN without an EM.
    intensities, sigma : (..., C) float32 or float64
        The observed intensities and their 1-sigma errors, DN s^-1 pix^-1 (not corrected
        for degradation). Intensities or errors given to :func:`~deepem_jax.invert` as a
        (writeable, C-contiguous) float32 array, or as a float64 array (or Quantity, or
        ``AIAStack.data``) that the result can share, are that array itself, not a copy (a
        full-disk input is not held twice); anything else, e.g. values converted to other
        units or the errors of an ``AIAStack``, is kept as a float32 copy.
    tolfac : (...) float32
        Tolerance factor of the band each pixel was judged against (BP: ``tolfac`` times the
        retry factor that succeeded, or the last one tried; NaN where the pixel was not
        judged: invalid, saturated, low signal).
    channels : tuple of int
        AIA channels (Å), order of the last axis of the intensities.
    method : str
        ``"bp"``, ``"net"`` or ``"fit"``.
    response : TemperatureResponse
        The undegraded response the EM was computed with (channels in order, on ``logt``).
    degradation : (C,) float64
        Degradation factor per channel the intensities were divided by (1 where none).
    provenance : dict
        FITS-ready description of how the result was made (method, tolerance, calibration,
        response and weights identity, deepem_jax version).
    wcs : astropy WCS or None
        2-D celestial WCS of the spatial axes when the input had one.
    timings : dict
        Wall-clock seconds of the solve (``"solve"``) and of the whole call (``"total"``).
    errors : DEMErrors or None
        1-sigma uncertainties (``invert(..., uncertainties=N)``): EM per bin and total EM in
        cm^-5, mean log T, and the temperature resolution when known
        (:class:`deepem_jax.dem_errors.DEMErrors`).
    """

    em: np.ndarray
    logt: np.ndarray
    status: np.ndarray
    chi2: np.ndarray
    synthetic: np.ndarray
    intensities: np.ndarray
    sigma: np.ndarray
    tolfac: np.ndarray
    channels: tuple[int, ...]
    method: str
    response: TemperatureResponse
    degradation: np.ndarray
    provenance: dict[str, Any]
    wcs: WCS | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    errors: Any = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Leading (pixel) shape."""
        return self.status.shape

    @property
    def has_em(self) -> np.ndarray:
        """(...) bool: pixels carrying an EM (SOLVED, OUTSIDE_BAND or MAX_STEPS)."""
        return DEMStatus.with_em(self.status)

    @property
    def corrected_intensities(self) -> np.ndarray:
        """Intensities divided by the degradation factors (what the undegraded response
        sees), DN s^-1 pix^-1."""
        return self.intensities / self.degradation

    @property
    def corrected_sigma(self) -> np.ndarray:
        """:attr:`sigma` divided by the degradation factors, DN s^-1 pix^-1."""
        return self.sigma / self.degradation

    @property
    def band_tolfac(self) -> np.ndarray:
        """(...) :attr:`tolfac` with the nominal tolerance factor where it is NaN."""
        nominal = float(self.provenance["TOLFAC"])
        return np.where(np.isfinite(self.tolfac), self.tolfac, nominal)

    def band(self) -> tuple[np.ndarray, np.ndarray]:
        """BP's tolerance band (lower, upper) of the corrected intensities with each pixel's
        :attr:`band_tolfac`, (..., C) in DN s^-1 pix^-1 (the band ``K @ em`` is judged in)."""
        from .bp import bounds

        with np.errstate(invalid="ignore"):
            lo, hi = bounds(
                np.nan_to_num(self.corrected_intensities),
                self.corrected_sigma,
                self.band_tolfac[..., None],
            )
        return np.asarray(lo), np.asarray(hi)

    def status_counts(self) -> dict[str, int]:
        """Number of pixels per status name."""
        return DEMStatus.counts(self.status)

    def total_em(self) -> u.Quantity:
        """Total EM per pixel, cm^-5 (NaN without an EM)."""
        from .products import total_em

        return total_em(self.em)

    def temperature_map(self) -> np.ndarray:
        """EM-weighted mean log10(T / K) per pixel (NaN without a positive EM)."""
        from .products import mean_logt

        return mean_logt(self.em, self.logt)

    def to_fits(
        self, path: str | os.PathLike, *, overwrite: bool = False, dtype: Any = np.float32
    ) -> Path:
        """Write the EM cube (n_T, y, x) with STATUS and CHI2 extensions and the provenance
        header to ``path`` atomically (see :func:`deepem_jax.io.write_dem_cube`); with
        :attr:`errors`, also EM_ERR (cm^-5 per bin), TEM_ERR (cm^-5), LOGT_ERR and, when
        known, LOGT_RES (log T per bin), TEM_MEAN (cm^-5) and LOGT_MEAN (the Monte Carlo
        centres) extensions."""
        from .io import write_dem_cube

        if self.em.ndim != 3:
            raise ValueError(f"a DEM cube needs (ny, nx, n_T) pixels; this result is {self.shape}")
        if self.wcs is None:
            raise ValueError("this result has no WCS (the input was not an image with one)")
        return write_dem_cube(
            path,
            self.em.astype(dtype) * u.cm**-5,
            self.logt,
            self.wcs,
            extras={"status": self.status, "chi2": self.chi2.astype(dtype), **self._error_extras()},
            meta=self.provenance,
            dtype=dtype,
            overwrite=overwrite,
        )

    def _error_extras(self) -> dict[str, Any]:
        e = self.errors
        if e is None:
            return {}
        out = {
            "em_err": e.em.astype(np.float32) * u.cm**-5,
            "tem_err": e.total_em.astype(np.float32) * u.cm**-5,
            "logt_err": e.logt.astype(np.float32),
        }
        if e.logt_resolution is not None:
            out["logt_res"] = e.logt_resolution.astype(np.float32)
        if e.total_em_mean is not None:
            out["tem_mean"] = e.total_em_mean.astype(np.float32) * u.cm**-5
            out["logt_mean"] = e.logt_mean.astype(np.float32)
        return out

    def to_ndcube(self):
        """The EM cube as an ``ndcube.NDCube`` (n_T, y, x) with a 3-D WCS (needs a WCS)."""
        from astropy.io import fits

        from .io import DEMCube
        from .io._demcube import dem_wcs

        if self.wcs is None or self.em.ndim != 3:
            raise ValueError("an NDCube needs an image result with a WCS")
        cube = DEMCube(
            em=self.em * u.cm**-5,
            logt=self.logt,
            wcs=dem_wcs(self.wcs, self.logt, *self.shape),
            header=fits.Header(),
            extras={"status": self.status, "chi2": self.chi2},
            provenance=dict(self.provenance),
        )
        return cube.to_ndcube()
