"""Learned warm starts of the dual simplex: a table of the optimal bases BP returns.

An optimal basis of ``min sum(x) s.t. lower <= D x <= upper, x >= 0`` (columns of ``[D, -I]``,
with each non-basic slack at its lower or upper bound) is *dual feasible* whatever the bounds:
its reduced costs depend on ``D`` only, and scaling the rows of ``D`` (a response degraded to
another date) leaves their signs unchanged. Only primal feasibility,
``x_B = B^-1 rhs(lower, upper)`` within the bounds, depends on the pixel. On real AIA data the
optimal bases of millions of pixels are a few thousand distinct ones, and a table of the most
frequent bases BP returned on training data (real observations of other dates and synthetic
DEMs at real noise levels) holds the optimal basis of almost every pixel of a new date.

:func:`choose_start` evaluates the dual objective of every basis of a :class:`BasisTable` on a
batch of pixels with one matrix product and picks, per pixel, the largest (a lower bound of the
optimum, reached by the optimal basis); the dual simplex then starts from it (zero pivots when
it is primal feasible, i.e. already optimal).
A table also holds Farkas rays learned from the infeasible pixels of the training data: a row
weighting ``w`` with ``w^T D <= eps |w|^T D`` (``D >= 0``) proves a band infeasible when
``lower . w+ - upper . (w- + eps |w|) > 0`` (for a feasible ``x >= 0``, ``w^T D x`` would be at
least the first two terms and at most ``eps |w|^T D x <= eps |w| . upper``). The same product
per pixel as the dual objective then settles most infeasible pixels without a pivot
(:func:`prove_infeasible`).
Exactness does not rest on the table: the dual simplex runs from any dual feasible basis to the
optimum, and :class:`~deepem_jax.bp.DualSimplex` certifies every end point in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import zipfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .._batching import map_bounds_blocks, map_rows

__all__ = ["BasisTable", "choose_start", "default_table", "learn_table", "prove_infeasible"]

_TABLES = Path(__file__).resolve().parent.parent / "tables"
#: Pixels per jitted call of :meth:`BasisTable.proves_infeasible` by default.
RAY_CHUNK = 1024
#: Reduced-cost tolerance of the dual feasibility test of a table's bases (the end point is
#: certified in float64 anyway).
_DUAL_TOL = 1e-9


@dataclasses.dataclass(frozen=True, eq=False)
class BasisTable:
    """Candidate optimal bases of BP for one channel set and one dictionary width.

    Attributes
    ----------
    basis : (K, C) int32 basis members, most frequent first; ``j < n_basis`` is column ``j`` of
        the dictionary, ``n_basis + i`` the slack of row (channel) ``i``.
    slack_stat : (K, C) int8, per row: 0 if its slack is basic, 1 at the lower bound of the
        band, 2 at the upper bound.
    counts : (K,) how many training pixels ended at each basis.
    channels : wavelengths (Angstrom) of the rows, in order.
    n_basis : number of dictionary columns the indices refer to.
    rays : (R, C) float64 Farkas rays of infeasible training pixels, most frequent first, in
        row-normalised form: the ray for a dictionary ``D`` is ``rays / max_j |D_ij|`` (so it
        holds for any row scaling of ``D``, e.g. a degraded response). None for none.
    ray_counts : (R,) for how many infeasible training pixels each ray was the proof taken
        from the pixel's own final basis (other rays may prove those pixels too).
    """

    basis: np.ndarray
    slack_stat: np.ndarray
    counts: np.ndarray
    channels: tuple[int, ...]
    n_basis: int
    rays: np.ndarray | None = None
    ray_counts: np.ndarray | None = None

    def __post_init__(self) -> None:
        K, C = np.shape(self.basis)
        if np.shape(self.slack_stat) != (K, C) or np.shape(self.counts) != (K,):
            raise ValueError("basis, slack_stat and counts must be (K, C), (K, C) and (K,)")
        if len(self.channels) != C:
            raise ValueError(f"{len(self.channels)} channels for bases of {C} rows")
        b = np.asarray(self.basis)
        if np.any((b < 0) | (b >= self.n_basis + C)):
            raise ValueError(f"basis indices must be in [0, {self.n_basis + C})")
        rays = np.zeros((0, C)) if self.rays is None else np.asarray(self.rays, np.float64)
        counts = np.ones(len(rays), np.int64) if self.ray_counts is None else self.ray_counts
        counts = np.asarray(counts, np.int64)
        if rays.ndim != 2 or rays.shape[1] != C or counts.shape != (len(rays),):
            raise ValueError(f"rays and ray_counts must be (R, {C}) and (R,)")
        if not np.all(np.isfinite(rays)):
            raise ValueError("rays must be finite")
        object.__setattr__(self, "rays", rays)
        object.__setattr__(self, "ray_counts", counts)

    @property
    def size(self) -> int:
        """Number of bases K."""
        return len(self.counts)

    @classmethod
    def learn(
        cls,
        basis: np.ndarray,
        at_upper: np.ndarray,
        channels: Sequence[int],
        n_basis: int,
        max_size: int | None = None,
    ) -> BasisTable:
        """The distinct bases of SOLVED pixels (``LPResult.basis`` and ``.at_upper`` (N, C) of
        :func:`~deepem_jax.bp.solve_lp`), most frequent first, at most ``max_size``."""
        basis = np.asarray(basis, np.int64)
        C = basis.shape[1]
        is_slack = basis[:, :, None] == n_basis + np.arange(C)[None, None, :]
        basic_row = np.any(is_slack, 1)
        stat = np.where(basic_row, 0, np.where(np.asarray(at_upper, bool), 2, 1))
        cols = np.sort(basis, 1)
        keys, counts = np.unique(np.concatenate([cols, stat], 1), axis=0, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:max_size]
        keys = keys[order]
        return cls(
            keys[:, :C].astype(np.int32),
            keys[:, C:].astype(np.int8),
            counts[order].astype(np.int64),
            tuple(int(c) for c in channels),
            int(n_basis),
        )

    def merged(self, other: BasisTable, max_size: int | None = None) -> BasisTable:
        """The union of two tables of the same channels, counts added, at most ``max_size``
        bases; their rays merged the same way (equal to 1e-6), all kept."""
        if (self.channels, self.n_basis) != (other.channels, other.n_basis):
            raise ValueError("tables of different channels or dictionary widths")
        C = len(self.channels)
        keys = np.concatenate(
            [np.concatenate([t.basis, t.slack_stat], 1) for t in (self, other)]
        ).astype(np.int64)
        weights = np.concatenate([self.counts, other.counts])
        u, inv = np.unique(keys, axis=0, return_inverse=True)
        counts = np.bincount(inv.reshape(-1), weights=weights).astype(np.int64)
        order = np.argsort(-counts, kind="stable")[:max_size]
        rays, ray_counts = _distinct_rays(
            np.concatenate([self.rays, other.rays]),
            np.concatenate([self.ray_counts, other.ray_counts]),
        )
        return BasisTable(
            u[order, :C].astype(np.int32),
            u[order, C:].astype(np.int8),
            counts[order],
            self.channels,
            self.n_basis,
            rays,
            ray_counts,
        )

    def head(self, size: int | None, max_rays: int | None = None) -> BasisTable:
        """The ``size`` most frequent bases and ``max_rays`` most frequent rays (all for
        None)."""
        return BasisTable(
            self.basis[:size],
            self.slack_stat[:size],
            self.counts[:size],
            self.channels,
            self.n_basis,
            self.rays[:max_rays],
            self.ray_counts[:max_rays],
        )

    def reordered(self, channels: Sequence[int]) -> BasisTable:
        """This table for the same channels in another order (Angstrom): its rows permuted, so
        the bases, slack states and rays are those of the same LPs with the rows reordered."""
        channels = tuple(int(c) for c in channels)
        if sorted(channels) != sorted(self.channels) or len(set(channels)) != len(channels):
            raise ValueError(f"channels {list(channels)} are not a reordering of {self.channels}")
        old = np.array([self.channels.index(c) for c in channels])  # new row j is old row old[j]
        new_row = np.argsort(old)  # old row i is new row new_row[i]
        b = np.asarray(self.basis, np.int64)
        slack = b >= self.n_basis
        b = np.where(slack, self.n_basis + new_row[np.where(slack, b - self.n_basis, 0)], b)
        return BasisTable(
            np.sort(b, 1).astype(np.int32),
            self.slack_stat[:, old],
            self.counts,
            channels,
            self.n_basis,
            self.rays[:, old],
            self.ray_counts,
        )

    def save(self, path: str | Path) -> None:
        """Write the table as ``.npz``."""
        np.savez_compressed(
            path,
            basis=self.basis,
            slack_stat=self.slack_stat,
            counts=self.counts,
            rays=self.rays,
            ray_counts=self.ray_counts,
            meta=json.dumps({"channels": list(self.channels), "n_basis": self.n_basis}),
        )

    @classmethod
    def load(cls, path: str | Path) -> BasisTable:
        """Read a table written by :meth:`save`; a ValueError names a file that is not one."""
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                with_rays = "rays" in z.files
                return cls(
                    z["basis"].astype(np.int32),
                    z["slack_stat"].astype(np.int8),
                    z["counts"].astype(np.int64),
                    tuple(int(c) for c in meta["channels"]),
                    int(meta["n_basis"]),
                    z["rays"].astype(np.float64) if with_rays else None,
                    z["ray_counts"].astype(np.int64) if with_rays else None,
                )
        except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path} is not a basis table: {err}") from None

    def proves_infeasible(
        self,
        D: np.ndarray,
        lower: np.ndarray,
        upper: np.ndarray,
        chunk_size: int = RAY_CHUNK,
    ) -> np.ndarray:
        """(N,) bool: a ray of this table proves the band ``lower <= D x <= upper`` (N, C)
        infeasible (:func:`prove_infeasible`, in the dtype of ``lower``: float64 needs x64;
        ``chunk_size`` pixels per jitted call); all False without rays or for a ``D`` with a
        negative entry."""
        D = self._dictionary(D)
        dtype = jax.dtypes.canonicalize_dtype(np.result_type(lower, np.float32))
        rays = self._ray_arrays(D, dtype)
        if rays is None:
            return np.zeros(np.shape(lower)[0], bool)
        args = [np.asarray(a, dtype) for a in (lower, upper)]
        return map_rows(partial(_prove_jit, rays), args, chunk_size)

    def prepare(self, D: np.ndarray, dtype) -> dict[str, dict[str, jax.Array]]:
        """The arrays :func:`choose_start` needs for dictionary ``D`` (C, n_basis), in
        ``dtype``, for the :func:`head_size` most frequent bases (``"head"``) and for all
        (``"full"``): the bases that are dual feasible for ``D`` (checked in float64) with
        their inverses laid out for matrix products; and the rays of
        :func:`prove_infeasible` (``"rays"``, None without rays or when ``D`` has a negative
        entry). Cached per ``D`` and dtype."""
        D = self._dictionary(D)
        dtype = jax.dtypes.canonicalize_dtype(dtype)  # float32 for float64 without x64

        def arrays(table):
            return {
                k: jnp.asarray(v, dtype if v.dtype.kind == "f" else v.dtype)
                for k, v in _layout(table, D).items()
            }

        def build():
            return {
                "head": arrays(self.head(head_size(self.counts))),
                "full": arrays(self),
                "rays": self._ray_arrays(D, dtype),
            }

        return self._cached(("bases", _digest(D), dtype.name), build)

    def _ray_arrays(self, D: np.ndarray, dtype) -> dict[str, jax.Array] | None:
        """:func:`_ray_layout` of this table's rays for float64 ``D``, cached per ``D`` and
        ``dtype``."""
        return self._cached(
            ("rays", _digest(D), dtype.name), lambda: _ray_layout(self.rays, D, dtype)
        )

    def _dictionary(self, D: np.ndarray) -> np.ndarray:
        """``D`` as float64, or a ValueError when it is not (C, n_basis) for this table."""
        D = np.asarray(D, np.float64)
        if D.shape != (len(self.channels), self.n_basis):
            raise ValueError(
                f"the basis table is for a ({len(self.channels)}, {self.n_basis}) dictionary, "
                f"got {D.shape}"
            )
        return D

    def _cached(self, key: tuple, build):
        """``build()``, computed once per table and ``key``."""
        cache = self.__dict__.setdefault("_prepared", {})  # frozen fields, mutable cache
        if key not in cache:
            cache[key] = build()
        return cache[key]


def _digest(D: np.ndarray) -> str:
    """Cache key of a float64 dictionary."""
    return hashlib.sha256(D.tobytes()).hexdigest()


def _layout(table: BasisTable, D: np.ndarray) -> dict[str, np.ndarray]:
    """float64 arrays of the bases of ``table`` that are dual feasible for ``D`` (C, n), K of
    them: ``duals`` (2C, K) with ``[lower, upper] @ duals`` the dual objective of every basis
    (a lower bound of the optimum, reached by the optimal basis); ``binv_lo``, ``binv_hi``
    (K, C, C) with ``binv_lo[k] @ lower + binv_hi[k] @ upper`` the basic values of basis
    ``k``; ``rows`` (K, C, C) one-hot of the row of each basic slack; ``absa`` (K, C, C) the
    magnitudes of the basic columns of ``[D, -I]``; ``structural`` (K, C) bool; ``basis``,
    ``slack_stat`` (K, C). The all-slack basis is added first."""
    C, n = D.shape
    # the all-slack basis (every slack at its lower bound; optimal, x = 0, when every lower
    # bound is 0) comes first, so it wins the ties of the dual objective
    basis = np.concatenate([n + np.arange(C)[None, :], np.asarray(table.basis, np.int64)])
    stat = np.concatenate([np.ones((1, C), np.int64), np.asarray(table.slack_stat, np.int64)])
    eye = np.eye(C)
    A = np.concatenate([D, -eye], 1)
    B = A[:, basis].transpose(1, 0, 2)  # (K, C, C)
    # columns scaled to unit max so the conditioning test does not see the units of D
    Bn = B / np.maximum(np.abs(B).max(1, keepdims=True), 1e-300)
    ok = np.linalg.cond(Bn) < 1e10
    binv = np.linalg.inv(np.where(ok[:, None, None], B, eye))
    c = np.concatenate([np.ones(n), np.zeros(C)])
    y = np.einsum("kc,kcd->kd", c[basis], binv)  # duals (K, C)
    d = 1.0 - y @ D  # reduced costs of the columns (K, n), dimensionless
    ytol = _DUAL_TOL * np.abs(y).max(1, keepdims=True)
    dual_ok = np.all(d >= -_DUAL_TOL, 1)
    dual_ok &= np.all(
        np.where(stat == 1, y >= -ytol, True) & np.where(stat == 2, y <= ytol, True), 1
    )
    keep = ok & dual_ok
    basis, stat, binv, y, B = basis[keep], stat[keep], binv[keep], y[keep], B[keep]
    return dict(
        duals=np.concatenate([y * (stat == 1), y * (stat == 2)], 1).T,
        binv_lo=binv * (stat == 1)[:, None, :],
        binv_hi=binv * (stat == 2)[:, None, :],
        rows=(basis[:, None, :] == n + np.arange(C)[None, :, None]).astype(np.float64),
        absa=np.abs(B),
        structural=basis < n,
        basis=basis.astype(np.int32),
        slack_stat=stat.astype(np.int8),
    )


def _ray_terms(W: np.ndarray, D: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(P, Q)`` (R, C) of rays ``W`` (R, C) for a dictionary ``D >= 0`` (C, n): a band
    is infeasible when ``lower @ P[r] - upper @ Q[r] > 0`` for some ray r. ``P = w+`` and
    ``Q = w- + eps |w|`` with ``eps = max_j (w^T D)_j+ / (|w|^T D)_j`` (plus a float64 rounding
    allowance), the share of ``w^T D`` that is not ``<= 0``."""
    wd, den = W @ D, np.abs(W) @ D
    ratio = np.where(den > 0, np.maximum(wd, 0.0) / np.where(den > 0, den, 1.0), 0.0)
    eps = ratio.max(1, initial=0.0) + 1e-14
    return np.maximum(W, 0.0), np.maximum(-W, 0.0) + eps[:, None] * np.abs(W)


