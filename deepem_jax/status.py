"""One per-pixel status for every DEM method (:func:`deepem_jax.invert`)."""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["DEMStatus"]


class DEMStatus(enum.IntEnum):
    """Per-pixel outcome of :func:`deepem_jax.invert`, whatever the method.

    The Basis Pursuit solvers use the same enum (``deepem_jax.bp.BPStatus`` is this class) with
    codes 0--4. In a :class:`~deepem_jax.DEMResult` only SOLVED, OUTSIDE_BAND and MAX_STEPS
    pixels carry an EM; every other pixel has NaN EM (never a silent zero). The low-level
    ``bp.solve`` / ``bp.solve_lp`` return coefficients 0 for codes 1--3 and NaN for 4.
    """

    SOLVED = 0
    INFEASIBLE = 1
    MAX_ITER = 2
    LOW_SIGNAL = 3
    INVALID_INPUT = 4
    OUTSIDE_BAND = 5
    SATURATED = 6
    NONFINITE_OUTPUT = 7
    MAX_STEPS = 8

    @property
    def message(self) -> str:
        """What the code means for the pixel's EM."""
        return _MESSAGES[self]

    @property
    def has_em(self) -> bool:
        """True if pixels with this status carry an EM estimate."""
        return self in _WITH_EM

    @classmethod
    def with_em(cls, status: np.ndarray) -> np.ndarray:
        """(...) bool: pixels whose status carries an EM."""
        return cls.isin(status, _WITH_EM)

    @classmethod
    def isin(cls, status: np.ndarray, codes) -> np.ndarray:
        """(...) bool: pixels whose status is one of ``codes``. An int8 status array is
        looked up in a 256-entry table (``np.isin`` would make int64 temporaries of a
        full-disk status map)."""
        status = np.asarray(status)
        if status.dtype != np.int8:
            return np.isin(status, [int(c) for c in codes])
        table = np.zeros(256, bool)  # indexed by the int8 code's byte
        table[[int(c) % 256 for c in codes if -128 <= int(c) <= 127]] = True
        return np.asarray(table[status.view(np.uint8)])  # a 0-d array for a 0-d status

    @classmethod
    def counts(cls, status: np.ndarray) -> dict[str, int]:
        """Number of pixels per status name (only the statuses present)."""
        codes, n = np.unique(np.asarray(status), return_counts=True)
        return {cls(int(c)).name: int(k) for c, k in zip(codes, n, strict=True)}


_WITH_EM = (DEMStatus.SOLVED, DEMStatus.OUTSIDE_BAND, DEMStatus.MAX_STEPS)

_MESSAGES = {
    DEMStatus.SOLVED: (
        "EM found; BP and the network: its resynthesis lies inside the tolerance band; fit: "
        "the fit converged (its chi2 says how well it matches the data)"
    ),
    DEMStatus.INFEASIBLE: (
        "no non-negative EM reproduces the data within the tolerance (after all retries)"
    ),
    DEMStatus.MAX_ITER: "the solver's iteration limit was reached before optimality",
    DEMStatus.LOW_SIGNAL: "summed signal below the solver's minimum; not solved",
    DEMStatus.INVALID_INPUT: "NaN/Inf intensity, or sigma not finite and positive",
    DEMStatus.OUTSIDE_BAND: (
        "EM kept (network estimate), but its resynthesis lies outside the tolerance band in "
        "at least one channel"
    ),
    DEMStatus.SATURATED: "a channel is saturated (or bloomed) at this pixel",
    DEMStatus.NONFINITE_OUTPUT: "the method returned a non-finite EM",
    DEMStatus.MAX_STEPS: (
        "EM kept (the fit's last finite step), but the fit stopped before converging: at its "
        "step limit, or where a further step was not finite"
    ),
}
