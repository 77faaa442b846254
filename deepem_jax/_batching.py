"""Fixed-shape batching on the host: pad rows to a few bucketed sizes and map a function over
equal-sized chunks, so a jitted function compiles once per bucket instead of once per length.

With several local devices, consecutive chunks are spread over them (one chunk per device at a
time, through a ``jax.sharding.NamedSharding`` over the row axis): each device runs the same
single-chunk program it would run alone, so results are bit-identical to one device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["bucket", "map_rows", "pad_rows"]


def bucket(n: int, max_size: int, min_size: int = 256) -> int:
    """Chunk size for ``n`` rows: the smallest power of two ``>= n``, at least ``min_size`` and
    at most ``max_size`` (``max_size`` wins when the two disagree; it need not be a power of
    two). Rounding to powers of two keeps the number of distinct compiled shapes small."""
    if n < 0 or max_size < 1 or min_size < 1:
        raise ValueError(
            f"need n >= 0, max_size >= 1, min_size >= 1; got {n}, {max_size}, {min_size}"
        )
    return min(max_size, max(min_size, 1 << max(n - 1, 0).bit_length()))


def pad_rows(a: np.ndarray, size: int, fill: float = 0.0) -> np.ndarray:
    """``a`` extended along axis 0 to ``size`` rows filled with ``fill`` (same dtype). An array
    that already has ``size`` rows is returned as is, not copied."""
    a = np.asarray(a)
    if a.ndim == 0 or len(a) > size:
        raise ValueError(f"cannot pad an array of shape {a.shape} to {size} rows")
    if len(a) == size:
        return a
    out = np.full((size, *a.shape[1:]), fill, a.dtype)
    out[: len(a)] = a
    return out


def map_rows(
    fn: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    size: int,
    *,
    fills: Sequence[float] | None = None,
    on_chunk: Callable[[int], None] | None = None,
    tail_min: int | None = None,
) -> Any:
    """Apply ``fn`` row-wise to ``arrays`` (all with the same number ``n`` of rows) in chunks.

    ``fn(*chunks)`` is called on consecutive blocks of ``size`` rows, the last block padded with
    ``fills`` (one per array, default 0), so every call has the same shapes. Every leaf of the
    pytree ``fn`` returns must have ``size`` rows; the real rows of all calls are returned as the
    same pytree of numpy arrays with ``n`` rows (freshly allocated, writable). ``on_chunk(m)``
    is called after each block with its number ``m`` of real rows (e.g. a progress bar update).
    With ``tail_min``, the last block, when it is not full, is padded only to
    ``bucket(m, size, tail_min)`` rows instead of ``size`` (``fn`` is then called, and compiled,
    at that size too): less work on padding rows for the price of a few more shapes.

    Devices: when there are ``d > 1`` local devices (``jax.local_devices()``) and more than one
    block, ``k = min(d, number of blocks)`` consecutive blocks are processed at a time, block
    ``j`` on device ``j``: the ``k * size`` rows are placed with a ``NamedSharding`` over the row
    axis, ``fn`` is dispatched on each device's shard (asynchronously, so the devices work at
    the same time) and the shards of the results are gathered. A group with fewer than ``k``
    real blocks is completed with blocks of fill rows. ``fn`` must not block on its results
    (jitted functions do not), or the devices take turns. Each device runs ``fn`` on exactly the
    block, padding included, that one device would, through ``fn``'s own compiled program (kept
    in its jit cache), so results do not depend on the number of devices. Each block (or
    group of blocks) is read back only after the next one is dispatched, so the host's copying
    overlaps the devices' work.

    With ``n = 0``, ``fn`` is still called once, on a block of fill rows, so the result has the
    right trailing shapes and dtypes (0 rows); ``on_chunk`` is not called.
    """
    arrays = [np.asarray(a) for a in arrays]
    if not arrays:
        raise ValueError("map_rows needs at least one array")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(
            f"arrays must have the same number of rows, got {[len(a) for a in arrays]}"
        )
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    fills = [0.0] * len(arrays) if fills is None else list(fills)
    if len(fills) != len(arrays):
        raise ValueError(f"got {len(fills)} fills for {len(arrays)} arrays")
    devices = jax.local_devices()[: -(-max(n, 1) // size)]
    launch = _on_one if len(devices) == 1 else partial(_on_devices, devices)
    step = len(devices) * size
    out: list[np.ndarray] | None = None
    treedef = None
    pending = None  # the previous group: read back once the next one is dispatched

    def read(start: int, m: int, block: int, results: list) -> None:
        nonlocal out, treedef
        leaves, treedef = _read(results)
        if out is None:
            out = [np.empty((n, *leaf.shape[1:]), leaf.dtype) for leaf in leaves]
        for o, leaf in zip(out, leaves, strict=True):
            o[start : start + m] = leaf[:m]
        if on_chunk is not None:
            for real in range(m, 0, -block):
                on_chunk(min(real, block))

    for start in range(0, max(n, 1), step):
        m = min(step, n - start)
        block = size
        if tail_min is not None and m < step:
            block = bucket(-(-m // len(devices)), size, min(tail_min, size))
        chunk = [
            pad_rows(a[start : start + m], len(devices) * block, f)
            for a, f in zip(arrays, fills, strict=True)
        ]
        results = launch(fn, chunk, block)
        if pending is not None:
            read(*pending)
        pending = (start, m, block, results)
    read(*pending)
    return jax.tree.unflatten(treedef, out)


def _leaves(result: Any, size: int) -> tuple[list, Any]:
    """Leaves and treedef of one block's result, each leaf checked to have ``size`` rows."""
    leaves, treedef = jax.tree.flatten(result)
    if any(leaf.shape[:1] != (size,) for leaf in leaves):
        raise ValueError(
            f"fn must return arrays with {size} rows, got shapes {[x.shape for x in leaves]}"
        )
    return leaves, treedef


