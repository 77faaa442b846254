"""The forward model ``y = K @ EM`` and synthetic AIA observations.

Arrays are channels-last: EM has shape (..., n_T) in cm^-5 per bin, intensities (..., n_channels)
in DN s^-1 pix^-1. This module is the only implementation of the forward model in deepem_jax.
"""

from __future__ import annotations

from collections.abc import Sequence

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np

from ._units import INTENSITY_UNIT, to_value
from .response import TemperatureResponse
from .uncertainty import V3_ERROR_TABLE, ErrorTable

__all__ = [
    "chi2",
    "forward",
    "gaussian_dem",
    "multi_gaussian_dem",
    "noisy_observation",
    "predict_intensities",
    "random_dems",
    "synthetic_scene",
]


def forward(K: jax.Array, em: jax.Array) -> jax.Array:
    """Intensities (..., n_channels) in DN s^-1 pix^-1 of EM (..., n_T) in cm^-5 per bin.

    Pure and differentiable in both arguments.
    """
    K = jnp.asarray(K)
    em = jnp.asarray(em)
    if em.shape[-1] != K.shape[-1]:
        raise ValueError(f"EM has {em.shape[-1]} temperature bins but K has {K.shape[-1]}")
    # Scale EM down before the product so float32 never sees 1e-24 * 1e28 round-offs.
    return jnp.einsum("ct,...t->...c", K * 1e26, em * 1e-26)