def _row_scale(D: np.ndarray) -> np.ndarray:
    """Largest magnitude of each row of ``D`` (C,): rays are stored multiplied by it."""
    return np.abs(D).max(1)


def _ray_layout(rays: np.ndarray, D: np.ndarray, dtype) -> dict[str, jax.Array] | None:
    """Arrays of :func:`prove_infeasible` for row-normalised ``rays`` (R, C) and ``D`` (C, n),
    or None without rays or when ``D`` has a negative entry (the test needs ``D >= 0``).
    ``signed`` (2C, R) gives ``[lower, upper] @ signed = lower @ P - upper @ Q``;
    ``magnitude`` (2C, R) the scale of that sum for the rounding margin."""
    if len(rays) == 0 or np.any(D < 0):
        return None
    scale = _row_scale(D)
    W = rays / np.where(scale > 0, scale, np.inf)  # a row without response gets no weight
    P, Q = _ray_terms(W, D)
    signed, magnitude = np.concatenate([P, -Q], 1).T, np.concatenate([P, Q], 1).T
    return {"signed": jnp.asarray(signed, dtype), "magnitude": jnp.asarray(magnitude, dtype)}


#: Relative margin a ray's proof must clear, by dtype size: far above the rounding of the
#: (2C)-term sums and of float32 bounds, so a proof in float32 is one in float64.
_RAY_TOL = {4: 1e-4, 8: 1e-11}


