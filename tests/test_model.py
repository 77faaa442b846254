"""The DeepEM network and its Predictor."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import astropy.units as u
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepem_jax.model import (
    CONFIGS,
    DeepEMNet,
    ModelConfig,
    decode_em,
    encode_em,
    encode_intensities,
    get_config,
)
from deepem_jax.predictor import Predictor, _predict_tile, native_dtype
from deepem_jax.response import DEEPEM_LOGT


def test_named_configs_parameter_counts():
    assert get_config("deepem").n_params == 97_818
    assert get_config("small").n_params == (6 * 64 + 64) + (64 * 64 + 64) + (64 * 18 + 18)
    for name, cfg in CONFIGS.items():
        p = Predictor.init(jax.random.key(0), name)
        assert sum(x.size for x in jax.tree.leaves(p.params)) == cfg.n_params
    with pytest.raises(ValueError, match="unknown model config"):
        get_config("huge")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "softmax"}, "unknown activation"),
        ({"output": "exp"}, "unknown output"),
        ({"hidden": (0,)}, "positive"),
        ({"em_scale": -1.0}, "em_scale"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = ModelConfig(hidden=(8, 4, 2), activation="gelu", output="relu_square")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})


def test_transforms():
    em = jnp.array([0.0, 1e25, 4e27])
    np.testing.assert_allclose(encode_em(em), [0.0, 1.0, 20.0], rtol=1e-6)
    np.testing.assert_allclose(decode_em(encode_em(em)), em, rtol=1e-6)
    np.testing.assert_allclose(encode_intensities(jnp.array([-3.0, 4.0])), [0.0, 2.0])
    out = jnp.array([-2.0, 3.0])
    np.testing.assert_allclose(decode_em(out), [4e25, 9e25], rtol=1e-6)
    relu = ModelConfig(output="relu_square")
    np.testing.assert_allclose(decode_em(out, relu), [0.0, 9e25], rtol=1e-6)


# -- the original weights -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_predictor() -> Predictor:
    return Predictor.init(jax.random.key(3), "small")


def _intensities(shape, seed=0) -> np.ndarray:
    return (10 ** np.random.default_rng(seed).uniform(0, 3, size=(*shape, 6))).astype(np.float32)


def test_predict_shapes_and_tiling(small_predictor):
    imgs = _intensities((2, 9, 11))
    em_batch = small_predictor.predict(imgs)
    assert em_batch.shape == (2, 9, 11, 18) and em_batch.dtype == np.float32
    np.testing.assert_array_equal(small_predictor.predict(imgs[1]), em_batch[1])
    flat = small_predictor.predict(imgs.reshape(-1, 6), tile_size=16)  # 198 px: 13 tiles, padded
    # different tile shapes may sum in a different order: compare in the network's own space
    np.testing.assert_allclose(
        np.sqrt(flat / 1e25), np.sqrt(em_batch.reshape(-1, 18) / 1e25), rtol=1e-5, atol=1e-5
    )
    assert small_predictor.predict(imgs[0, 0, 0]).shape == (18,)
    assert np.all(em_batch >= 0)


def test_predict_compiles_once_per_tile(small_predictor):
    small_predictor.predict(_intensities((100,)), tile_size=32)
    before = _predict_tile._cache_size()
    small_predictor.predict(_intensities((300,)), tile_size=32)
    small_predictor.predict(_intensities((7, 13)), tile_size=32)
    assert _predict_tile._cache_size() == before


def test_predict_quantity(small_predictor):
    y = _intensities((4,))
    em = small_predictor.predict(y * u.DN / (u.s * u.pix))
    assert em.unit == u.cm**-5
    np.testing.assert_allclose(em.value, small_predictor.predict(y))
    em_k = small_predictor.predict(y * 60 * u.DN / (u.min * u.pix))
    np.testing.assert_allclose(np.sqrt(em_k.value), np.sqrt(em.value), rtol=1e-5, atol=1e8)
    with pytest.raises(u.UnitConversionError, match="not convertible"):
        small_predictor.predict(y * u.erg)


def test_predict_bad_input(small_predictor):
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 6\)"):
        small_predictor.predict(np.ones((4, 7)))
    with pytest.raises(ValueError, match="tile_size"):
        small_predictor.predict(np.ones((4, 6)), tile_size=0)
    y = _intensities((3, 4))
    y[1, 2, 0] = np.nan
    y[2, 3, 5] = np.inf
    em = small_predictor.predict(y)
    valid = np.all(np.isfinite(em), axis=-1)
    expected = np.ones((3, 4), bool)
    expected[1, 2] = expected[2, 3] = False
    np.testing.assert_array_equal(valid, expected)
    assert np.all(np.isnan(em[~expected])) and np.all(np.isfinite(em[expected]))
    np.testing.assert_allclose(em[expected], small_predictor.predict(y[expected]), rtol=1e-6)


def test_predict_under_x64_is_float32(small_predictor, x64):
    y = _intensities((10,)).astype(np.float64)
    em = small_predictor.predict(y)
    assert em.dtype == np.float32 and np.all(np.isfinite(em))


def _numpy_mlp(params, y: np.ndarray, bf16_operands: bool) -> np.ndarray:
    """Raw output of the MLP in float64 numpy, an independent reference: each layer's input and
    kernel rounded to bfloat16 first when ``bf16_operands``, the bias and sums in float64."""
    import ml_dtypes

    def operand(a):
        a = np.asarray(a, np.float32)
        return (a.astype(ml_dtypes.bfloat16) if bf16_operands else a).astype(np.float64)

    x = np.sqrt(np.asarray(y, np.float64))
    for i in range(len(params)):
        layer = params[f"dense_{i}"]
        if i:
            x = np.where(x >= 0, x, 0.01 * x)
        x = operand(x) @ operand(layer["kernel"]) + np.asarray(layer["bias"], np.float64)
    return x


def test_mlp_dtype_is_the_products_operands(small_predictor):
    """``bfloat16``: the layers' inputs and kernels are rounded to bfloat16, products summed,
    biases added and activations taken in float32 (the numpy reference to 1e-5 of the largest
    output; bfloat16 sums and outputs would miss by ~2e-3); ``float32`` throughout."""
    y = _intensities((256,))
    x = encode_intensities(jnp.asarray(y))
    for dtype, bf16 in ((jnp.float32, False), (jnp.bfloat16, True)):
        out = DeepEMNet(small_predictor.config, dtype=dtype).apply(
            {"params": small_predictor.params}, x
        )
        assert out.dtype == jnp.float32
        ref = _numpy_mlp(small_predictor.params, y, bf16)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_predict_dtype_defaults_to_the_predictors(small_predictor):
    y = _intensities((64,))
    assert small_predictor.dtype == native_dtype()
    f32 = dataclasses.replace(small_predictor, dtype=jnp.float32)
    b16 = dataclasses.replace(small_predictor, dtype="bfloat16")
    assert (f32.dtype, b16.dtype) == ("float32", "bfloat16")
    em16, em32 = b16.predict(y), f32.predict(y)
    np.testing.assert_array_equal(b16.predict(y, dtype="float32"), em32)
    np.testing.assert_array_equal(f32.predict(y, dtype=jnp.bfloat16), em16)
    assert em16.dtype == np.float32 and not np.array_equal(em16, em32)
    scale = np.sqrt(em32 / 1e25).max()
    np.testing.assert_allclose(np.sqrt(em16 / 1e25), np.sqrt(em32 / 1e25), atol=0.05 * scale)
    with pytest.raises(ValueError, match="float32, bfloat16 or 'auto', got int32"):
        small_predictor.predict(y, dtype=np.int32)
    with pytest.raises(ValueError, match="float32, bfloat16 or 'auto', got float16"):
        dataclasses.replace(small_predictor, dtype="float16")


class _Device(NamedTuple):
    platform: str
    compute_capability: str = ""


def test_native_dtype_follows_the_hardware(small_predictor, monkeypatch):
    """bfloat16 operands where the hardware multiplies them natively, float32 elsewhere; a
    predictor made with the default ``"auto"`` takes the default device's."""
    import deepem_jax.predictor as predictor_module

    monkeypatch.setattr(predictor_module, "_cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert native_dtype(_Device("cpu")) == "float32"
    assert dataclasses.replace(small_predictor, dtype="auto").dtype == "float32"
    monkeypatch.setattr(predictor_module, "_cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert native_dtype(_Device("cpu")) == "bfloat16"
    assert dataclasses.replace(small_predictor, dtype="auto").dtype == "bfloat16"
    assert native_dtype(_Device("tpu")) == "bfloat16"
    assert native_dtype(_Device("gpu", "8.6")) == "bfloat16"
    assert native_dtype(_Device("gpu", "7.5")) == "float32"
    assert native_dtype(_Device("gpu", "gfx90a")) == "float32"


def test_predictor_validates_grid_and_channels(small_predictor):
    with pytest.raises(ValueError, match="log T grid has 17 bins"):
        Predictor(small_predictor.params, small_predictor.config, DEEPEM_LOGT[:17], (94,) * 6)
    with pytest.raises(ValueError, match="5 channels"):
        Predictor(small_predictor.params, small_predictor.config, DEEPEM_LOGT, (1, 2, 3, 4, 5))


def test_predictor_is_a_pytree(small_predictor):
    doubled = jax.tree.map(lambda x: 2 * x, small_predictor)
    assert isinstance(doubled, Predictor) and doubled.config == small_predictor.config
    leaves = jax.tree.leaves(small_predictor)
    assert len(leaves) == 6


def test_predict_with_sigma_is_invert_net(small_predictor):
    from deepem_jax.pipeline import invert
    from deepem_jax.response import default_response

    y = _intensities((40,))
    sig = 0.05 * y + 0.1
    resp = default_response().regrid(DEEPEM_LOGT)
    em = small_predictor.predict(y, sigma=sig)
    ref = invert(
        y, "net", sigma=sig, channels=resp.wavelength, predictor=small_predictor, degradation=False
    )
    np.testing.assert_array_equal(em, ref.em)
    # a response given in another channel order or on another grid is put on the network's
    em2 = small_predictor.predict(
        y, sigma=sig, response=default_response().select([335, 94, 131, 171, 193, 211] * u.AA)
    )
    np.testing.assert_allclose(em2, em, rtol=1e-5, atol=1e-5 * np.nanmax(em))
    with pytest.raises(ValueError, match="only used with sigma"):
        small_predictor.predict(y, response=resp)
    with pytest.raises(ValueError, match="sigma shape"):
        small_predictor.predict(y, sigma=sig[:4], response=resp)
