"""Import of the original DeepEM PyTorch weights (``.pth``) without torch and without
executing pickle code."""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import astropy.units as u
import jax.numpy as jnp
import numpy as np

from ..model import ModelConfig
from ..predictor import Predictor
from ..response import AIA_CHANNELS, DEEPEM_LOGT

__all__ = ["load_pytorch_deepem", "read_torch_state_dict"]

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


@dataclasses.dataclass
class _StorageRef:
    """Stand-in for a torch storage: a key into the raw float32 data that follows the pickle."""

    key: str
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    """Stand-in for ``torch._utils._rebuild_tensor_v2``'s result."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise ValueError(f"storage {self.storage.key} has no data")
        if self.size and any(s < 0 for s in self.stride):
            raise ValueError("negative tensor strides are not supported")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if self.offset < 0 or (all(self.size) and last >= data.size):
            raise ValueError(f"tensor view of {self.size} runs past its storage ({data.size})")
        base = data[self.offset :]
        strides = tuple(s * data.itemsize for s in self.stride)
        return np.lib.stride_tricks.as_strided(base, self.size, strides).copy()


class _FloatStorage:
    """Marker for ``torch.FloatStorage`` (float32)."""


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, *_rest):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch", "FloatStorage"): _FloatStorage,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the three globals a float32 state dict needs and maps
    them to local stand-ins; anything else (``os.system``, ``builtins.eval``...) is refused
    before it could run."""

    def __init__(self, fh: io.BufferedIOBase, storages: dict[str, _StorageRef]):
        super().__init__(fh)
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a weights file "
                "(only OrderedDict, torch._utils._rebuild_tensor_v2 and torch.FloatStorage "
                "are allowed)"
            ) from None

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, *view = pid
        if storage_type is not _FloatStorage:
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if view and view[0] is not None:
            raise pickle.UnpicklingError("legacy storage views are not supported")
        key = str(key)
        ref = self._storages.setdefault(key, _StorageRef(key, int(numel)))
        if ref.numel != int(numel):
            raise pickle.UnpicklingError(f"storage {key} declared with two sizes")
        return ref


def _restricted_load(fh: io.BufferedIOBase, storages: dict[str, _StorageRef]) -> Any:
    return _RestrictedUnpickler(fh, storages).load()


def _read_legacy(fh: io.BufferedIOBase) -> tuple[Any, dict[str, _StorageRef]]:
    """torch.save before 1.6: magic, protocol, sys_info, object and key-list pickles, then for
    each key an int64 element count followed by the raw little-endian float32 data."""
    if _restricted_load(fh, {}) != _LEGACY_MAGIC:
        raise ValueError("not a PyTorch file (bad magic number)")
    if _restricted_load(fh, {}) != _LEGACY_PROTOCOL:
        raise ValueError("unsupported legacy PyTorch protocol version")
    sys_info = _restricted_load(fh, {})
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian", False)):
        raise ValueError("only little-endian PyTorch files are supported")
    storages: dict[str, _StorageRef] = {}
    obj = _restricted_load(fh, storages)
    keys = _restricted_load(fh, {})
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise ValueError("storage key list does not match the storages used by the tensors")
    for key in map(str, keys):
        header = fh.read(8)
        if len(header) != 8:
            raise ValueError(f"file truncated before storage {key}")
        (numel,) = struct.unpack("<q", header)
        ref = storages[key]
        if numel != ref.numel:
            raise ValueError(f"storage {key} holds {numel} values, the pickle says {ref.numel}")
        raw = fh.read(4 * numel)
        if len(raw) != 4 * numel:
            raise ValueError(f"file truncated inside storage {key}")
        ref.data = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return obj, storages


def _read_zip(path: str | os.PathLike) -> tuple[Any, dict[str, _StorageRef]]:
    """torch.save from 1.6 on: a zip with ``<root>/data.pkl`` and ``<root>/data/<key>``."""
    with zipfile.ZipFile(path) as zf:
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip file without a single */data.pkl: not a torch file")
        root = pkl[0][: -len("data.pkl")]
        storages: dict[str, _StorageRef] = {}
        with zf.open(pkl[0]) as fh:
            obj = _restricted_load(fh, storages)
        for key, ref in storages.items():
            raw = zf.read(f"{root}data/{key}")
            if len(raw) != 4 * ref.numel:
                raise ValueError(f"storage {key} has {len(raw)} bytes, expected {4 * ref.numel}")
            ref.data = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    return obj, storages


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict of float32 tensors into numpy arrays, executing no pickle code.

    Handles the legacy (before torch 1.6) stream format and the zip format. The unpickler
    accepts only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
    ``torch.FloatStorage``; any other global raises :class:`pickle.UnpicklingError` without
    being imported or called.
    """
    if zipfile.is_zipfile(path):
        obj, _ = _read_zip(path)
    else:
        with open(path, "rb") as fh:
            obj, _ = _read_legacy(fh)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _TensorRef):
            raise ValueError(f"{path}: entry {name!r} is not a tensor")
        out[str(name)] = value.to_numpy()
    return out


def load_pytorch_deepem(
    path: str | os.PathLike,
    *,
    logt: tuple[float, ...] | np.ndarray = tuple(DEEPEM_LOGT),
    channels: tuple[int, ...] = tuple(int(c) for c in AIA_CHANNELS.to_value(u.AA)),
    negative_slope: float = 0.01,
) -> Predictor:
    """Import an original DeepEM ``.pth`` (``nn.Sequential`` of 1x1 ``Conv2d`` and LeakyReLU)
    as a :class:`Predictor`, without torch and without executing pickle code.

    Conv weights (out, in, 1, 1) become dense kernels (in, out). The layer widths come from
    the file; the grid defaults to :data:`~deepem_jax.response.DEEPEM_LOGT` (log T 5.5--7.2)
    and the channels to 94, 131, 171, 193, 211, 335 Å, as in the original.
    """
    state = read_torch_state_dict(path)
    layer_ids = sorted({int(k.split(".")[0]) for k in state if k.split(".")[0].isdigit()})
    expected = {f"{i}.{p}" for i in layer_ids for p in ("weight", "bias")}
    if not layer_ids or set(state) != expected:
        raise ValueError(
            f"{path}: keys {sorted(state)} are not those of a Sequential of convolutions"
        )
    params = {}
    widths = []
    for j, i in enumerate(layer_ids):
        w, b = state[f"{i}.weight"], state[f"{i}.bias"]
        if w.ndim != 4 or w.shape[2:] != (1, 1) or b.shape != (w.shape[0],):
            raise ValueError(f"{path}: layer {i} is not a 1x1 convolution ({w.shape}, {b.shape})")
        if widths and w.shape[1] != widths[-1]:
            raise ValueError(f"{path}: layer {i} takes {w.shape[1]} inputs, not {widths[-1]}")
        widths = [*widths, w.shape[0]] if widths else [w.shape[1], w.shape[0]]
        params[f"dense_{j}"] = {"kernel": jnp.asarray(w[:, :, 0, 0].T), "bias": jnp.asarray(b)}
    config = ModelConfig(
        hidden=tuple(widths[1:-1]),
        n_channels=widths[0],
        n_temperatures=widths[-1],
        negative_slope=negative_slope,
    )
    return Predictor(params, config, tuple(logt), tuple(channels))