def prove_infeasible(rays: dict[str, jax.Array], lower: jax.Array, upper: jax.Array) -> jax.Array:
    """(N,) bool: a ray of the prepared table (``BasisTable.prepare(...)["rays"]``) proves the
    band ``lower <= D x <= upper`` (N, C) infeasible with a margin of :data:`_RAY_TOL`
    (relative) of the sum's scale. False proves nothing."""
    tol = _RAY_TOL[jnp.dtype(lower.dtype).itemsize]
    b = jnp.concatenate([lower, upper], -1)
    g = b @ rays["signed"]
    return jnp.any(g > tol * (jnp.abs(b) @ rays["magnitude"]), -1)


_prove_jit = jax.jit(prove_infeasible)


def _distinct_rays(rays: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rays (R, C) made distinct (equal to 1e-6), counts added, most frequent first."""
    if len(rays) == 0:
        return rays, counts
    _, first, inv = np.unique(np.round(rays, 6), axis=0, return_index=True, return_inverse=True)
    total = np.bincount(inv.reshape(-1), weights=counts).astype(np.int64)
    order = np.argsort(-total, kind="stable")
    return rays[first[order]], total[order]


def _rays_of_bases(D, lower, upper, basis) -> np.ndarray:
    """Row-normalised Farkas rays (M, C) float64 of infeasible problems from their final dual
    simplex bases (N, C): of the rows of ``B^-1`` (``B`` the basic columns of ``[D, -I]``) and
    their negatives, the one proving its own band infeasible with the largest relative margin,
    for the problems where one does (with the margin of float64 :func:`prove_infeasible`)."""
    C = D.shape[0]
    if len(basis) == 0:
        return np.zeros((0, C))
    A = np.concatenate([D, -np.eye(C)], 1)
    B = A[:, np.asarray(basis, np.int64)].transpose(1, 0, 2)  # (N, C, C)
    # columns scaled to unit max so the conditioning test does not see the units of D
    ok = np.linalg.cond(B / np.maximum(np.abs(B).max(1, keepdims=True), 1e-300)) < 1e12
    binv = np.linalg.inv(np.where(ok[:, None, None], B, np.eye(C)))
    cand = np.concatenate([binv, -binv], 1)  # (N, 2C, C)
    scale = _row_scale(D)
    P, Q = _ray_terms(cand.reshape(-1, C), D)
    P, Q = P.reshape(cand.shape), Q.reshape(cand.shape)
    lo, hi = lower[:, None, :], upper[:, None, :]
    g = np.sum(lo * P - hi * Q, -1)
    margin = g / np.maximum(np.sum(np.abs(lo) * P + np.abs(hi) * Q, -1), 1e-300)
    k = margin.argmax(1)
    proven = ok & (margin[np.arange(len(k)), k] > _RAY_TOL[8])
    W = cand[np.arange(len(k)), k][proven] * scale
    return W / np.abs(W).max(1, keepdims=True)


#: Candidate sizes of a table's head: the most frequent bases, which every pixel is tried
#: against first; the whole table is tried only for the pixels none of these fits.
HEAD_SIZES = (256, 512, 1024, 2048)


def head_size(counts: np.ndarray) -> int:
    """Size of the head of a table whose bases were found ``counts`` (K,) times, most
    frequent first: of :data:`HEAD_SIZES` (or K when smaller), the one with the fewest
    expected table columns per pixel, ``H + (1 - cover(H)) * K``, where ``cover(H)`` is the
    share of the training pixels whose basis is among the first H (every pixel is scored
    against the head, the pixels it misses against all K bases)."""
    counts = np.asarray(counts, np.float64)
    K = len(counts)
    sizes = [h for h in HEAD_SIZES if h < K]
    if not sizes:  # a small (or empty) table is its own head
        return K
    cover = np.cumsum(counts) / max(counts.sum(), 1.0)
    cost = [h + (1.0 - cover[h - 1]) * K for h in sizes]
    return sizes[int(np.argmin(cost))]


def choose_start(
    prep: dict[str, jax.Array], lower: jax.Array, upper: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Starting bases of a batch: per pixel the basis of the prepared table with the largest
    dual objective for the bounds ``lower``, ``upper`` (N, C) -- every basis of the table is
    dual feasible, so its dual objective is a lower bound of the pixel's optimum, and the
    optimal basis, when it is in the table, has the largest. Returns (basis (N, C) int32,
    slack_stat (N, C) int8, feasible (N,) bool); a feasible start is optimal, up to the
    tolerance of the float64 certificate that follows, and the others are the dual simplex's
    best starts. ``prep`` is one level (``"head"`` or ``"full"``) of
    :meth:`BasisTable.prepare`. Pixels are taken :data:`SUB_BLOCK` at a time so the
    (pixels, K) temporaries stay in the CPU caches."""
    return map_bounds_blocks(partial(_choose, prep), lower, upper, SUB_BLOCK)


#: Pixels per piece of :func:`choose_start`.
SUB_BLOCK = 512
#: Primal feasibility tolerance of a start in units of the row-scaled band, by dtype size (the
#: dual simplex's own).
_START_TOL = {4: 1e-6, 8: 1e-10}


def _choose(prep, lower, upper):
    K = prep["basis"].shape[0]
    # dual objectives (K, N): bases down, pixels across, so the first-maximum search reduces
    # over the leading axis (with jax 0.10.2 on CPU about twice as fast as along rows)
    g = prep["duals"].T @ jnp.concatenate([lower, upper], -1).T
    idx = jnp.arange(K, dtype=jnp.int32)[:, None]
    k = jnp.minimum(jnp.min(jnp.where(g == jnp.max(g, 0, keepdims=True), idx, K), 0), K - 1)
    take = partial(jnp.take, indices=k, axis=0)
    z = jnp.einsum("npc,nc->np", take(prep["binv_lo"]), lower) + jnp.einsum(
        "npc,nc->np", take(prep["binv_hi"]), upper
    )
    rows, structural = take(prep["rows"]), take(prep["structural"])
    lo_b = jnp.where(structural, 0.0, jnp.einsum("nc,ncp->np", lower, rows))
    hi_b = jnp.where(structural, jnp.inf, jnp.einsum("nc,ncp->np", upper, rows))
    big = jnp.maximum(jnp.abs(lower), jnp.abs(upper))
    r = 1.0 / jnp.where(big > 0, big, 1.0)
    w = jnp.max(take(prep["absa"]) * r[:, :, None], 1)  # scale of each basic value
    viol = (jnp.maximum(lo_b - z, 0.0) + jnp.maximum(z - hi_b, 0.0)) * w
    feasible = jnp.max(viol, -1) <= _START_TOL[jnp.dtype(lower.dtype).itemsize]
    return prep["basis"][k], prep["slack_stat"][k], feasible


def default_table(channels: Sequence[int]) -> BasisTable | None:
    """The shipped table for the channels (Angstrom, in order; a table of the same channels in
    another order is :meth:`BasisTable.reordered`), or None if there is none. Read once per
    process and order: the same object (and so its prepared arrays) serves every call."""
    return _shipped_table(tuple(int(c) for c in channels))


@functools.cache
def _shipped_table(channels: tuple[int, ...]) -> BasisTable | None:
    for path in sorted(_TABLES.glob("bp_bases_*.npz")):
        stored = tuple(int(c) for c in path.stem.removeprefix("bp_bases_").split("-"))
        if stored == channels:
            return BasisTable.load(path)
        if sorted(stored) == sorted(channels):
            return _shipped_table(stored).reordered(channels)
    return None


def learn_table(
    D: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    channels: Sequence[int],
    *,
    max_size: int | None = None,
    max_rays: int | None = 128,
    chunk: int = 65_536,
) -> BasisTable:
    """A :class:`BasisTable` of the optimal bases of BP problems: ``lower <= D x <= upper``
    (N, C) bands with dictionary ``D`` (C, n), solved by the float64 dual simplex (the bases of
    SOLVED problems; an optimal basis is a property of the LP, whichever exact solver finds it),
    at most ``max_size``; and the Farkas rays that prove the INFEASIBLE problems infeasible
    (from their final bases), at most ``max_rays``, most frequent first.
    """
    from ._simplex import solve_lp

    D = np.asarray(D, np.float64)
    lower, upper = np.asarray(lower, np.float64), np.asarray(upper, np.float64)
    tables = []
    with jax.enable_x64(True):
        for i in range(0, len(lower), chunk):
            res = solve_lp(D, lower[i : i + chunk], upper[i : i + chunk], dtype=np.float64)
            status, basis = np.asarray(res.status), np.asarray(res.basis)
            ok, bad = status == 0, np.flatnonzero(status == 1)
            table = BasisTable.learn(basis[ok], np.asarray(res.at_upper)[ok], channels, D.shape[1])
            lo, hi = lower[i : i + chunk][bad], upper[i : i + chunk][bad]
            rays = _rays_of_bases(D, lo, hi, basis[bad])
            rays, counts = _distinct_rays(rays, np.ones(len(rays), np.int64))
            tables.append(dataclasses.replace(table, rays=rays, ray_counts=counts))
    out = tables[0]
    for t in tables[1:]:
        out = out.merged(t)
    return out.head(max_size, max_rays)
