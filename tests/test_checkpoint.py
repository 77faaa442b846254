"""Checkpoints: exact round trips, resuming, atomic writes and clear errors on bad files."""

from __future__ import annotations

import hashlib
import json
import os

import astropy.units as u
import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest
from conftest import shared_path

from deepem_jax.checkpoint import (
    Checkpoint,
    CheckpointError,
    ResponseId,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_predictor,
    save_checkpoint,
)
from deepem_jax.model import encode_em, encode_intensities, get_config
from deepem_jax.predictor import Predictor
from deepem_jax.response import AIA_CHANNELS, DEEPEM_LOGT, TemperatureResponse

CHANNELS = tuple(int(c) for c in AIA_CHANNELS.value)


@pytest.fixture(scope="module")
def response() -> TemperatureResponse:
    K = np.random.default_rng(0).uniform(1e-27, 1e-24, size=(6, 18))
    return TemperatureResponse(K, CHANNELS, tuple(DEEPEM_LOGT), "test-response")


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor.init(jax.random.key(0), "small")


def _trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _make_step(predictor: Predictor, tx):
    module = predictor.module

    @jax.jit
    def step(params, opt_state, y, em):
        def loss(p):
            out = module.apply({"params": p}, encode_intensities(y))
            return jnp.mean((out - encode_em(em)) ** 2)

        grads = jax.grad(loss)(params)
        # optax's Adam computes `decay**count` (float ** int32), refused by strict promotion
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def test_round_trip_and_exact_resume(tmp_path, predictor, response):
    tx = optax.adamw(1e-3)
    step = _make_step(predictor, tx)
    rng = np.random.default_rng(1)
    batches = [(rng.uniform(1, 1e3, (32, 6)), rng.uniform(0, 1e27, (32, 18))) for _ in range(3)]

    params, opt_state = predictor.params, tx.init(predictor.params)
    for y, em in batches:
        params, opt_state = step(params, opt_state, y, em)
    uninterrupted = params

    params, opt_state = predictor.params, tx.init(predictor.params)
    params, opt_state = step(params, opt_state, *batches[0])
    key = jax.random.key(7)
    history = [{"epoch": 1, "loss": 0.5}]
    ckpt = Checkpoint(
        params,
        predictor.config,
        predictor.logt,
        predictor.channels,
        ResponseId.of(response),
        opt_state=opt_state,
        epoch=1,
        step=1,
        rng=key,
        metrics={"val_mse": 0.25},
        extra={"history": history, "best_params": params, "train_config": {"lr": 1e-3}},
    )
    path = save_checkpoint(checkpoint_path(tmp_path, 1), ckpt)
    assert path.name == "checkpoint_00000001.msgpack"
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left behind

    got = load_checkpoint(path, response=response, opt_state_target=tx.init(predictor.params))
    assert (got.epoch, got.step, got.metrics) == (1, 1, {"val_mse": 0.25})
    assert got.config == predictor.config and got.channels == CHANNELS
    assert got.response == ResponseId.of(response)
    assert got.extra["history"] == history and got.extra["train_config"] == {"lr": 1e-3}
    _trees_equal(got.extra["best_params"], params)
    _trees_equal(got.params, params)
    _trees_equal(got.opt_state, opt_state)
    assert jax.random.key_impl(got.rng) == jax.random.key_impl(key)
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(key))

    params, opt_state = got.params, got.opt_state
    for y, em in batches[1:]:
        params, opt_state = step(params, opt_state, y, em)
    _trees_equal(params, uninterrupted)


def test_raw_uint32_rng_and_empty_optional_fields(tmp_path, predictor):
    ckpt = Checkpoint.from_predictor(predictor, metrics={"mse": 1.0})
    ckpt = Checkpoint(**{**ckpt.__dict__, "rng": jax.random.PRNGKey(3)})
    got = load_checkpoint(save_checkpoint(tmp_path / "c.msgpack", ckpt))
    np.testing.assert_array_equal(got.rng, jax.random.PRNGKey(3))
    assert got.rng.dtype == jnp.uint32
    assert got.opt_state is None and got.response is None and got.extra == {}
    with pytest.raises(CheckpointError, match="no optimiser state"):
        load_checkpoint(tmp_path / "c.msgpack", opt_state_target=optax.sgd(1.0).init({}))


def test_predictor_from_checkpoint(tmp_path, predictor, response):
    path = save_checkpoint(tmp_path / "p.msgpack", Checkpoint.from_predictor(predictor, response))
    loaded = load_predictor(path, response=response, strict_response=True)
    y = np.random.default_rng(2).uniform(1, 1e3, (5, 6))
    np.testing.assert_array_equal(loaded.predict(y), predictor.predict(y))
    assert loaded.config == predictor.config and loaded.logt == predictor.logt


