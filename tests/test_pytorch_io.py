"""Torch-free import of the original DeepEM weights (``deepem_jax.io.load_pytorch_deepem``),
checked against an independent reading of the files and a numpy forward pass."""

from __future__ import annotations

import pickle
import pickletools
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import shared_path

from deepem_jax.io import load_pytorch_deepem, read_torch_state_dict
from deepem_jax.model import encode_intensities, get_config
from deepem_jax.response import DEEPEM_LOGT

PTH_FILES = [
    ("HelioML_HelioML", "book", "04", "DeepEM_CNN_HelioML.pth"),
    ("PaulJWright_DeepEM", "DeepEM_CNN_HelioML.pth"),
]
ORIGINAL_SHAPES = {
    "0.weight": (300, 6, 1, 1),
    "0.bias": (300,),
    "2.weight": (300, 300, 1, 1),
    "2.bias": (300,),
    "4.weight": (18, 300, 1, 1),
    "4.bias": (18,),
}


# -- an independent reader and writer of the legacy torch.save stream --------------------------


def _independent_state_dict(path) -> dict[str, np.ndarray]:
    """Raw tensors of a legacy .pth read with pickletools only (no unpickling): the object
    pickle lists each tensor name followed by its storage key; the raw data follows the key
    list in the key-list order as (int64 count, float32 values)."""
    with open(path, "rb") as fh:
        for _ in range(3):
            list(pickletools.genops(fh))
        strings = [arg for op, arg, _ in pickletools.genops(fh) if op.name == "BINUNICODE"]
        order = [arg for op, arg, _ in pickletools.genops(fh) if op.name == "BINUNICODE"]
        raw = {}
        for key in order:
            (count,) = struct.unpack("<q", fh.read(8))
            raw[key] = np.frombuffer(fh.read(4 * count), dtype="<f4")
    names = [i for i, s in enumerate(strings) if re.fullmatch(r"\d+\.(weight|bias)", s)]
    out = {}
    for i in names:
        key = next(s for s in strings[i + 1 :] if s in raw)
        out[strings[i]] = raw[key].reshape(ORIGINAL_SHAPES[strings[i]])
    return out


def _numpy_deepem(state: dict[str, np.ndarray], y: np.ndarray) -> np.ndarray:
    """The original forward pass in float64 numpy: raw network output (N, 18)."""
    h = np.sqrt(np.maximum(y.astype(np.float64), 0.0))
    for i in (0, 2, 4):
        w = state[f"{i}.weight"][:, :, 0, 0].astype(np.float64)
        h = h @ w.T + state[f"{i}.bias"]
        if i < 4:
            h = np.where(h > 0, h, 0.01 * h)
    return h


def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _op_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)


def _op_tuple(xs) -> bytes:
    return b"(" + b"".join(_op_int(x) for x in xs) + b"t"