def chi2(synthetic: np.ndarray, intensities: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Mean over channels of ``((synthetic - intensities) / sigma)**2`` (shape (...)), the
    chi^2 every deepem_jax result reports; all three (..., C) in DN s^-1 pix^-1. NaN where an
    input is NaN or sigma is 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.mean(np.square((synthetic - intensities) / sigma), axis=-1)


def predict_intensities(response: TemperatureResponse, em: u.Quantity) -> u.Quantity:
    """Quantity interface to :func:`forward`: EM in cm^-5 per bin -> DN s^-1 pix^-1."""
    y = forward(response.K, to_value(em, u.cm**-5, "em"))
    return np.asarray(y) * INTENSITY_UNIT


def gaussian_dem(
    logt: Sequence[float] | np.ndarray,
    em_total: np.ndarray | float,
    logt_peak: np.ndarray | float,
    width: np.ndarray | float,
) -> np.ndarray:
    """Gaussian DEM ``em_total * w / sum(w)`` with ``w = exp(-(logT - peak)^2 / (2 width^2))``.

    Parameters broadcast against each other (giving leading pixel axes); ``em_total`` is the
    total EM in cm^-5 summed over bins, so the result sums to ``em_total`` along the last axis.
    """
    lt = np.asarray(logt, dtype=np.float64)
    em_total, logt_peak, width = np.broadcast_arrays(
        np.asarray(em_total, float), np.asarray(logt_peak, float), np.asarray(width, float)
    )
    if np.any(width <= 0):
        raise ValueError("Gaussian DEM widths must be positive")
    w = np.exp(-((lt - logt_peak[..., None]) ** 2) / (2.0 * width[..., None] ** 2))
    norm = w.sum(axis=-1, keepdims=True)
    return np.where(norm > 0, em_total[..., None] * w / np.where(norm > 0, norm, 1.0), 0.0)


def multi_gaussian_dem(
    logt: Sequence[float] | np.ndarray,
    em_totals: np.ndarray,
    logt_peaks: np.ndarray,
    widths: np.ndarray,
) -> np.ndarray:
    """Sum of Gaussian DEMs; component parameters along the last axis of each argument."""
    return gaussian_dem(logt, em_totals, logt_peaks, widths).sum(axis=-2)


def random_dems(
    logt: Sequence[float] | np.ndarray,
    n: int,
    rng: np.random.Generator,
    em_range: tuple[float, float] = (1e26, 1e29),
    peak_range: tuple[float, float] = (5.6, 7.1),
    width_range: tuple[float, float] = (0.05, 0.3),
    max_components: int = 3,
) -> np.ndarray:
    """``n`` DEMs (n, n_T) from the documented prior: 1..``max_components`` Gaussian components,
    total EM log-uniform in ``em_range`` (cm^-5), peaks uniform in ``peak_range``, widths
    uniform in ``width_range``; the components share the total EM with Dirichlet weights."""
    k = rng.integers(1, max_components + 1, size=n)
    total = 10 ** rng.uniform(np.log10(em_range[0]), np.log10(em_range[1]), size=n)
    frac = rng.dirichlet(np.ones(max_components), size=n)
    frac = np.where(np.arange(max_components)[None, :] < k[:, None], frac, 0.0)
    frac /= frac.sum(axis=1, keepdims=True)
    peaks = rng.uniform(*peak_range, size=(n, max_components))
    widths = rng.uniform(*width_range, size=(n, max_components))
    return multi_gaussian_dem(logt, total[:, None] * frac, peaks, widths)


def noisy_observation(
    intensity: np.ndarray,
    exptime: np.ndarray | float,
    channels: Sequence[int],
    rng: np.random.Generator,
    table: ErrorTable = V3_ERROR_TABLE,
    n_sample: float = 1,
) -> np.ndarray:
    """Add AIA noise to noiseless intensities (..., n_channels) in DN s^-1 pix^-1.

    Photon (Poisson) noise on ``counts / dn_per_photon`` photons and Gaussian read noise per
    channel from ``table`` (see :mod:`deepem_jax.uncertainty`), for pixels that are the mean of
    ``n_sample`` level-1 pixels; returns DN s^-1 pix^-1 (may be negative, as real
    dark-subtracted data can be).
    """
    tab = table.select(np.asarray(channels) * u.AA)
    y = np.asarray(intensity, dtype=np.float64)
    t = np.broadcast_to(np.asarray(exptime, dtype=np.float64), (len(channels),))
    if np.any(t <= 0) or y.shape[-1] != len(channels) or not n_sample >= 1:
        raise ValueError(
            "exptime must be positive, n_sample >= 1 and intensity must be (..., n_channels)"
        )
    g = np.asarray(tab.dn_per_photon)
    photons = rng.poisson(np.clip(y * t * n_sample, 0, None) / g)
    counts = photons * g + rng.normal(size=y.shape) * np.asarray(tab.read_noise) * np.sqrt(n_sample)
    return counts / (t * n_sample)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """A smooth random field in [0, 1] with correlation length ``scale`` pixels."""
    from scipy.ndimage import gaussian_filter

    f = gaussian_filter(rng.normal(size=shape), sigma=scale, mode="wrap")
    f -= f.min()
    return f / max(f.max(), 1e-300)


def synthetic_scene(
    response: TemperatureResponse,
    shape: tuple[int, int],
    rng: np.random.Generator,
    exptime: np.ndarray | float = 2.0,
    noise: bool = True,
    table: ErrorTable = V3_ERROR_TABLE,
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic AIA observation with solar-like spatial structure.

    Each pixel holds a warm coronal component (peak log T 5.8--6.5, width 0.1--0.3,
    EM 1e26--3e28 cm^-5 from smooth random fields) plus, in patches covering about a fifth of
    the image, a hot component (log T 6.7--7.0, 1--10% of the warm EM). Returns
    ``(em, intensity)``: the true EM (ny, nx, n_T) in cm^-5 per bin of ``response``'s grid and
    the intensities (ny, nx, n_channels) in DN s^-1 pix^-1 (with AIA noise if ``noise``).
    """
    ny, nx = shape
    scale = max(min(ny, nx) / 12.0, 1.0)
    field = lambda: _smooth_field(rng, (ny, nx), scale)  # noqa: E731
    peak = 5.8 + 0.7 * field()
    width = 0.1 + 0.2 * field()
    em_tot = 10 ** (26.0 + 2.5 * field() ** 1.5)
    hot_mask = field() > 0.65
    hot_peak = 6.7 + 0.3 * field()
    hot_frac = np.where(hot_mask, 0.01 + 0.09 * field(), 0.0)
    em = multi_gaussian_dem(
        response.logt_array,
        np.stack([em_tot, em_tot * hot_frac], axis=-1),
        np.stack([peak, hot_peak], axis=-1),
        np.stack([width, np.full_like(width, 0.08)], axis=-1),
    )
    y = np.asarray(forward(np.asarray(response.K), em))
    if noise:
        y = noisy_observation(y, exptime, response.channels, rng, table)
    return em, y
