"""Basis Pursuit DEMs as a batched, jit-compiled, exact linear program.

Per pixel, SolarSoft's ``aia_sparse_em_solve`` problem: minimise ``sum(x)`` over ``x >= 0``
subject to ``lower <= D x <= upper``, where ``D`` (C, n_basis) is the dictionary (DN s^-1 pix^-1
per unit coefficient) and the band comes from the intensities and their uncertainties
(:func:`bounds`).

Entry points
------------
* :func:`solve` -- host driver for images: validation, units, chunking, the tolerance schedule
  (retries of infeasible pixels with a wider band) and per-pixel status codes. Configured by
  :class:`DualSimplex` or :class:`HiGHS` (``solver=``) and :class:`ToleranceSchedule`.
* :func:`solve_lp` -- the batched LP itself (jit-able, vmap-able, differentiable).
* :func:`solve_jax` -- jit-able, differentiable BP of intensities at one tolerance.
* :func:`highs_lp` -- the same LP with SciPy's HiGHS, one problem at a time (the reference).

Method and exactness
--------------------
A bounded dual simplex, vmapped over pixels. Each problem is written as ``[D, -I][x; s] = 0``
with ``x >= 0`` and boxed slacks; every cost is non-negative, so the all-slack basis is dual
feasible, no phase 1 is needed, and a leaving row that no column can repair proves the pixel
infeasible. The answers are vertices of the LP, not approximations: with ``DualSimplex(
precision="float64")`` they are HiGHS's; with the default ``precision="float32"`` the pivots run
in float32 and every final basis is re-evaluated in float64 and certified, either optimal
(primal and dual feasible) or infeasible (by the basis, or by a Farkas ray of the warm-start
table, re-checked in float64), and the pixels without such a certificate are re-solved in
float64. Measured speed and agreement with HiGHS are in the README.

Gradients
---------
The returned ``x`` is recomputed from the optimal basis with one linear solve
``x_B = B^-1 rhs(lower, upper)``; autodiff of that solve is implicit differentiation through
the active set (no unrolling of pivots), exact where the optimal basis is unique. LP solutions
are only piecewise smooth: at degenerate points the gradient of one adjacent piece is returned,
and pixels that are not SOLVED get zero gradients.
"""

from ._highs import highs_lp as highs_lp
from ._simplex import MAX_PIVOTS as MAX_PIVOTS
from ._simplex import PIVOT_BLOCK as PIVOT_BLOCK
from ._simplex import solve_lp as solve_lp
from ._solve import bounds as bounds
from ._solve import solve as solve
from ._solve import solve_jax as solve_jax
from ._solvers import DualSimplex as DualSimplex
from ._solvers import HiGHS as HiGHS
from ._solvers import ToleranceSchedule as ToleranceSchedule
from ._types import BPResult as BPResult
from ._types import BPStatus as BPStatus
from ._types import LPResult as LPResult
from ._warm import BasisTable as BasisTable
from ._warm import default_table as default_table
from ._warm import learn_table as learn_table

__all__ = [
    "MAX_PIVOTS",
    "PIVOT_BLOCK",
    "BPResult",
    "BPStatus",
    "BasisTable",
    "DualSimplex",
    "HiGHS",
    "LPResult",
    "ToleranceSchedule",
    "bounds",
    "default_table",
    "highs_lp",
    "learn_table",
    "solve",
    "solve_jax",
    "solve_lp",
]
