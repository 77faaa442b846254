"""Checkpoints of DeepEM networks: params, config, grid, response identity, metrics and the
training state needed to resume exactly.

A checkpoint is one msgpack file (``flax.serialization``; never pickle) holding::

    format   "deepem_jax.checkpoint"
    version  2
    sha256   hex sha256 of the bytes of ``payload``
    payload  msgpack bytes of:
        config   ModelConfig as a dict
        logt     log10(T / K) of the output bins
        channels AIA channels in Å, input order
        response {"name", "channels", "logt", "sha256"} of the response matrix used in training
        params   Flax params
        opt_state, epoch, step, rng, metrics, extra    (for resuming training; optional)

The checksum covers the whole payload, so a file whose parameters, config or training state
were altered after writing (flipped bytes, a partial copy) is refused with
:class:`CheckpointError` instead of running; params that are not finite are refused too.
Files are written to a temporary file in the same folder and moved into place with
``os.replace``, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import serialization

from ._atomic import atomic_write
from .model import ModelConfig
from .predictor import Predictor
from .response import TemperatureResponse

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "ResponseId",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "load_predictor",
    "save_checkpoint",
]

FORMAT = "deepem_jax.checkpoint"
VERSION = 2
_NAME = re.compile(r"^checkpoint_(\d+)\.msgpack$")


class CheckpointError(ValueError):
    """A file is not a readable deepem_jax checkpoint, or does not fit the response given."""


@dataclasses.dataclass(frozen=True)
class ResponseId:
    """Identity of a temperature response: its name, channels (Å), log T grid and the sha256
    of its matrix K (float64, C order, DN cm^5 s^-1 pix^-1)."""

    name: str
    channels: tuple[int, ...]
    logt: tuple[float, ...]
    sha256: str

    @classmethod
    def of(cls, response: TemperatureResponse) -> ResponseId:
        """The identity of ``response``."""
        k = np.ascontiguousarray(np.asarray(response.K, dtype=np.float64))
        return cls(
            response.name,
            tuple(response.channels),
            tuple(float(t) for t in response.logt),
            hashlib.sha256(k.tobytes()).hexdigest(),
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Checkpoint:
    """Everything a checkpoint holds.

    ``params`` are Flax params; ``opt_state`` is an optax state (or, after loading without a
    template, its state dict); ``rng`` a typed JAX key or a raw uint32 key; ``metrics`` a flat
    dict of floats; ``epoch``/``step`` count completed epochs and optimiser steps; ``extra`` is
    any other training bookkeeping (training config, best params, loss history...) as plain
    data that msgpack can hold: dicts with string keys, lists, numbers, strings, arrays.
    """

    params: Any
    config: ModelConfig
    logt: tuple[float, ...]
    channels: tuple[int, ...]
    response: ResponseId | None = None
    opt_state: Any = None
    epoch: int = 0
    step: int = 0
    rng: jax.Array | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_predictor(
        cls,
        predictor: Predictor,
        response: TemperatureResponse | None = None,
        metrics: dict[str, float] | None = None,
    ) -> Checkpoint:
        """A checkpoint of a trained network alone (no optimiser state)."""
        return cls(
            predictor.params,
            predictor.config,
            predictor.logt,
            predictor.channels,
            ResponseId.of(response) if response is not None else None,
            metrics=dict(metrics or {}),
        )

    def predictor(self) -> Predictor:
        """The :class:`~deepem_jax.predictor.Predictor` of these params."""
        return Predictor(self.params, self.config, self.logt, self.channels)


def _encode_rng(rng: jax.Array | None) -> dict[str, Any] | None:
    if rng is None:
        return None
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        return {"typed": True, "impl": impl, "data": np.asarray(jax.random.key_data(rng))}
    return {"typed": False, "impl": "", "data": np.asarray(rng)}


def _decode_rng(d: dict[str, Any] | None) -> jax.Array | None:
    if d is None:
        return None
    data = jax.numpy.asarray(d["data"])
    return jax.random.wrap_key_data(data, impl=d["impl"]) if d["typed"] else data


def checkpoint_path(workdir: str | os.PathLike, step: int) -> Path:
    """The canonical file name ``workdir/checkpoint_<step:08d>.msgpack``."""
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return Path(workdir) / f"checkpoint_{step:08d}.msgpack"


def latest_checkpoint(workdir: str | os.PathLike) -> Path | None:
    """The canonically named checkpoint in ``workdir`` with the highest step, or None."""
    d = Path(workdir)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return max(found)[1] if found else None


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` with the sha256 checksum of its contents to ``path`` atomically (temporary
    file + ``os.replace``); returns the path.

    Use :func:`checkpoint_path` for names that :func:`latest_checkpoint` finds.
    """
    path = Path(path)
    payload = {
        "config": ckpt.config.to_dict(),
        "logt": np.asarray(ckpt.logt, dtype=np.float64),
        "channels": np.asarray(ckpt.channels, dtype=np.int64),
        "response": None
        if ckpt.response is None
        else {
            "name": ckpt.response.name,
            "channels": np.asarray(ckpt.response.channels, dtype=np.int64),
            "logt": np.asarray(ckpt.response.logt, dtype=np.float64),
            "sha256": ckpt.response.sha256,
        },
        "params": serialization.to_state_dict(ckpt.params),
        "opt_state": None
        if ckpt.opt_state is None
        else serialization.to_state_dict(ckpt.opt_state),
        "epoch": int(ckpt.epoch),
        "step": int(ckpt.step),
        "rng": _encode_rng(ckpt.rng),
        "metrics": {str(k): float(v) for k, v in ckpt.metrics.items()},
        "extra": ckpt.extra,
    }
    body = serialization.msgpack_serialize(payload)
    data = serialization.msgpack_serialize(
        {
            "format": FORMAT,
            "version": VERSION,
            "sha256": hashlib.sha256(body).hexdigest(),
            "payload": body,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fh.write(data)
    return path


def _read_payload(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    if raw[:1] == b"\x80" or raw[:2] == b"PK":
        raise CheckpointError(
            f"{path} looks like a PyTorch file, not a deepem_jax checkpoint; "
            "import original DeepEM weights with deepem_jax.io.load_pytorch_deepem"
        )
    try:
        envelope = serialization.msgpack_restore(raw)
    except Exception as err:  # msgpack raises assorted errors on foreign or truncated bytes
        raise CheckpointError(
            f"{path} is not a readable deepem_jax checkpoint (truncated or foreign file): {err}"
        ) from err
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a deepem_jax checkpoint (no format marker)")
    if envelope.get("version") != VERSION:
        raise CheckpointError(
            f"{path} is checkpoint format version {envelope.get('version')}; "
            f"this deepem_jax reads version {VERSION}"
        )
    body, stored = envelope.get("payload"), envelope.get("sha256")
    if not isinstance(body, bytes) or not isinstance(stored, str):
        raise CheckpointError(f"{path} is corrupt: its payload or checksum is missing")
    actual = hashlib.sha256(body).hexdigest()
    if actual != stored:
        raise CheckpointError(
            f"{path} is corrupt: the sha256 of its contents ({actual[:12]}...) is not the "
            f"checksum stored in it ({stored[:12]}...); restore the file from a good copy"
        )
    try:
        payload = serialization.msgpack_restore(body)
    except Exception as err:  # a checksum-valid payload that is not msgpack: foreign writer
        raise CheckpointError(f"{path} is corrupt: its payload is not readable: {err}") from err
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} is corrupt: its payload is not a mapping")
    return payload


def _check_response(path: Path, ckpt: Checkpoint, response: TemperatureResponse, strict: bool):
    if tuple(response.channels) != ckpt.channels:
        raise CheckpointError(
            f"{path}: network takes channels {list(ckpt.channels)} Å but the response "
            f"{response.name!r} has {list(response.channels)} Å"
        )
    if len(response.logt) != len(ckpt.logt) or not np.allclose(
        response.logt, ckpt.logt, rtol=0, atol=1e-6
    ):
        raise CheckpointError(
            f"{path}: network outputs log T {ckpt.logt[0]:.2f}..{ckpt.logt[-1]:.2f} "
            f"({len(ckpt.logt)} bins) but the response {response.name!r} is on a different grid; "
            "regrid the response to the network grid first"
        )
    if strict:
        rid = ResponseId.of(response)
        if ckpt.response is None or ckpt.response.sha256 != rid.sha256:
            trained = (
                "an unrecorded response"
                if ckpt.response is None
                else (f"response {ckpt.response.name!r} (sha256 {ckpt.response.sha256[:12]}...)")
            )
            raise CheckpointError(
                f"{path}: network was trained with {trained}, not with {response.name!r} "
                f"(sha256 {rid.sha256[:12]}...)"
            )


def _checkpoint_of(payload: dict[str, Any]) -> Checkpoint:
    """The :class:`Checkpoint` of a verified payload (``opt_state`` left as a state dict);
    KeyError, TypeError or ValueError where a field is missing or of the wrong type."""
    config = ModelConfig.from_dict(payload["config"])
    resp = payload["response"]
    return Checkpoint(
        params=jax.tree.map(jax.numpy.asarray, payload["params"]),
        config=config,
        logt=tuple(float(t) for t in payload["logt"]),
        channels=tuple(int(c) for c in payload["channels"]),
        response=None
        if resp is None
        else ResponseId(
            str(resp["name"]),
            tuple(int(c) for c in resp["channels"]),
            tuple(float(t) for t in resp["logt"]),
            str(resp["sha256"]),
        ),
        opt_state=payload["opt_state"],
        epoch=int(payload["epoch"]),
        step=int(payload["step"]),
        rng=_decode_rng(payload["rng"]),
        metrics={str(k): float(v) for k, v in payload["metrics"].items()},
        extra=payload["extra"],
    )


def _check_params(path: Path, ckpt: Checkpoint) -> None:
    """CheckpointError unless the params have the structure, shapes and dtypes of the
    checkpoint's architecture and are all finite."""
    params, config = ckpt.predictor().params, ckpt.config
    template = jax.eval_shape(
        lambda: Predictor.init(jax.random.key(0), config, ckpt.logt, ckpt.channels).params
    )
    leaves, got = jax.tree.leaves(template), jax.tree.leaves(params)
    if jax.tree.structure(template) != jax.tree.structure(params) or any(
        a.shape != np.shape(b) for a, b in zip(leaves, got, strict=True)
    ):
        raise CheckpointError(f"{path}: params do not match the architecture {config}")
    want = {str(a.dtype) for a in leaves}
    wrong = {str(np.asarray(b).dtype) for b in got} - want
    if wrong:
        raise CheckpointError(
            f"{path}: params hold {', '.join(sorted(wrong))} values; the architecture's are "
            f"{', '.join(sorted(want))}"
        )
    if not all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in got):
        raise CheckpointError(f"{path}: params hold NaN or Inf values (a diverged network)")


def _with_opt_state(path: Path, ckpt: Checkpoint, target: Any) -> Checkpoint:
    """``ckpt`` with its saved optimiser state restored into the structure of ``target``;
    CheckpointError if there is none or it does not fit."""
    if ckpt.opt_state is None:
        raise CheckpointError(f"{path} holds no optimiser state to resume from")
    try:
        opt_state = serialization.from_state_dict(target, ckpt.opt_state)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"{path}: optimiser state does not match the template given: {err}"
        ) from err
    return dataclasses.replace(ckpt, opt_state=opt_state)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    response: TemperatureResponse | None = None,
    strict_response: bool = False,
    opt_state_target: Any = None,
) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    response
        If given, the network's channels and log T grid must equal the response's, else
        :class:`CheckpointError`. With ``strict_response=True`` the response matrix must also
        be the very one recorded at training (same sha256).
    opt_state_target
        An optimiser state of the right structure (e.g. ``optimizer.init(params)``); the saved
        state is restored into it. Without it ``opt_state`` is returned as a state dict.

    Raises :class:`CheckpointError` (a ValueError) for truncated, foreign, corrupt (checksum
    mismatch) or mismatched files, and for params that are not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = _read_payload(path)
    try:
        ckpt = _checkpoint_of(payload)
        _check_params(path, ckpt)
    except (KeyError, TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed deepem_jax checkpoint: {err!r}") from err
    if opt_state_target is not None:
        ckpt = _with_opt_state(path, ckpt, opt_state_target)
    if response is not None:
        _check_response(path, ckpt, response, strict_response)
    return ckpt


def load_predictor(
    path: str | os.PathLike,
    *,
    response: TemperatureResponse | None = None,
    strict_response: bool = False,
) -> Predictor:
    """The :class:`~deepem_jax.predictor.Predictor` stored in a checkpoint (see
    :func:`load_checkpoint` for the response checks)."""
    ckpt = load_checkpoint(path, response=response, strict_response=strict_response)
    return ckpt.predictor()