def test_latest_checkpoint(tmp_path, predictor):
    assert latest_checkpoint(tmp_path / "missing") is None
    assert latest_checkpoint(tmp_path) is None
    ckpt = Checkpoint.from_predictor(predictor)
    for s in (2, 10, 3):
        save_checkpoint(checkpoint_path(tmp_path, s), ckpt)
    (tmp_path / "checkpoint_99999999.msgpack.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 10)
    with pytest.raises(ValueError, match="non-negative"):
        checkpoint_path(tmp_path, -1)


def test_failed_write_keeps_previous_file(tmp_path, predictor, monkeypatch):
    path = save_checkpoint(tmp_path / "c.msgpack", Checkpoint.from_predictor(predictor))
    before = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    newer = Checkpoint(**{**Checkpoint.from_predictor(predictor).__dict__, "epoch": 5})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, newer)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "truncated or foreign"),  # the first half of a real checkpoint
        (np.random.default_rng(0).bytes(300), "not a"),
        (json.dumps({"format": "deepem_jax.checkpoint"}).encode(), "not a"),
        (b"", "not a"),
    ],
    ids=["truncated", "random", "json", "empty"],
)
def test_foreign_and_truncated_files(tmp_path, predictor, content, match):
    path = tmp_path / "bad.msgpack"
    if content is None:
        good = save_checkpoint(tmp_path / "good.msgpack", Checkpoint.from_predictor(predictor))
        content = good.read_bytes()[: good.stat().st_size // 2]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_pth_file_is_not_a_checkpoint():
    pth = shared_path("deepem", "PaulJWright_DeepEM", "DeepEM_CNN_HelioML.pth")
    with pytest.raises(CheckpointError, match="load_pytorch_deepem"):
        load_checkpoint(pth)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.float16, jnp.complex64])
