"""Training observations that look like the real Sun at real noise levels.

A DEM prior (EMs of real observations solved by BP, and/or the synthetic prior of
:func:`deepem_jax.forward.random_dems`) is seen through the undegraded response, degraded by the
factor of a random epoch, exposed for a random time, averaged over a random number of level-1
pixels and given AIA photon and read noise; the result is returned the way
:func:`deepem_jax.invert` hands data to every method: corrected for degradation (``y / f``,
``sigma / f``), with sigma from the AIA error model of the noisy counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import astropy.units as u
import numpy as np

from .forward import forward, noisy_observation
from .response import TemperatureResponse
from .uncertainty import sigma_values

__all__ = ["NoiseLevels", "real_dem_prior", "realistic_observations"]

#: Nominal AIA exposure times (s) by channel.
NOMINAL_EXPTIME = {94: 2.9, 131: 2.9, 171: 2.0, 193: 2.0, 211: 2.9, 335: 2.9}


@dataclasses.dataclass(frozen=True)
class NoiseLevels:
    """Ranges the observing conditions are drawn from, one draw per block of pixels.

    ``n_sample`` level-1 pixels per pixel, log-uniform in ``n_sample`` (inclusive);
    exposures: nominal with probability ``p_nominal``, otherwise log-uniform in ``exptime``
    (s, per channel, as automatic exposure control does); degradation: the factors of a date
    drawn uniformly in ``years`` (decimal years, shipped correction table).
    """

    n_sample: tuple[float, float] = (1.0, 64.0)
    exptime: tuple[float, float] = (0.005, 3.0)
    p_nominal: float = 0.7
    years: tuple[float, float] = (2010.5, 2025.5)

    def __post_init__(self) -> None:
        if not (
            1 <= self.n_sample[0] <= self.n_sample[1] and 0 < self.exptime[0] <= self.exptime[1]
        ):
            raise ValueError(f"bad ranges: n_sample {self.n_sample}, exptime {self.exptime}")
        if not 0 <= self.p_nominal <= 1:
            raise ValueError(f"p_nominal must be in [0, 1], got {self.p_nominal}")


def real_dem_prior(results: Sequence, min_total: float = 1e24) -> np.ndarray:
    """EMs (N, n_T) cm^-5 of the SOLVED pixels of :class:`~deepem_jax.DEMResult` objects (BP
    of real observations) whose total EM exceeds ``min_total`` cm^-5."""
    rows = []
    for res in results:
        em = res.em[res.status == 0].astype(np.float64)
        rows.append(em[np.nansum(em, -1) > min_total])
    return np.concatenate(rows)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size=None) -> np.ndarray:
    return np.exp(rng.uniform(np.log(lo), np.log(hi), size))


def _degradation_factors(channels: list[int], rng, years, n: int) -> np.ndarray:
    """(n, C) degradation factors of ``n`` random dates in ``years`` (shipped V10 table)."""
    from astropy.time import Time

    from .calibration import degradation

    yrs = rng.uniform(*years, n)
    times = Time(yrs, format="decimalyear").isot
    return np.stack([degradation(np.array(channels) * u.AA, t).factors for t in times])


def realistic_observations(
    em: np.ndarray,
    response: TemperatureResponse,
    rng: np.random.Generator,
    levels: NoiseLevels | None = None,
    block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Noisy, degradation-corrected intensities and sigma (N, C) DN s^-1 pix^-1 of EMs
    (N, n_T) cm^-5 per bin on ``response``'s grid; observing conditions drawn per ``block`` of
    consecutive pixels from ``levels`` (module docstring)."""
    levels = levels or NoiseLevels()
    channels = list(response.channels)
    K = np.asarray(response.K, np.float64)
    y_true = np.asarray(forward(K, np.asarray(em, np.float64)), np.float64)
    n_blocks = -(-len(y_true) // block)
    factors = _degradation_factors(channels, rng, levels.years, n_blocks)
    nominal = np.array([NOMINAL_EXPTIME[c] for c in channels])
    y_out, s_out = np.empty_like(y_true), np.empty_like(y_true)
    for b in range(n_blocks):
        sl = slice(b * block, (b + 1) * block)
        n = float(np.round(_log_uniform(rng, *levels.n_sample)))
        t = nominal if rng.uniform() < levels.p_nominal else _log_uniform(rng, *levels.exptime, 6)
        t = t[: len(channels)]
        f = factors[b]
        y_obs = noisy_observation(y_true[sl] * f, t, channels, rng, n_sample=n)
        s_obs = sigma_values(y_obs, t, channels, n)
        y_out[sl], s_out[sl] = y_obs / f, s_obs / f
    return y_out, s_out
