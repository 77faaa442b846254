"""Result pytrees and the status enumeration of the Basis Pursuit solvers."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..status import DEMStatus

__all__ = ["BPResult", "BPStatus", "LPResult"]


#: The status codes of the BP solvers: the one per-pixel status enum of deepem_jax
#: (:class:`deepem_jax.DEMStatus`); the LP solvers use SOLVED..INVALID_INPUT (0-4).
BPStatus = DEMStatus


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LPResult:
    """Solution of ``min sum(x) s.t. lower <= D x <= upper, x >= 0`` for a batch of problems.

    Attributes
    ----------
    x : (..., n) optimal point (0 where ``status != SOLVED``), units of the columns of ``D``.
    objective : (...) ``sum(x)``.
    status : (...) int32 :class:`BPStatus` code (SOLVED, INFEASIBLE, MAX_ITER or INVALID_INPUT).
    iterations : (...) int32 dual-simplex pivots taken.
    basis : (..., C) int32 final basis; index ``j < n`` is column ``j`` of ``D``, ``n + i`` the
        slack ``s_i = (D x)_i`` of row ``i``. For a problem a warm-start table's Farkas ray
        proved infeasible, the starting basis (the ray, not the basis, is the proof).
    at_upper : (..., C) bool, for each non-basic slack ``s_i``: True if at ``upper_i``, False if
        at ``lower_i`` (meaningless for basic slacks).
    """

    x: jax.Array
    objective: jax.Array
    status: jax.Array
    iterations: jax.Array
    basis: jax.Array
    at_upper: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BPResult:
    """Basis Pursuit DEM of a set of pixels (numpy arrays, leading axes as the input).

    Attributes
    ----------
    coeffs : (..., n_basis) BP coefficients in units of ``basis.scale`` cm^-5; None when
        :func:`deepem_jax.bp.solve` was asked not to keep them (``coeffs=False``).
    em : (..., n_T) emission measure per temperature bin, cm^-5.
    status : (...) int8 :class:`BPStatus` code.
    tolfac : (...) tolerance factor used (``tolfac`` times the retry factor that succeeded;
        the last factor tried for INFEASIBLE pixels, NaN for LOW_SIGNAL / INVALID_INPUT).
    iterations : (...) dual-simplex pivots (HiGHS simplex iterations with :class:`HiGHS`), summed
        over the tolerance retries and the float32 and float64 passes.
    synthetic : (..., C) resynthesised intensities ``D @ coeffs``, DN s^-1 pix^-1.
    objective : (...) ``sum(coeffs)`` (units of ``basis.scale`` cm^-5).
    """

    coeffs: np.ndarray | None
    em: np.ndarray
    status: np.ndarray
    tolfac: np.ndarray
    iterations: np.ndarray
    synthetic: np.ndarray
    objective: np.ndarray