def test_params_of_another_dtype_are_refused(tmp_path, predictor, dtype):
    """Parameters that are not the architecture's float32 (a file written by other code) are
    refused on load, not run."""
    params = jax.tree.map(lambda a: a.astype(dtype), predictor.params)
    other = Checkpoint(**{**Checkpoint.from_predictor(predictor).__dict__, "params": params})
    path = save_checkpoint(tmp_path / "dtype.msgpack", other)
    with pytest.raises(CheckpointError, match=f"params hold {jnp.dtype(dtype)} values"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nothing.msgpack")


def test_params_must_fit_config(tmp_path, predictor):
    wrong = Checkpoint.from_predictor(predictor)
    wrong = Checkpoint(**{**wrong.__dict__, "config": get_config("deepem")})
    path = save_checkpoint(tmp_path / "w.msgpack", wrong)
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_checkpoint(path)


def test_opt_state_must_fit_template(tmp_path, predictor):
    tx = optax.adam(1e-3)
    ckpt = Checkpoint(
        **{**Checkpoint.from_predictor(predictor).__dict__, "opt_state": tx.init(predictor.params)}
    )
    path = save_checkpoint(tmp_path / "o.msgpack", ckpt)
    other = optax.chain(optax.clip(1.0), optax.sgd(1.0, momentum=0.9)).init(predictor.params)
    with pytest.raises(CheckpointError, match="optimiser state does not match"):
        load_checkpoint(path, opt_state_target=other)


def test_response_mismatch(tmp_path, predictor, response):
    path = save_checkpoint(tmp_path / "r.msgpack", Checkpoint.from_predictor(predictor, response))
    reordered = response.select(np.array([131, 94, 171, 193, 211, 335]) * AIA_CHANNELS.unit)
    with pytest.raises(CheckpointError, match="channels"):
        load_checkpoint(path, response=reordered)
    regridded = response.regrid(np.round(np.arange(5.6, 7.3001, 0.1), 2))
    with pytest.raises(CheckpointError, match="different grid"):
        load_checkpoint(path, response=regridded)
    scaled = TemperatureResponse(2 * response.K, response.channels, response.logt, "scaled")
    assert load_checkpoint(path, response=scaled).epoch == 0  # same grid: accepted by default
    with pytest.raises(CheckpointError, match="trained with response 'test-response'"):
        load_checkpoint(path, response=scaled, strict_response=True)


def test_five_channel_network_round_trip(tmp_path):
    """A network without 94 Å (5 inputs) saves and loads with its own channel list."""
    import dataclasses

    from deepem_jax.checkpoint import Checkpoint, load_predictor, save_checkpoint

    cfg = dataclasses.replace(get_config("small"), n_channels=5)
    chans = (131, 171, 193, 211, 335)
    pred = Predictor.init(jax.random.PRNGKey(0), cfg, tuple(DEEPEM_LOGT), chans)
    path = save_checkpoint(tmp_path / "five.msgpack", Checkpoint.from_predictor(pred))
    back = load_predictor(path)
    assert back.channels == chans and back.config.n_channels == 5
    y = np.full((3, 5), 50.0, np.float32)
    np.testing.assert_array_equal(back.predict(y), pred.predict(y))


# -- integrity: every file carries a sha256 of its contents, verified on load ----------------


def _shipped():
    from deepem_jax.pretrained import SHIPPED, weights_path

    return [weights_path(np.array(ch) * u.AA) for ch in SHIPPED]


@pytest.mark.parametrize("index", [0, 1], ids=["aia6", "aia5_no94"])
def test_shipped_weights_carry_a_valid_checksum(index):
    path = _shipped()[index]
    envelope = msgpack.unpackb(path.read_bytes())  # plain msgpack, not deepem_jax
    assert envelope["format"] == "deepem_jax.checkpoint" and envelope["version"] == 2
    assert hashlib.sha256(envelope["payload"]).hexdigest() == envelope["sha256"]
    ckpt = load_checkpoint(path)
    assert len(ckpt.channels) == ckpt.config.n_channels and len(ckpt.logt) == 18


def _largest_param_region(path) -> tuple[int, int]:
    """(offset, length) in the file of the second half of the largest parameter array's bytes
    (flax stores an array as a msgpack ExtType: a short header, then the raw buffer)."""
    raw = path.read_bytes()
    params = msgpack.unpackb(msgpack.unpackb(raw)["payload"])["params"]
    leaves = []

    def walk(node):
        for v in node.values():
            if isinstance(v, dict):
                walk(v)
            else:
                leaves.append(bytes(v.data))

    walk(params)
    data = max(leaves, key=len)
    tail = data[-4096:]
    assert raw.count(tail) == 1
    end = raw.find(tail) + len(tail)
    return end - len(data) // 2, len(data) // 2


def test_flipped_bytes_in_the_parameters_are_refused(tmp_path):
    src = _shipped()[0]
    raw = bytearray(src.read_bytes())
    offset, length = _largest_param_region(src)
    for i in np.linspace(offset, offset + length - 1, 50).astype(int):
        raw[i] ^= 0x10
    bad = tmp_path / "flipped.msgpack"
    bad.write_bytes(bytes(raw))
    # still parseable msgpack all the way down: only the checksum tells
    msgpack.unpackb(msgpack.unpackb(bytes(raw))["payload"], strict_map_key=False)
    with pytest.raises(CheckpointError, match=r"flipped\.msgpack is corrupt: the sha256"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_predictor(bad)


def test_truncated_shipped_weights_are_refused(tmp_path):
    raw = _shipped()[1].read_bytes()
    bad = tmp_path / "short.msgpack"
    bad.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CheckpointError, match=r"short\.msgpack is not a readable"):
        load_checkpoint(bad)


def test_altered_checksum_and_payload_are_refused(tmp_path, predictor):
    path = save_checkpoint(tmp_path / "c.msgpack", Checkpoint.from_predictor(predictor))
    envelope = msgpack.unpackb(path.read_bytes())
    wrong = {**envelope, "sha256": hashlib.sha256(b"other").hexdigest()}
    path.write_bytes(msgpack.packb(wrong))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)
    path.write_bytes(msgpack.packb({**envelope, "payload": None}))
    with pytest.raises(CheckpointError, match="payload or checksum is missing"):
        load_checkpoint(path)
    junk = b"\xc1" * 16  # never valid msgpack, with a checksum that matches it
    path.write_bytes(
        msgpack.packb({**envelope, "payload": junk, "sha256": hashlib.sha256(junk).hexdigest()})
    )
    with pytest.raises(CheckpointError, match="payload is not readable"):
        load_checkpoint(path)


def test_version_1_files_without_checksum_are_refused(tmp_path):
    path = tmp_path / "v1.msgpack"
    path.write_bytes(msgpack.packb({"format": "deepem_jax.checkpoint", "version": 1}))
    with pytest.raises(CheckpointError, match="format version 1; this deepem_jax reads version 2"):
        load_checkpoint(path)


def test_non_finite_params_are_refused(tmp_path, predictor):
    params = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), predictor.params)
    nan = Checkpoint(**{**Checkpoint.from_predictor(predictor).__dict__, "params": params})
    path = save_checkpoint(tmp_path / "nan.msgpack", nan)
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        load_checkpoint(path)
