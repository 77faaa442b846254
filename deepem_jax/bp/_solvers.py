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
from ._simplex import (
    FIRST_PIVOTS,
    MAX_PIVOTS,
    PIVOT_BLOCK,
    certify_infeasible,
    solve_certified,
    solve_lp,
)
from ._types import BPStatus, LPResult
from ._warm import BasisTable, default_table

__all__ = ["DualSimplex", "HiGHS", "ToleranceSchedule"]

# Pixels per float64 call of the second pass (infeasibility certificates, re-solves of the
# uncertified pixels): small because these are a few pixels in most images. (With jax 0.10.2
# on CPU the vmapped certificate hung at 10^4 pixels per call.) The last call of the
# certificates is padded to a power of two of at least _SECOND_PASS_MIN pixels only.
_SECOND_PASS_CHUNK = 1024
_SECOND_PASS_MIN = 64
#: Fewest pixels per jitted call of the first pass: a smaller input is padded to it (a
#: consistency step's few hundred pixels then cost a quarter of a PIVOT_BLOCK call).
MIN_CHUNK = 1024

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
    infeasibility proven by the final basis or by a Farkas ray of the warm-start table.

    Attributes
    ----------
    precision : ``"float32"`` (float32 pivots; every final basis is re-evaluated in float64 and
        certified optimal or infeasible, every ray verdict re-checked in float64, and the pixels
        without a certificate, or at the pivot cap, are re-solved in float64) or
        ``"float64"`` (float64 pivots). The arrays of :class:`BPResult` have this dtype.
    max_pivots : pivot cap per pixel; MAX_ITER beyond it.
    chunk_size : largest number of pixels per jitted call. Each call, the last one of a large
        input included, is padded to a power of two, at least 1024 (the last one of several
        chunks: at least ``PIVOT_BLOCK``, 4096) and at most ``chunk_size``, so few shapes
        compile and little work goes to padding; inside a call the pivots from the all-slack
        basis run on blocks of ``PIVOT_BLOCK`` pixels (a warm start gathers the pixels it has
        to pivot from the whole call).
    warm_start : where each pixel's dual simplex starts. ``"auto"`` (default): from the best
        basis of the shipped :class:`BasisTable` for the response's channels
        (:func:`default_table`) when there is one for that dictionary, else from the all-slack
        basis; ``"table"``: the shipped table, a ValueError if there is none; a
        :class:`BasisTable`: that table; None: the all-slack basis. Only the number of pivots
        changes (and a band infeasible by less than the simplex's tolerance may be proven
        INFEASIBLE by a ray where the cold start calls it SOLVED): the answers are certified
        in float64 either way.
    """

    precision: str = "float32"
    max_pivots: int = MAX_PIVOTS
    chunk_size: int = 16_384
    warm_start: str | BasisTable | None = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"precision must be 'float32' or 'float64', got {self.precision!r}")
        object.__setattr__(self, "max_pivots", _positive_int("max_pivots", self.max_pivots))
        object.__setattr__(self, "chunk_size", _positive_int("chunk_size", self.chunk_size))
        ws = self.warm_start
        if not (ws is None or isinstance(ws, BasisTable) or ws in ("auto", "table")):
            raise ValueError(
                f"warm_start must be 'auto', 'table', a bp.BasisTable or None, got {ws!r}"
            )

    def _for(self, D: np.ndarray, channels: tuple[int, ...]) -> DualSimplex:
        """This solver with ``warm_start`` resolved to the table for dictionary ``D`` (C, n) of
        ``channels`` (Angstrom), or None."""
        ws = self.warm_start
        if ws is None or isinstance(ws, BasisTable):
            table = ws
        else:
            table = default_table(channels)
            usable = table is not None and table.n_basis == D.shape[1]
            if not usable and ws == "table":
                raise ValueError(
                    f"no shipped basis table for channels {list(channels)} and a dictionary of "
                    f"{D.shape[1]} columns; pass warm_start=None or a bp.BasisTable"
                )
            table = table if usable else None
        if table is not None and table.channels != tuple(channels):
            raise ValueError(
                f"the basis table is for channels {list(table.channels)}, the response has "
                f"{list(channels)}"
            )
        return dataclasses.replace(self, warm_start=table)

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
        table = self._table()
        prep = None if table is None else table.prepare(D, np.float32)

        def lp(lo, hi):
            return solve_certified(D, lo, hi, self.max_pivots, FIRST_PIVOTS, prep)

        size = self._call_size(len(lower))
        with jax.enable_x64(True):
            x, status, its, basis, at_upper = map_rows(
                lp, [lower, upper], size, on_chunk=on_chunk, tail_min=PIVOT_BLOCK
            )
        _certify_infeasible_verdicts(D, lower, upper, status, basis, at_upper, table)
        redo = np.flatnonzero((status < 0) | (status == BPStatus.MAX_ITER))
        if redo.size:
            second = dataclasses.replace(self, chunk_size=_SECOND_PASS_CHUNK)
            r64 = second._chunks(D, lower[redo], upper[redo], np.float64)
            x[redo], status[redo] = r64.x, r64.status
            its[redo] += r64.iterations
        return x, status, its

    def _call_size(self, n: int) -> int:
        """Pixels per jitted call for ``n`` pixels: a power of two from ``MIN_CHUNK`` (or
        ``chunk_size`` if smaller) up to ``chunk_size``."""
        return bucket(n, self.chunk_size, min(MIN_CHUNK, self.chunk_size))

    def _table(self) -> BasisTable | None:
        return self.warm_start if isinstance(self.warm_start, BasisTable) else None

    def _ray_proven(self, D, lower, upper) -> np.ndarray:
        """(N,) bool: a Farkas ray of the warm-start table proves the band (N, C) infeasible,
        in float32 as the warm start of :func:`solve_certified` does and again in float64 as
        :func:`_certify_infeasible_verdicts` does: the pixels :meth:`_lp` finds INFEASIBLE
        without a pivot. All False without a table."""
        table = self._table()
        if table is None or table.rays is None:
            return np.zeros(len(lower), bool)
        size = self._call_size(len(lower))
        f32 = [np.asarray(a, np.float32) for a in (lower, upper)]
        proven = table.proves_infeasible(D, *f32, chunk_size=size)
        idx = np.flatnonzero(proven)
        if idx.size:
            with jax.enable_x64(True):
                proven[idx] = table.proves_infeasible(D, lower[idx], upper[idx])
        return proven

    def _chunks(self, D, lower, upper, dtype, on_chunk=None) -> LPResult:
        """:func:`solve_lp` in ``dtype`` over padded chunks; numpy leaves."""
        table = self._table()

        def lp(lo, hi):
            return solve_lp(D, lo, hi, max_pivots=self.max_pivots, dtype=dtype, warm_start=table)

        size = self._call_size(len(lower))
        with jax.enable_x64(dtype == np.float64):
            return map_rows(lp, [lower, upper], size, on_chunk=on_chunk, tail_min=PIVOT_BLOCK)


def _certify_infeasible_verdicts(D, lower, upper, status, basis, at_upper, table) -> None:
    """Set ``status`` to -1 where a float32 INFEASIBLE verdict has no float64 certificate: no
    ray of ``table`` (a :class:`BasisTable` or None) proves it in float64 and the final basis
    does not prove it either."""
    idx = np.flatnonzero(status == BPStatus.INFEASIBLE)
    if idx.size == 0:
        return
    with jax.enable_x64(True):
        if table is not None:
            idx = idx[~table.proves_infeasible(D, lower[idx], upper[idx])]
        if idx.size == 0:
            return
        args = [a[idx] for a in (lower, upper, basis, at_upper)]
        proved = map_rows(
            partial(_certify_infeasible, D), args, _SECOND_PASS_CHUNK, tail_min=_SECOND_PASS_MIN
        )
    status[idx[~proved]] = -1


@dataclasses.dataclass(frozen=True)
class HiGHS:
    """SciPy's HiGHS (``scipy.optimize.linprog(method="highs")``), one call per pixel in
    float64: the slow reference for :class:`DualSimplex`. The arrays of :class:`BPResult`
    are float64."""

    @property
    def dtype(self) -> type[np.floating]:
        """numpy dtype of the results."""
        return np.float64

    def _for(self, D: np.ndarray, channels: tuple[int, ...]) -> HiGHS:
        """This solver (nothing to resolve)."""
        return self

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
