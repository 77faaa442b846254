"""Cheung et al. (2015) Basis Pursuit basis on a log T grid, and the BP dictionary.

Basis functions ``B[j, t]`` (n_basis x n_T, dimensionless): for each width ``s`` in ``widths``
and each grid point ``logT_m``, a Dirac delta (``s == 0``) or a Gaussian
``exp(-((logT - logT_m)/s)^2)`` set to zero where it falls below ``cutoff`` (0.04, as in
SolarSoft's ``aia_sparse_em_init``). Coefficients ``x`` are in units of ``scale`` cm^-5
(default 1e26 cm^-5), so::

    EM    = scale * B.T @ x          (cm^-5 per log T bin)
    D     = scale * K @ B.T          (DN s^-1 pix^-1 per unit coefficient)
    y     = D @ x = K @ EM
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .response import TemperatureResponse

__all__ = ["DEFAULT_WIDTHS", "EM_SCALE", "Basis", "cheung_basis", "dictionary"]

#: SolarSoft's default basis widths (its older default also had 0.6).
DEFAULT_WIDTHS = (0.0, 0.1, 0.2)
#: Unit of BP coefficients, cm^-5.
EM_SCALE = 1e26


@dataclasses.dataclass(frozen=True)
class Basis:
    """A set of basis functions ``B`` (n_basis x n_T) on ``logt``; ``widths[j]`` is the width
    of function ``j`` (0 for a delta) and ``centers[j]`` its centre in log T."""

    B: np.ndarray
    logt: tuple[float, ...]
    widths: np.ndarray
    centers: np.ndarray
    scale: float = EM_SCALE

    @property
    def n_basis(self) -> int:
        return self.B.shape[0]

    def em(self, coeffs: jax.Array) -> jax.Array:
        """EM per temperature bin (cm^-5), shape (..., n_T), from coefficients (..., n_basis)."""
        return self.scale * jnp.asarray(coeffs) @ jnp.asarray(self.B, dtype=jnp.result_type(coeffs))


def cheung_basis(
    logt: Sequence[float] | np.ndarray,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    cutoff: float = 0.04,
    scale: float = EM_SCALE,
) -> Basis:
    """Build the Cheung et al. (2015) basis on ``logt`` for the given Gaussian ``widths``
    (log T units, 0 means Dirac deltas)."""
    lt = np.asarray(logt, dtype=np.float64)
    if lt.ndim != 1 or lt.size < 2 or not np.all(np.isfinite(lt)) or not np.all(np.diff(lt) > 0):
        raise ValueError("logt must be finite, 1-D, strictly increasing with >= 2 points")
    w = np.asarray(widths, dtype=np.float64)
    if w.ndim != 1 or w.size == 0 or np.any(~np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"basis widths must be non-empty, finite and >= 0, got {widths}")
    if not 0 <= cutoff < 1:
        raise ValueError(f"cutoff must be in [0, 1), got {cutoff}")
    blocks, wid, cen = [], [], []
    for s in w:
        if s == 0:
            b = np.eye(lt.size)
        else:
            b = np.exp(-(((lt[None, :] - lt[:, None]) / s) ** 2))
            b[b < cutoff] = 0.0
        blocks.append(b)
        wid.append(np.full(lt.size, s))
        cen.append(lt.copy())
    return Basis(np.vstack(blocks), tuple(lt), np.concatenate(wid), np.concatenate(cen), scale)


def dictionary(response: TemperatureResponse, basis: Basis) -> np.ndarray:
    """BP dictionary ``D = scale * K @ B.T`` (n_channels x n_basis), DN s^-1 pix^-1 per unit
    coefficient. The response must be on the basis grid (use ``response.regrid``).

    A numpy ``K`` gives a float64 numpy ``D``; a JAX ``K`` (e.g. traced, to differentiate with
    respect to the response) gives a JAX array in its dtype."""
    if len(response.logt) != len(basis.logt) or not np.allclose(
        response.logt_array, basis.logt, atol=1e-6
    ):
        raise ValueError(
            "response and basis use different log T grids; call response.regrid(basis.logt)"
        )
    if isinstance(response.K, np.ndarray):  # host constant: exact float64
        return basis.scale * (response.K @ basis.B.T)
    return basis.scale * (response.K @ jnp.asarray(basis.B, dtype=response.K.dtype).T)
