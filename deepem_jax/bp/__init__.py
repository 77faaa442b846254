"""Basis Pursuit DEMs as a batched, jit-compiled, exact LP (issue 3).

Per pixel, SolarSoft's ``aia_sparse_em_solve`` problem: minimise ``sum(x)`` over ``x >= 0``
subject to ``lower <= D x <= upper`` (see :func:`solve`). Public entries:

* :func:`solve` -- host driver: validation, units, chunking, adaptive tolerance, float64
  safety net; ``method="highs"`` runs the SciPy HiGHS reference pixel by pixel.
* :func:`solve_lp` -- the batched LP itself (jit-able, vmap-able, differentiable).
* :func:`solve_jax` -- jit-able, differentiable BP of intensities at one tolerance.
* :func:`bounds`, :class:`BPStatus`, :class:`LPResult`, :class:`BPResult`, :func:`highs_lp`.

Why a bounded dual simplex: on 10^5 BP-shaped pixels on 2 CPU cores
(``/work/shared/notes/bp-solver-findings.md``) one ``linprog(highs)`` per pixel gives
~750 px/s; a vmapped bounded dual simplex in JAX ~250k/155k px/s (float32/float64, toy
response) with HiGHS's answers and identical infeasibility verdicts; first-order methods
(PDHG, MPAX r2HPDHG, ADMM/OSQP) were 17--660 px/s and missed 2.7--22% of infeasible pixels. The
all-slack basis of ``[D, -I][x; s] = 0`` is dual feasible (all costs >= 0), so no phase 1 is
needed and infeasibility is proven exactly. Measured here on the real response (demregpy
table on DeepEM's 18-bin grid, 54 basis functions), see ``benchmarks/bench_bp.py``.

Gradients: the returned ``x`` is recomputed from the optimal basis with one linear solve
``x_B = B^-1 rhs(lower, upper)``; autodiff of that solve is implicit differentiation through
the active set (no unrolling of pivots), exact where the optimal basis is unique.
"""

from ._highs import highs_lp as highs_lp
from ._simplex import MAX_PIVOTS as MAX_PIVOTS
from ._simplex import solve_lp as solve_lp
from ._solve import bounds as bounds
from ._solve import solve as solve
from ._solve import solve_jax as solve_jax
from ._types import BPResult as BPResult
from ._types import BPStatus as BPStatus
from ._types import LPResult as LPResult

__all__ = [
    "MAX_PIVOTS",
    "BPResult",
    "BPStatus",
    "LPResult",
    "bounds",
    "highs_lp",
    "solve",
    "solve_jax",
    "solve_lp",
]
