"""Configuration of :func:`deepem_jax.bp.solve`: small frozen objects for the LP solver and the
tolerance schedule, validated when built and kept apart from the pixel data."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from functools import partial
from numbers import Integral, Real

import jax
import numpy as np

from .._batching import bucket, map_rows
from ._highs import highs_lp
from ._simplex import MAX_PIVOTS, PIVOT_BLOCK, certify_infeasible, certify_optimal, solve_lp
from ._types import BPStatus, LPResult

__all__ = ["DualSimplex", "HiGHS", "ToleranceSchedule"]

# Pixels per float64 certificate call: with jax 0.10.2 on CPU the vmapped certificate hung (no
# progress in minutes) at 10^4 pixels per call while 8000 took 0.6 s; 4096 is safe.
_CERT_CHUNK = 4096

_certify_optimal = jax.jit(jax.vmap(certify_optimal, (None, 0, 0, 0, 0)))
_certify_infeasible = jax.jit(jax.vmap(certify_infeasible, (None, 0, 0, 0, 0)))

#: (x (N, n) float64, status (N,) int32 BPStatus codes, pivots or simplex iterations (N,) int32)
LPArrays = tuple[np.ndarray, np.ndarray, np.ndarray]


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _finite(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float, or a ValueError unless it is a finite real number that is
    ``> 0`` (``positive``) or ``>= 0``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {need}, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class DualSimplex:
    """The batched bounded dual simplex in JAX (:func:`deepem_jax.bp.solve_lp`): exact, with
    infeasibility proven by the final basis.

    Attributes
    ----------
    precision : ``"float32"`` (float32 pivots; every final basis is re-evaluated in float64 and
        certified optimal or infeasible, and the pixels without a certificate, or at the pivot
        cap, are re-solved in float64) or ``"float64"`` (float64 pivots). The arrays of
        :class:`BPResult` have this dtype.
    max_pivots : pivot cap per pixel; MAX_ITER beyond it.
    chunk_size : largest number of pixels per jitted call. Calls are padded to a power of two,
        at least ``PIVOT_BLOCK`` (4096) and at most ``chunk_size``, so few shapes compile (the
        padding pixels are optimal at the start and cost little); inside a call the pivots
        run on blocks of ``PIVOT_BLOCK`` pixels.
    """

    precision: str = "float32"
    max_pivots: int = MAX_PIVOTS
    chunk_size: int = 16_384

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        object.__setattr__(self, "max_pivots", _positive_int("max_pivots", self.max_pivots))
        object.__setattr__(self, "chunk_size", _positive_int("chunk_size", self.chunk_size))

    @property
    def dtype(self) -> type[np.floating]:
        """numpy dtype of the results."""
        return np.float32 if self.precision == "float32" else np.float64

    def _lp(
        self,
        D: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        on_chunk: Callable[[int], None] | None = None,
    ) -> LPArrays:
        """Exact LP of (N, C) bounds (float64) with dictionary ``D`` (C, n); ``on_chunk(m)``
        after each chunk of ``m`` pixels of the first pass."""
        if self.precision == "float64":
            res = self._chunks(D, lower, upper, np.float64, on_chunk)
            return res.x, res.status, res.iterations
        res = self._chunks(D, lower, upper, np.float32, on_chunk)
        x, status = _certify(D, lower, upper, res)
        its = res.iterations
        redo = np.flatnonzero((status < 0) | (status == BPStatus.MAX_ITER))
        if redo.size:
            r64 = self._chunks(D, lower[redo], upper[redo], np.float64)
            x[redo], status[redo] = r64.x, r64.status
            its[redo] += r64.iterations
        return x, status, its

    def _chunks(self, D, lower, upper, dtype, on_chunk=None) -> LPResult:
        """:func:`solve_lp` in ``dtype`` over padded chunks; numpy leaves."""

        def lp(lo, hi):
            return solve_lp(D, lo, hi, max_pivots=self.max_pivots, dtype=dtype)

        size = bucket(len(lower), self.chunk_size, min(PIVOT_BLOCK, self.chunk_size))
        with jax.enable_x64(dtype == np.float64):
            return map_rows(lp, [lower, upper], size, on_chunk=on_chunk)


def _certify(D, lower, upper, res: LPResult) -> tuple[np.ndarray, np.ndarray]:
    """float64 re-evaluation of float32 final bases: the vertex (N, n) of each SOLVED basis and
    the status, set to -1 where a SOLVED (INFEASIBLE) basis is not certified optimal
    (infeasible) in float64."""
    x, status = res.x.astype(np.float64), res.status
    with jax.enable_x64(True):
        for check, code in ((_certify_optimal, 0), (_certify_infeasible, 1)):
            idx = np.flatnonzero(status == code)
            if idx.size == 0:
                continue
            args = [a[idx] for a in (lower, upper, res.basis, res.at_upper)]
            size = bucket(idx.size, _CERT_CHUNK, _CERT_CHUNK)  # one compiled shape
            out = map_rows(partial(check, D), args, size)
            if code == 0:
                x[idx], out = out
            status[idx[~out]] = -1
    return x, status


@dataclasses.dataclass(frozen=True)
class HiGHS:
    """SciPy's HiGHS (``scipy.optimize.linprog(method="highs")``), one call per pixel in
    float64: the slow reference for :class:`DualSimplex`. The arrays of :class:`BPResult`
    are float64."""

    @property
    def dtype(self) -> type[np.floating]:
        """numpy dtype of the results."""
        return np.float64

    def _lp(
        self,
        D: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        on_chunk: Callable[[int], None] | None = None,
    ) -> LPArrays:
        """LP of (N, C) bounds with dictionary ``D`` (C, n); ``on_chunk(1)`` after each pixel."""
        ticks = None if on_chunk is None else _ticking(on_chunk, len(lower))
        r = highs_lp(D, lower, upper, ticks)
        return r.x, r.status, r.iterations


def _ticking(on_chunk: Callable[[int], None], n: int) -> Iterator[int]:
    for i in range(n):
        yield i
        on_chunk(1)


@dataclasses.dataclass(frozen=True)
class ToleranceSchedule:
    """How the BP tolerance band is built and widened (SolarSoft ``aia_sparse_em_solve``).

    Attributes
    ----------
    symmbuff : the band is ``max(y - symmbuff * tol, 0) <= D x <= y + tol`` with
        ``tol = tolfac * sigma`` (dimensionless, >= 0).
    retry_factors : pixels infeasible at ``tolfac`` are retried at ``tolfac * f`` for each ``f``
        in turn (finite, > 0; empty for no retries).
    min_signal : pixels with ``sum(max(y, 0)) < min_signal`` (DN s^-1 pix^-1) are LOW_SIGNAL and
        not solved (finite, >= 0).
    """

    symmbuff: float = 1.0
    retry_factors: tuple[float, ...] = (1.5, 2.25)
    min_signal: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "symmbuff", _finite("symmbuff", self.symmbuff))
        object.__setattr__(self, "min_signal", _finite("min_signal", self.min_signal))
        factors = self.retry_factors
        if isinstance(factors, (str, bytes)) or not hasattr(factors, "__iter__"):
            raise ValueError(f"retry_factors must be a sequence of numbers, got {factors!r}")
        factors = tuple(_finite("each retry factor", f, positive=True) for f in factors)
        object.__setattr__(self, "retry_factors", factors)

    @property
    def factors(self) -> tuple[float, ...]:
        """Multipliers of ``tolfac`` in the order they are tried: 1, then ``retry_factors``."""
        return (1.0, *self.retry_factors)