def _state_pickle(
    tensors: dict[str, np.ndarray], storage: str = "FloatStorage", views: dict | None = None
) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, as torch.save writes it; each tensor is
    its whole (C-contiguous) storage unless ``views[name] = (shape, stride)`` says otherwise."""
    out = b"\x80\x02ccollections\nOrderedDict\n)R("
    for i, (name, arr) in enumerate(tensors.items()):
        shape, stride = (views or {}).get(name, (arr.shape, np.array(arr.strides) // 4))
        out += _op_str(name) + b"ctorch._utils\n_rebuild_tensor_v2\n(("
        out += _op_str("storage") + f"ctorch\n{storage}\n".encode() + _op_str(f"k{i}")
        out += _op_str("cpu") + _op_int(arr.size) + b"NtQ" + _op_int(0)
        out += _op_tuple(shape) + _op_tuple(stride) + b"\x89NtR"
    return out + b"u."


def _write_legacy(path, tensors: dict[str, np.ndarray], obj_pickle: bytes | None = None):
    info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"int": 4}}
    with open(path, "wb") as fh:
        for header in (0x1950A86A20F9469CFC6C, 1001, info):
            fh.write(pickle.dumps(header, protocol=2))
        fh.write(obj_pickle if obj_pickle is not None else _state_pickle(tensors))
        fh.write(pickle.dumps([f"k{i}" for i in range(len(tensors))], protocol=2))
        for arr in tensors.values():
            fh.write(struct.pack("<q", arr.size) + arr.astype("<f4").tobytes())


def _small_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"0.weight": (5, 6, 1, 1), "0.bias": (5,), "2.weight": (18, 5, 1, 1), "2.bias": (18,)}
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


# -- configs and transforms ---------------------------------------------------------------------


@pytest.mark.parametrize("parts", PTH_FILES, ids=["HelioML", "PaulJWright"])
def test_original_weights_reproduce_numpy_forward(parts):
    path = shared_path("deepem", *parts)
    state = read_torch_state_dict(path)
    ref = _independent_state_dict(path)
    assert {k: v.shape for k, v in state.items()} == ORIGINAL_SHAPES
    for k in ORIGINAL_SHAPES:
        np.testing.assert_array_equal(state[k], ref[k])

    pred = load_pytorch_deepem(path)
    assert pred.config == get_config("deepem")
    assert sum(x.size for x in jax.tree.leaves(pred.params)) == 97_818
    np.testing.assert_array_equal(pred.logt_array, DEEPEM_LOGT)
    assert pred.channels == (94, 131, 171, 193, 211, 335)

    rng = np.random.default_rng(1)
    y = (10 ** rng.uniform(-1, 3.5, size=(257, 6))).astype(np.float32)
    y[:5] *= -1  # negative (dark-subtracted) intensities are clipped to zero by the input map
    out_np = _numpy_deepem(ref, y)
    out = pred.module.apply({"params": pred.params}, encode_intensities(jnp.asarray(y)))
    np.testing.assert_allclose(np.asarray(out), out_np, atol=1e-5, rtol=1e-5)
    em = pred.predict(y, dtype="float32")
    np.testing.assert_allclose(em, 1e25 * out_np**2, rtol=1e-4, atol=1e20)


def test_the_two_original_files_differ():
    a = read_torch_state_dict(shared_path("deepem", *PTH_FILES[0]))
    b = read_torch_state_dict(shared_path("deepem", *PTH_FILES[1]))
    assert not np.allclose(a["4.weight"], b["4.weight"])


def test_synthetic_legacy_and_zip_files(tmp_path):
    state = _small_state()
    legacy = tmp_path / "small.pth"
    _write_legacy(legacy, state)
    got = read_torch_state_dict(legacy)
    assert list(got) == list(state)
    for k in state:
        np.testing.assert_array_equal(got[k], state[k])
    # torch >= 1.6 zip layout: the same object pickle plus one raw file per storage
    zpath = tmp_path / "small_zip.pth"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("archive/data.pkl", _state_pickle(state))
        for i, arr in enumerate(state.values()):
            zf.writestr(f"archive/data/k{i}", arr.astype("<f4").tobytes())
    for k, v in read_torch_state_dict(zpath).items():
        np.testing.assert_array_equal(v, state[k])

    pred = load_pytorch_deepem(legacy)
    assert pred.config.hidden == (5,)
    y = np.abs(np.random.default_rng(2).normal(size=(4, 6))) * 50
    h = np.sqrt(y) @ state["0.weight"][:, :, 0, 0].T + state["0.bias"]
    h = np.where(h > 0, h, 0.01 * h) @ state["2.weight"][:, :, 0, 0].T + state["2.bias"]
    np.testing.assert_allclose(pred.predict(y, dtype="float32"), 1e25 * h**2, rtol=1e-4)


def test_transposed_tensor_view(tmp_path):
    """A non-contiguous tensor (a transposed weight) is read through its strides."""
    state = _small_state()
    w = np.ascontiguousarray(state["0.weight"][:, :, 0, 0].T)  # (6, 5) in memory
    path = tmp_path / "strided.pth"
    views = {"w": ((5, 6), (1, 5))}  # the logical (5, 6) transpose of the stored (6, 5)
    _write_legacy(path, {"w": w}, obj_pickle=_state_pickle({"w": w}, views=views))
    np.testing.assert_array_equal(read_torch_state_dict(path)["w"], w.T)


@pytest.mark.parametrize("module, name", [("os", "system"), ("builtins", "eval")])
def test_forbidden_global_is_refused_without_running(tmp_path, module, name):
    marker = tmp_path / "pwned"
    cmd = f"open({str(marker)!r}, 'w')" if name == "eval" else f"touch {marker}"
    evil = f"c{module}\n{name}\n(V{cmd}\ntR.".encode()
    path = tmp_path / "evil.pth"
    _write_legacy(path, {}, obj_pickle=evil)
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load global {module}.{name}"):
        read_torch_state_dict(path)
    assert not marker.exists()


def test_bad_torch_files(tmp_path):
    state = _small_state()
    path = tmp_path / "double.pth"
    _write_legacy(path, state, obj_pickle=_state_pickle(state, storage="DoubleStorage"))
    with pytest.raises(pickle.UnpicklingError, match=r"torch\.DoubleStorage"):
        read_torch_state_dict(path)

    good = tmp_path / "good.pth"
    _write_legacy(good, state)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_torch_state_dict(cut)

    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match="magic"):
        read_torch_state_dict(junk)

    notconv = tmp_path / "notconv.pth"
    _write_legacy(notconv, {"0.weight": np.ones((5, 6), np.float32), "0.bias": np.ones(5, "f4")})
    with pytest.raises(ValueError, match="not a 1x1 convolution"):
        load_pytorch_deepem(notconv)


# -- Predictor ---------------------------------------------------------------------------------