def _on_one(fn: Callable[..., Any], chunk: list[np.ndarray], size: int) -> list:
    """``fn`` dispatched on one host block of ``size`` rows: ``[(leaves, treedef)]``, not read
    back (:func:`_read`)."""
    return [_leaves(fn(*chunk), size)]


def _on_devices(devices: list, fn: Callable[..., Any], chunk: list[np.ndarray], size: int) -> list:
    """``fn`` dispatched on ``len(devices)`` consecutive blocks of ``size`` rows, block ``j``
    on device ``j``: ``(leaves, treedef)`` per block in row order, not read back
    (:func:`_read`)."""
    sharding = NamedSharding(Mesh(np.array(devices), ("rows",)), PartitionSpec("rows"))
    shards = [_device_shards(jax.device_put(a, sharding)) for a in chunk]
    return [_leaves(fn(*blocks), size) for blocks in zip(*shards, strict=True)]


def _read(results: list) -> tuple[list, Any]:
    """Numpy leaves of dispatched blocks (``(leaves, treedef)`` each), their rows in order, and
    the treedef."""
    if len(results) == 1:
        leaves, treedef = results[0]
        return [np.asarray(leaf) for leaf in leaves], treedef
    treedef = results[0][1]
    leaves = [
        np.concatenate([np.asarray(r[0][i]) for r in results]) for i in range(len(results[0][0]))
    ]
    return leaves, treedef


def _device_shards(array: jax.Array) -> list[jax.Array]:
    """The single-device pieces of a row-sharded array, in row order."""
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return [s.data for s in shards]


def map_bounds_blocks(fn: Callable[..., Any], lower: jax.Array, upper: jax.Array, size: int):
    """``fn(lower, upper)`` of (N, C) bounds inside a jitted function, over consecutive blocks of
    ``size`` rows run one after another (``lax.map``: the blocks' temporaries stay in the CPU
    caches); the last block is padded with bounds [0, 1] (a problem solved at once). ``fn``
    returns a pytree of arrays with the block's rows first; the N real rows are returned."""
    return map_blocks(fn, (lower, upper), (0.0, 1.0), size)


def map_blocks(fn: Callable[..., Any], arrays: Sequence[jax.Array], fills, size: int):
    """``fn(*arrays)`` inside a jitted function over consecutive blocks of ``size`` rows of the
    arrays (all with N rows first), run one after another (``lax.map``); the last block is
    padded with ``fills`` (one per array). ``fn`` returns a pytree of arrays with the block's
    rows first; the N real rows are returned."""
    N = arrays[0].shape[0]
    if N <= size:
        return fn(*arrays)
    k = -(-N // size)
    pad = k * size - N

    def blocks(a, fill):
        widths = ((0, pad),) + ((0, 0),) * (a.ndim - 1)
        return jnp.pad(a, widths, constant_values=fill).reshape(k, size, *a.shape[1:])

    out = jax.lax.map(lambda b: fn(*b), tuple(map(blocks, arrays, fills)))
    return jax.tree.map(lambda a: a.reshape(k * size, *a.shape[2:])[:N], out)
