"""deepem_jax._batching against plain numpy: bucket sizes, padding and chunked mapping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax._batching import bucket, map_blocks, map_rows, pad_rows


@pytest.mark.parametrize(
    ("n", "max_size", "min_size", "expected"),
    [
        (0, 10_000, 256, 256),
        (1, 10_000, 256, 256),
        (256, 10_000, 256, 256),
        (257, 10_000, 256, 512),
        (5000, 10_000, 256, 8192),
        (9000, 10_000, 256, 10_000),
        (10**6, 4096, 256, 4096),
        (3, 100, 1, 4),
        (1000, 100, 256, 100),
    ],
)
def test_bucket(n, max_size, min_size, expected):
    assert bucket(n, max_size, min_size) == expected


def test_bucket_rejects_bad_sizes():
    for args in ((-1, 10), (5, 0), (5, 10, 0)):
        with pytest.raises(ValueError, match="need n >= 0"):
            bucket(*args)


def test_pad_rows():
    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    p = pad_rows(a, 5, fill=-1.0)
    assert p.dtype == np.float32 and p.shape == (5, 2)
    np.testing.assert_array_equal(p[:3], a)
    np.testing.assert_array_equal(p[3:], -1.0)
    assert pad_rows(a, 3) is a
    with pytest.raises(ValueError, match="cannot pad"):
        pad_rows(a, 2)


def _reference(arrays):
    """What map_rows must return for ``_fn``: a plain numpy loop over single rows."""
    a, b = arrays
    rows = [(a[i] * 2.0 + b[i].sum(), {"k": np.argmax(b[i])}) for i in range(len(a))]
    first = np.array([r[0] for r in rows]).reshape(len(a), *a.shape[1:])
    return first, np.array([r[1]["k"] for r in rows], np.int32)


@jax.jit
def _fn(a, b):
    return a * 2.0 + b.sum(-1)[:, None], {"k": jnp.argmax(b, -1).astype(jnp.int32)}


@pytest.mark.parametrize("n", [1, 7, 8, 9, 23])
def test_map_rows_matches_numpy_loop_with_pytree_output(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 3)).astype(np.float32)
    b = rng.normal(size=(n, 4)).astype(np.float32)
    seen = []
    out = map_rows(_fn, [a, b], 8, fills=[0.0, np.nan], on_chunk=seen.append)
    ref_first, ref_s = _reference([a, b])
    np.testing.assert_allclose(out[0], ref_first, rtol=1e-6)
    np.testing.assert_array_equal(out[1]["k"], ref_s)
    assert isinstance(out[0], np.ndarray) and out[0].dtype == np.float32
    assert out[0].flags.writeable
    assert seen == [min(8, n - s) for s in range(0, n, 8)] and sum(seen) == n


def test_map_rows_calls_with_one_shape_and_pads_with_fill():
    shapes, pads = [], []

    def fn(a):
        shapes.append(a.shape)
        pads.append(a[-1, 0])
        return a

    map_rows(fn, [np.zeros((5, 1))], 4, fills=[7.0])
    assert shapes == [(4, 1), (4, 1)]
    assert pads == [0.0, 7.0]


def test_map_rows_tail_min_pads_the_last_block_to_a_smaller_bucket():
    shapes, seen = [], []

    def fn(a):
        shapes.append(a.shape[0])
        return a * 3.0

    a = np.arange(37.0)[:, None]
    out = map_rows(fn, [a], 16, tail_min=2, on_chunk=seen.append)
    assert shapes == [16, 16, 8]  # 5 rows left: the power of two >= 5, not 16
    assert seen == [16, 16, 5]
    np.testing.assert_array_equal(out, a * 3.0)
    shapes.clear()
    map_rows(fn, [a[:33]], 16, tail_min=4)
    assert shapes == [16, 16, 4]  # never below tail_min


def test_map_rows_empty_input_returns_empty_arrays_of_the_right_shape():
    calls = []

    def fn(a, b):
        calls.append(a.shape)
        return _fn(a, b)

    empty = [np.zeros((0, 3), np.float32), np.zeros((0, 4), np.float32)]
    out = map_rows(fn, empty, 16, on_chunk=calls.append)
    assert calls == [(16, 3)]  # fn once on fill rows, on_chunk never
    assert out[0].shape == (0, 3) and out[0].dtype == np.float32
    assert out[1]["k"].shape == (0,) and out[1]["k"].dtype == np.int32


def test_map_rows_rejects_bad_arguments():
    a = np.zeros((4, 2))
    with pytest.raises(ValueError, match="same number of rows"):
        map_rows(_fn, [a, np.zeros((3, 2))], 4)
    with pytest.raises(ValueError, match="fills"):
        map_rows(_fn, [a, a], 4, fills=[0.0])
    with pytest.raises(ValueError, match="rows"):
        map_rows(lambda x: x[:1], [a], 4)
    with pytest.raises(ValueError, match="size"):
        map_rows(_fn, [a, a], 0)


@pytest.mark.parametrize("n", [5, 8, 13])
def test_map_blocks_matches_numpy_and_sees_fills_only_in_padding(n):
    rng = np.random.default_rng(n)
    a, b = rng.standard_normal((n, 3)), rng.integers(0, 9, (n, 2, 2))
    seen = []

    def fn(x, y):
        seen.append(x.shape)
        return {"s": x.sum(-1) + y.sum((-1, -2)).astype(x.dtype), "pad": jnp.all(y == -1, (-1, -2))}

    out = jax.jit(lambda x, y: map_blocks(fn, (x, y), (0.0, -1), 4))(a, b)
    np.testing.assert_allclose(out["s"], a.sum(-1) + b.sum((-1, -2)))
    assert out["s"].shape == (n,) and not np.any(out["pad"])  # padded rows dropped
    assert seen == [(4, 3)]  # traced once, on blocks of 4 rows
