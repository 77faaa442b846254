"""Reference LP backend: SciPy's HiGHS, one ``linprog`` call per problem (slow; see the README)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from scipy.optimize import linprog

from ._types import BPStatus, LPResult

__all__ = ["highs_lp"]

# linprog status -> BPStatus: 0 optimal, 1 iteration limit, 2 infeasible, 4 numerical trouble.
_STATUS = {0: BPStatus.SOLVED, 1: BPStatus.MAX_ITER, 2: BPStatus.INFEASIBLE}


def highs_lp(
    D: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    progress: Iterable[int] | None = None,
) -> LPResult:
    """``min sum(x) s.t. lower <= D x <= upper, x >= 0`` with ``linprog(method="highs")`` per
    problem, in float64 numpy. ``D`` (C, n), ``lower``/``upper`` (N, C). ``basis`` and
    ``at_upper`` are not reported (-1 / False); ``iterations`` is HiGHS' simplex count.
    Non-finite bounds give INVALID_INPUT; HiGHS numerical trouble (status 4) gives MAX_ITER.
    ``progress`` optionally replaces ``range(N)`` (e.g. a tqdm iterator)."""
    D = np.asarray(D, dtype=np.float64)
    lower = np.asarray(lower, dtype=np.float64)
    upper = np.asarray(upper, dtype=np.float64)
    N, (C, n) = lower.shape[0], D.shape
    x = np.zeros((N, n))
    status = np.zeros(N, np.int32)
    its = np.zeros(N, np.int32)
    A = np.vstack([D, -D])
    for i in range(N) if progress is None else progress:
        if not (np.all(np.isfinite(lower[i])) and np.all(np.isfinite(upper[i]))):
            status[i] = BPStatus.INVALID_INPUT
            continue
        res = linprog(
            np.ones(n),
            A_ub=A,
            b_ub=np.concatenate([upper[i], -lower[i]]),
            bounds=(0, None),
            method="highs",
        )
        status[i] = _STATUS.get(res.status, BPStatus.MAX_ITER)
        its[i] = res.nit
        if status[i] == BPStatus.SOLVED:
            x[i] = np.maximum(res.x, 0.0)
    return LPResult(
        x, x.sum(-1), status, its, np.full((N, C), -1, np.int32), np.zeros((N, C), bool)
    )
