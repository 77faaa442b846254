"""Batched bounded dual simplex for ``min sum(x) s.t. lower <= D x <= upper, x >= 0``.

Each problem is written as ``[D, -I] [x; s] = 0`` with ``x >= 0`` (cost 1) and boxed slacks
``lower <= s <= upper`` (cost 0). Every cost is non-negative, so the all-slack basis is dual
feasible and a *dual* simplex needs no phase 1; a leaving row without any eligible entering
column is a certificate of primal infeasibility. Rows are scaled by ``max(|lower|, |upper|)`` and
columns by their largest scaled entry per problem, so float32 pivots stay on the right vertices.
The C x C basis inverse is kept per problem and updated per pivot; products with the shared
``D`` are batched matmuls under ``vmap``. The Harris two-pass ratio test (largest pivot among
near-ties) guards against tiny pivots and stalling.

The returned point is recomputed from the final basis with one linear solve,
``x_B = B^-1 rhs(lower, upper)``, with the basis indices held fixed. Differentiating that solve
is exactly implicit differentiation of the LP through its optimal basis (the active set), so
``jax.grad`` / ``jax.vjp`` of functions of ``x`` w.r.t. ``D``, ``lower`` and ``upper`` work
and are exact wherever the optimal basis is locally unique (LP solutions are only piecewise
smooth: at degenerate points the gradient of one adjacent piece is returned).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from .._batching import map_blocks, map_bounds_blocks
from .._cache import enable_compilation_cache
from .._linalg import small_solve
from ._types import BPStatus, LPResult
from ._warm import SUB_BLOCK, BasisTable, choose_start, prove_infeasible

__all__ = [
    "basic_solution",
    "certify_infeasible",
    "certify_optimal",
    "solve_certified",
    "solve_lp",
]

#: Default pivot cap per problem; the pivot counts measured on AIA dictionaries (README) stay
#: well below it.
MAX_PIVOTS = 64

# (primal feasibility, dual feasibility / Harris, pivot magnitude) tolerances in scaled units.
_TOLS = {4: (1e-6, 1e-7, 1e-6), 8: (1e-10, 1e-11, 1e-9)}


def _scales(D: jax.Array, lower: jax.Array, upper: jax.Array):
    """Row scales ``r`` (C,), column scales ``S`` (n,) and costs ``c`` (n,) of one problem."""
    big = jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    dmax = jnp.max(jnp.abs(D), axis=1)
    r = 1.0 / jnp.where(big > 0, big, jnp.where(dmax > 0, dmax, 1.0))
    cmax = jnp.max(jnp.abs(D) * r[:, None], axis=0)
    S = 1.0 / jnp.where(cmax > 0, cmax, 1.0)
    return r, S, S / jnp.max(S)


def _basis_matrix(D, r, S, basis):
    """Scaled basis matrix (C, C): column k is the scaled column ``basis[k]`` of ``[D, -I]``."""
    C, n = D.shape
    j = jnp.minimum(basis, n - 1)
    cols = r[:, None] * jnp.take(D, j, axis=1) * S[j]
    slack = -jax.nn.one_hot(basis - n, C, dtype=D.dtype).T
    return jnp.where((basis < n)[None, :], cols, slack)


def _setup(D, lower, upper):
    """Scaled data of one problem: bounds of ``[x; s]`` and costs."""
    C, n = D.shape
    dt = D.dtype
    r, S, c_x = _scales(D, lower, upper)
    return dict(
        r=r,
        S=S,
        c=jnp.concatenate([c_x, jnp.zeros(C, dt)]),
        lo=jnp.concatenate([jnp.zeros(n, dt), r * lower]),
        hi=jnp.concatenate([jnp.full(n, jnp.inf, dt), r * upper]),
    )


def _init(D):
    """All-slack starting state (Binv, basis, stat, c_B, code, iterations); ``stat`` is 0 for
    basic, 1 at lower, 2 at upper; ``c_B`` the costs of the basic variables; ``code`` -1 while
    running, then 0 optimal / 1 infeasible."""
    C, n = D.shape
    return (
        -jnp.eye(C, dtype=D.dtype),
        jnp.arange(n, n + C, dtype=jnp.int32),
        jnp.concatenate([jnp.ones(n, jnp.int8), jnp.zeros(C, jnp.int8)]),
        jnp.zeros(C, D.dtype),
        jnp.int32(-1),
        jnp.int32(0),
    )


def _init_from(D, p, basis, slack_stat):
    """Starting state of one problem at a given basis: ``basis`` (C,) as in :class:`LPResult`
    and ``slack_stat`` (C,) int8, per row 0 if its slack is basic, 1 at lower, 2 at upper. The
    basis must be dual feasible for the dual simplex to stay exact (the float64 certificate of
    :class:`~deepem_jax.bp.DualSimplex` checks the end point); a singular or non-finite basis
    matrix falls back to the all-slack start."""
    C, n = D.shape
    binv = small_solve(_basis_matrix(D, p["r"], p["S"], basis), jnp.eye(C, dtype=D.dtype))
    stat = jnp.concatenate([jnp.ones(n, jnp.int8), slack_stat.astype(jnp.int8)])
    member = jnp.arange(n + C, dtype=basis.dtype)[:, None] == basis[None, :]
    stat = jnp.where(jnp.any(member, 1), jnp.int8(0), stat)
    start = (binv, basis.astype(jnp.int32), stat, p["c"][basis], jnp.int32(-1), jnp.int32(0))
    ok = jnp.all(jnp.isfinite(binv)) & jnp.all(jnp.abs(binv) < 1 / jnp.finfo(D.dtype).eps)
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), start, _init(D))


def _first_argmax(v: jax.Array) -> jax.Array:
    """Index of the first maximum of a 1-D array (as ``jnp.argmax`` without NaNs), from a max
    and a min reduction: XLA's CPU backend runs ``argmax`` (a two-operand reduction) about 5x
    slower under ``vmap``."""
    k = v.shape[0]
    idx = jnp.where(v == jnp.max(v), jnp.arange(k, dtype=jnp.int32), k)
    return jnp.minimum(jnp.min(idx), k - 1)


def _step(D, p, state):
    """One dual-simplex pivot (or the optimality / infeasibility verdict) of one problem.
    Single entries are read and written by index (gathers and scatters of one row or entry:
    under ``vmap`` on CPU cheaper than masks over the row or the columns)."""
    C, n = D.shape
    dt = D.dtype
    tol_p, tol_d, tol_a = _TOLS[jnp.dtype(dt).itemsize]
    r, S, c, lo, hi = p["r"], p["S"], p["c"], p["lo"], p["hi"]
    Binv, basis, stat, c_b, code, it = state
    lo_s, hi_s, stat_s = lo[n:], hi[n:], stat[n:]
    # non-basic x sit at 0, so only the non-basic slacks enter x_B = -B^-1 [D', -I] z_N
    z_s = jnp.where(stat_s == 1, lo_s, jnp.where(stat_s == 2, hi_s, 0.0))
    x_b = Binv @ z_s
    # bounds of the basic variables: [0, inf) for columns of D, [lo_k, hi_k] for slack k
    slack_row = jnp.maximum(basis - n, 0)
    lo_b = jnp.where(basis >= n, lo_s[slack_row], 0.0)
    hi_b = jnp.where(basis >= n, hi_s[slack_row], jnp.inf)
    below = lo_b - x_b
    above = x_b - hi_b
    infeas = jnp.maximum(jnp.maximum(below, above), 0.0)
    row = _first_argmax(infeas * jax.lax.rsqrt(jnp.sum(Binv * Binv, 1)))
    at_row = jnp.arange(C, dtype=jnp.int32) == row
    optimal = jnp.max(infeas) <= tol_p
    go_low = jnp.any(at_row & (below > 0))
    rho = Binv[row]
    y = c_b @ Binv
    # one product with the shared D for the duals and the pivot row
    yd, rd = ((jnp.stack([y, rho]) * r) @ D) * S
    d = c - jnp.concatenate([yd, -y])
    alpha = jnp.concatenate([rd, -rho])
    t = jnp.where(go_low, -alpha, alpha)
    cand = ((stat == 1) & (t > tol_a)) | ((stat == 2) & (t < -tol_a))
    abs_d = jnp.where(stat == 2, jnp.maximum(-d, 0.0), jnp.maximum(d, 0.0))
    abs_a = jnp.abs(alpha)
    safe_a = jnp.where(cand, abs_a, 1.0)
    theta = jnp.min(jnp.where(cand, (abs_d + tol_d) / safe_a, jnp.inf))
    ok = cand & (abs_d / safe_a <= theta)
    q = _first_argmax(jnp.where(ok, abs_a, -1.0))
    infeasible = ~jnp.any(cand)
    at_q = jnp.arange(n + C, dtype=jnp.int32) == q
    q_col = jnp.minimum(q, n - 1)
    a_q = jnp.where(q < n, r * D[:, q_col] * S[q_col], 0.0) - at_q[n:].astype(dt)
    col = Binv @ a_q
    new_row = rho / col[row]
    new_binv = jnp.where(at_row[:, None], new_row[None, :], Binv - jnp.outer(col, new_row))
    leave = jnp.where(go_low, jnp.int8(1), jnp.int8(2))
    new_stat = stat.at[basis[row]].set(leave).at[q].set(jnp.int8(0))
    pivot = ~optimal & ~infeasible
    swap = pivot & at_row
    code = jnp.where(optimal, jnp.int32(0), jnp.where(infeasible, jnp.int32(1), jnp.int32(-1)))
    return (
        jnp.where(pivot, new_binv, Binv),
        jnp.where(swap, q, basis),
        jnp.where(pivot, new_stat, stat),
        jnp.where(swap, c[q], c_b),
        code,
        it + pivot.astype(jnp.int32),
    )


def _run(D, p, state, limit):
    """Pivot one problem until a verdict or ``limit`` total pivots."""
    return jax.lax.while_loop(
        lambda s: (s[4] < 0) & (s[5] < limit), lambda s: _step(D, p, s), state
    )


def _pivots_batch(D, lower, upper, max_pivots, first_pivots, gather):
    """Dual simplex on a batch: every problem runs ``first_pivots`` pivots, then the unfinished
    ones are gathered ``gather`` at a time into a smaller batch that runs at most
    :data:`ROUND_PIVOTS` more, until none is left (a vmapped ``while_loop`` costs as much as
    its slowest lane: short rounds, each gathering the problems still running, keep the lanes
    busy). Returns (basis, at_upper, code, iterations) with code 0 optimal, 1 infeasible, 2
    pivot cap.
    """
    N = lower.shape[0]
    n = D.shape[1]
    p = jax.vmap(_setup, (None, 0, 0))(D, lower, upper)
    state = jax.tree.map(lambda a: jnp.broadcast_to(a, (N, *a.shape)), _init(D))
    run = jax.vmap(_run, (None, 0, 0, 0))
    state = run(D, p, state, jnp.full(N, min(first_pivots, max_pivots), jnp.int32))

    def unfinished(st):
        return (st[4] < 0) & (st[5] < max_pivots)

    def round_(st):
        idx = jnp.nonzero(unfinished(st), size=gather, fill_value=N)[0]
        take = jnp.minimum(idx, N - 1)
        sub_p = jax.tree.map(lambda a: a[take], p)
        sub = jax.tree.map(lambda a: a[take], st)
        # padding lanes are marked finished so they cost one predicate evaluation only
        sub = (*sub[:4], jnp.where(idx < N, sub[4], 0), sub[5])
        sub = run(D, sub_p, sub, jnp.minimum(sub[5] + ROUND_PIVOTS, max_pivots))
        return jax.tree.map(lambda a, b: a.at[idx].set(b, mode="drop"), st, sub)

    state = jax.lax.while_loop(lambda st: jnp.any(unfinished(st)), round_, state)
    _, basis, stat, _, code, it = state
    return basis, stat[:, n:] == 2, jnp.where(code < 0, jnp.int32(2), code), it


def _pivots_warm(D, lower, upper, max_pivots, gather, table):
    """Dual simplex on a batch started from the bases of a table (:func:`choose_start`):
    every problem is tried against the table's most frequent bases (``table["head"]``);
    problems whose start is already feasible are done (zero pivots), and so are those a ray
    of the table proves infeasible (:func:`prove_infeasible`; their basis is the start's);
    the others are gathered ``gather`` at a time, given the best start of the whole table
    (``table["full"]``) and run from it to the end. Returns as :func:`_pivots_batch`."""
    N = lower.shape[0]
    n = D.shape[1]
    basis, slack_stat, done = choose_start(table["head"], lower, upper)
    code = jnp.where(done, 0, -1)
    if table["rays"] is not None:
        proven = map_bounds_blocks(
            partial(prove_infeasible, table["rays"]), lower, upper, SUB_BLOCK
        )
        code = jnp.where(~done & proven, 1, code)
    state = (basis, slack_stat, code.astype(jnp.int32), jnp.zeros(N, jnp.int32))
    run = jax.vmap(_run, (None, 0, 0, None))

    def round_(st):
        idx = jnp.nonzero(st[2] < 0, size=gather, fill_value=N)[0]
        take = jnp.minimum(idx, N - 1)
        sub_lo, sub_hi = lower[take], upper[take]
        sub_basis, sub_stat, _ = choose_start(table["full"], sub_lo, sub_hi)
        sub_p = jax.vmap(_setup, (None, 0, 0))(D, sub_lo, sub_hi)
        sub = jax.vmap(_init_from, (None, 0, 0, 0))(D, sub_p, sub_basis, sub_stat)
        sub = (*sub[:4], jnp.where(idx < N, sub[4], 0), sub[5])
        _, b, stat, _, code, it = run(D, sub_p, sub, max_pivots)
        code = jnp.where(code < 0, 2, code)  # still running at the cap: MAX_ITER
        new = (b, stat[:, n:], code, it)
        return jax.tree.map(lambda a, v: a.at[idx].set(v, mode="drop"), st, new)

    state = jax.lax.while_loop(lambda st: jnp.any(st[2] < 0), round_, state)
    basis, slack_stat, code, it = state
    return basis, slack_stat == 2, code, it


def _vertex(D, lower, upper, basis, at_upper):
    """Scaled basic values ``z_B = B^-1 r rhs`` of one problem (basis held fixed), with the
    scaled basis matrix and scales; differentiable in D, lower and upper."""
    C, n = D.shape
    r, S, c_x = jax.lax.stop_gradient(_scales(D, lower, upper))
    slack = n + jnp.arange(C, dtype=basis.dtype)  # column index of each row's slack
    nonbasic_slack = ~jnp.any(basis[None, :] == slack[:, None], axis=1)
    rhs = jnp.where(nonbasic_slack, jnp.where(at_upper, upper, lower), 0.0)
    B = _basis_matrix(D, r, S, basis)
    return small_solve(B, r * rhs), B, r, S, c_x


def basic_solution(
    D: jax.Array, lower: jax.Array, upper: jax.Array, basis: jax.Array, at_upper: jax.Array
) -> jax.Array:
    """The vertex ``x`` (n,) of one problem defined by a basis: ``x_B = B^-1 rhs`` where
    ``rhs_i`` is the bound (``lower_i`` or ``upper_i`` per ``at_upper``) of each non-basic
    slack. Differentiable in ``D``, ``lower`` and ``upper`` (the basis is held fixed)."""
    n = D.shape[1]
    z_b, _, _, S, _ = _vertex(D, lower, upper, basis, at_upper)
    return S * jnp.zeros(n + D.shape[0], D.dtype).at[basis].set(z_b)[:n]


#: Certificate tolerances (scaled units): feasibility / reduced costs, and pivot magnitude.
_CERT_TOL, _CERT_EPS = 1e-7, 1e-9


def certify_optimal(
    D: jax.Array, lower: jax.Array, upper: jax.Array, basis: jax.Array, at_upper: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Vertex (n,) of a final basis of one problem and whether it is optimal (primal and dual
    feasible within 1e-7 in scaled units), in the dtype of the inputs: run in float64 to
    certify a float32 solve. D (C, n); lower, upper (C,); basis (C,) int; at_upper (C,).
    Values are read and placed by basis index (gathers and scatters of C entries: under
    ``vmap`` on CPU cheaper than (n, C) masks)."""
    C, n = D.shape
    z_b, B, r, S, c_x = _vertex(D, lower, upper, basis, at_upper)
    structural = basis < n
    row = jnp.maximum(basis - n, 0)  # the row of each basic slack
    lo_b = jnp.where(structural, 0.0, (r * lower)[row])
    hi_b = jnp.where(structural, jnp.inf, (r * upper)[row])
    primal = jnp.all((z_b >= lo_b - _CERT_TOL) & (z_b <= hi_b + _CERT_TOL))
    y = small_solve(B.T, jnp.where(structural, c_x[jnp.minimum(basis, n - 1)], 0.0))
    d_x = c_x - ((y * r) @ D) * S  # reduced costs of the columns; y_i is that of slack i
    in_basis = jnp.zeros(n + C, bool).at[basis].set(True)
    dual = jnp.all(in_basis[:n] | (d_x >= -_CERT_TOL)) & jnp.all(
        in_basis[n:] | jnp.where(at_upper, y <= _CERT_TOL, y >= -_CERT_TOL)
    )
    x = S * jnp.zeros(n + C, D.dtype).at[basis].add(z_b)[:n]
    return jnp.maximum(x, 0.0), primal & dual


def certify_infeasible(
    D: jax.Array, lower: jax.Array, upper: jax.Array, basis: jax.Array, at_upper: jax.Array
) -> jax.Array:
    """Whether a final basis of one problem proves infeasibility: some basic row is violated
    by more than 1e-7 (scaled) and no non-basic column (|pivot| > 1e-9) can reduce the
    violation. Arguments as :func:`certify_optimal`."""
    C, n = D.shape
    dt = D.dtype
    z_b, B, r, S, _ = _vertex(D, lower, upper, basis, at_upper)
    in_basis = jnp.zeros(n + C, bool).at[basis].set(True)
    lo = jnp.concatenate([jnp.zeros(n, dt), r * lower])[basis]
    hi = jnp.concatenate([jnp.full(n, jnp.inf, dt), r * upper])[basis]
    A = jnp.concatenate([r[:, None] * D * S[None, :], -jnp.eye(C, dtype=dt)], axis=1)
    upper_nb = jnp.concatenate([jnp.zeros(n, bool), at_upper]) & ~in_basis
    lower_nb = ~upper_nb & ~in_basis
    alpha = small_solve(B, A)
    can_raise = jnp.any((lower_nb & (alpha < -_CERT_EPS)) | (upper_nb & (alpha > _CERT_EPS)), 1)
    can_lower = jnp.any((lower_nb & (alpha > _CERT_EPS)) | (upper_nb & (alpha < -_CERT_EPS)), 1)
    below, above = lo - z_b > _CERT_TOL, z_b - hi > _CERT_TOL
    return jnp.any((below & ~can_raise) | (above & ~can_lower))


#: Problems per block of the pivot loop inside :func:`solve_lp`: larger batches are split into
#: blocks run one after another (``lax.map``), which keeps the loop's arrays in the CPU caches.
PIVOT_BLOCK = 4096
#: A warm-started batch of N problems is not split into blocks: the problems whose start is
#: not optimal are gathered ``N // WARM_GATHER`` at a time from the whole batch.
WARM_GATHER = 64


def _pivots_blocked(D, lower, upper, max_pivots, first_pivots, gather):
    """:func:`_pivots_batch` over blocks of at most :data:`PIVOT_BLOCK` problems, each block's
    unfinished problems gathered ``max(block // gather, 1)`` at a time; the padding problems
    (bounds [0, 1]) are optimal at the start."""

    def batch(lo, hi):
        g = min(max(len(lo) // gather, 1), len(lo))
        return _pivots_batch(D, lo, hi, max_pivots, first_pivots, g)

    return map_bounds_blocks(batch, lower, upper, PIVOT_BLOCK)


def _clean(D, lower, upper):
    """Bounds and ``D`` with non-finite entries replaced, and the INVALID_INPUT (non-finite)
    and crossed (``lower > upper``) masks (N,)."""
    invalid = ~(
        jnp.all(jnp.isfinite(lower), -1)
        & jnp.all(jnp.isfinite(upper), -1)
        & jnp.all(jnp.isfinite(D))
    )
    crossed = jnp.any(lower > upper, -1) & ~invalid
    bad = invalid | crossed
    lo = jnp.where(bad[:, None], 0.0, lower)
    hi = jnp.where(bad[:, None], 1.0, upper)
    return jnp.where(jnp.isfinite(D), D, 0.0), lo, hi, invalid, crossed


def _solve_bases(D, lower, upper, max_pivots, first_pivots, table, gather=16):
    """Final bases of a batch (basis, at_upper, code, pivots); codes include INVALID_INPUT and
    INFEASIBLE for crossed bounds."""
    Dc, lo, hi, invalid, crossed = _clean(D, lower, upper)
    sg = jax.lax.stop_gradient
    Dc, lo, hi = sg(Dc), sg(lo), sg(hi)
    if table is None:
        basis, at_upper, code, it = _pivots_blocked(Dc, lo, hi, max_pivots, first_pivots, gather)
    else:  # no blocks: the problems to pivot are gathered from the whole batch
        g = min(max(len(lo) // WARM_GATHER, 1), len(lo))
        basis, at_upper, code, it = _pivots_warm(Dc, lo, hi, max_pivots, g, sg(table))
    code = jnp.where(invalid, int(BPStatus.INVALID_INPUT), jnp.where(crossed, 1, code))
    return basis, at_upper, code, it


@partial(jax.jit, static_argnames=("max_pivots", "first_pivots"))
def _solve_flat(D, lower, upper, max_pivots, first_pivots, table=None):
    basis, at_upper, code, it = _solve_bases(D, lower, upper, max_pivots, first_pivots, table)
    Dc, lo, hi, _, _ = _clean(D, lower, upper)
    ok = code == 0
    # Failed problems solve a trivial system (all-slack basis, zero bounds) so gradients are 0.
    n = D.shape[1]
    slack_basis = jnp.where(ok[:, None], basis, jnp.arange(n, n + D.shape[0], dtype=basis.dtype))
    x = jax.vmap(basic_solution, (None, 0, 0, 0, 0))(
        Dc, jnp.where(ok[:, None], lo, 0.0), jnp.where(ok[:, None], hi, 0.0), slack_basis, at_upper
    )
    x = jnp.maximum(x, 0.0)
    return LPResult(x, jnp.sum(x, -1), code.astype(jnp.int32), it, basis, at_upper)


#: Pivots every problem of a block runs from the all-slack basis before the unfinished ones
#: are gathered (a warm start gathers the problems whose start is not optimal at once).
FIRST_PIVOTS = 12
#: Most pivots a gathered problem runs per round before the unfinished ones are gathered anew.
ROUND_PIVOTS = 4


@partial(jax.jit, static_argnames=("max_pivots", "first_pivots"))
def solve_certified(D, lower, upper, max_pivots, first_pivots, table=None):
    """float32 pivots, float64 certificate, in one call (x64 must be on): bases of the float32
    dual simplex on ``lower``, ``upper`` (N, C) float64 and ``D`` (C, n) float64, each SOLVED
    basis re-evaluated and certified optimal in float64 (:func:`certify_optimal`), block by
    block of :data:`PIVOT_BLOCK` problems. Returns (x (N, n) float64, zero unless certified;
    code (N,) int32: 0 certified optimal, -1 SOLVED in float32 but not certified, else the LP
    code; pivots; basis; at_upper). ``table``: the float32 arrays of a prepared
    :class:`~deepem_jax.bp.BasisTable`, or None."""
    f32 = jnp.float32
    D32 = D.astype(f32)

    def bases(lo, hi):
        return _solve_bases(D32, lo.astype(f32), hi.astype(f32), max_pivots, first_pivots, table)

    def certified(lo, hi, basis, at_upper, code, it):
        x, optimal = jax.vmap(certify_optimal, (None, 0, 0, 0, 0))(D, lo, hi, basis, at_upper)
        code = jnp.where(code == 0, jnp.where(optimal, 0, -1), code)
        return jnp.where((code == 0)[:, None], x, 0.0), code, it, basis, at_upper

    if table is None:  # pivots and certificates block by block
        return map_bounds_blocks(
            lambda lo, hi: certified(lo, hi, *bases(lo, hi)), lower, upper, PIVOT_BLOCK
        )
    # a warm start gathers the problems it has to pivot from the whole batch
    arrays = (lower, upper, *bases(lower, upper))
    return map_blocks(certified, arrays, (0.0, 1.0, 0, False, 0, 0), PIVOT_BLOCK)


def _is_x64() -> bool:
    return jax.dtypes.canonicalize_dtype(np.float64) == np.dtype(np.float64)


def solve_lp(
    D: jax.Array | np.ndarray,
    lower: jax.Array | np.ndarray,
    upper: jax.Array | np.ndarray,
    *,
    max_pivots: int = MAX_PIVOTS,
    dtype: jax.typing.DTypeLike | None = None,
    warm_start: BasisTable | None = None,
) -> LPResult:
    """Solve ``min sum(x) s.t. lower <= D x <= upper, x >= 0`` exactly for a batch of bounds.

    Parameters
    ----------
    D : (C, n) constraint matrix shared by all problems (any consistent units; for BP, the
        dictionary in DN s^-1 pix^-1 per unit coefficient).
    lower, upper : (..., C) bounds on ``D x`` in the units of ``D x``.
    max_pivots : dual-simplex pivot cap per problem (MAX_ITER beyond it).
    dtype : working dtype (default: result type of the inputs, float32 unless x64 is on).
        float64 requires x64 (``with jax.enable_x64(True):``); it is never turned on here.
    warm_start : a :class:`~deepem_jax.bp.BasisTable` for ``D``: each problem starts from the
        table's basis that fits its bounds best instead of the all-slack basis (zero pivots when
        that basis is optimal), and its Farkas rays settle the infeasible problems they
        prove (INFEASIBLE with no pivot; ``basis`` is then the start, not a certificate). The
        answers are those of the cold start up to the simplex's tolerances: a band infeasible
        by less than its feasibility tolerance may be SOLVED from one start and proven
        INFEASIBLE by a ray from the other.

    Returns
    -------
    LPResult with leading axes ``...``; never raises on bad values: non-finite inputs give
    INVALID_INPUT, ``lower > upper`` gives INFEASIBLE (``x`` = 0 for both).

    Jit-able, vmap-able and differentiable in ``D``, ``lower`` and ``upper`` through the
    optimal basis (gradients are 0 for problems that are not SOLVED). The first call switches
    on the persistent compilation cache (:mod:`deepem_jax._cache`; ``DEEPEM_JAX_COMPILATION_CACHE``
    moves it or switches it off).
    """
    enable_compilation_cache()
    if dtype is None:
        # the inputs' standard promotion (e.g. float32 D with float64 bounds -> float64) is
        # the documented default even under strict promotion; every input is cast to it below
        with jax.numpy_dtype_promotion("standard"):
            dtype = jnp.result_type(D, lower, upper, jnp.float32)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating type, got {dtype}")
    if dtype == jnp.float64 and not _is_x64():
        raise ValueError("float64 needs x64: call solve_lp inside `with jax.enable_x64(True):`")
    D = jnp.asarray(D, dtype)
    lower = jnp.asarray(lower, dtype)
    upper = jnp.asarray(upper, dtype)
    if D.ndim != 2:
        raise ValueError(f"D must be (C, n), got shape {D.shape}")
    C = D.shape[0]
    if lower.shape[-1:] != (C,) or upper.shape[-1:] != (C,):
        raise ValueError(
            f"lower {lower.shape} and upper {upper.shape} must end with the {C} rows of D"
        )
    shape = jnp.broadcast_shapes(lower.shape, upper.shape)[:-1]
    lower = jnp.broadcast_to(lower, (*shape, C)).reshape(-1, C)
    upper = jnp.broadcast_to(upper, (*shape, C)).reshape(-1, C)
    table = None if warm_start is None else warm_start.prepare(np.asarray(D), dtype)
    res = _solve_flat(D, lower, upper, int(max_pivots), FIRST_PIVOTS, table)
    return jax.tree.map(lambda a: a.reshape(*shape, *a.shape[1:]), res)
