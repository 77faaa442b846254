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
needed and infeasibility is proven exactly. Measured here (``python benchmarks/bench_bp.py
--pixels 20000 --highs-pixels 500``; SolarSoft GENX response on DeepEM's 18-bin grid, 54 basis
functions, 2 CPU cores shared with other jobs): full driver ``solve`` incl. retries ~49k px/s
float32 (float64-certified) and ~46k px/s float64, HiGHS per pixel ~450 px/s (100--108x),
identical statuses, objectives within 6e-8 (float32) / 7e-14 (float64) of HiGHS. The bare
float32 ``solve_lp`` runs ~70--80k px/s; measured mean 9--10 pivots, max ~40.

float32 pivots alone are not guaranteed exact on the real response (the notes measured
0.2--1.6% of pixels off without scaling safeguards; here 1 pixel in 4096 had no float64
certificate), so ``solve(precision="float32")`` re-evaluates every final basis in
float64, certifies optimality (primal and dual feasibility) or infeasibility (a violated row
no column can repair), and re-solves in float64 the few without a certificate.

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
